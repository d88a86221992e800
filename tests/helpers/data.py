"""Small datasets and output redirection shared by tests."""

from __future__ import annotations

import json
from pathlib import Path

from loralab.config import Config

QA_ROWS = [
    {"question": f"What does the code X{i:02d} mean?", "answer": f"Condition number {i} of the tiny test set", "task": "t1" if i % 2 else "t2"}
    for i in range(40)
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def outputs_under(cfg: Config, root: Path) -> Config:
    """Point every file a run writes at `root`, so tests never touch the committed results."""
    cfg.data.out_dir = str(root / "data")
    cfg.train.run_dir = str(root / "run")
    cfg.train.output_dir = str(root / "lora")
    cfg.train.log_file = str(root / "training_logs.txt")
    cfg.train.loss_plot = str(root / "loss.png")
    cfg.eval.results_json = str(root / "eval.json")
    cfg.eval.report_md = str(root / "report.md")
    cfg.eval.plots_dir = str(root / "plots")
    return cfg
