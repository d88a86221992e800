"""Small datasets and output redirection shared by tests."""

from __future__ import annotations

import json
from pathlib import Path

from loralab.config import Config

QA_ROWS = [
    {"question": f"What does the code X{i:02d} mean?", "answer": f"Condition number {i} of the tiny test set",
     "task": "t1" if i % 2 else "t2"}
    for i in range(40)
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def outputs_under(cfg: Config, root: Path) -> Config:
    """Point every file a run writes at `root`, so tests never touch the committed results: each
    section's output root (its file names are derived from it, see config.py)."""
    cfg.data.out_dir = str(root / "data")
    cfg.train.run_dir = str(root / "run")
    cfg.train.output_dir = str(root / "lora")
    for section in (cfg.train, cfg.eval, cfg.tune, cfg.sweep, cfg.export, cfg.compare, cfg.domains, cfg.prune):
        section.results_dir = str(root)
    cfg.tune.runs_dir = str(root / "tune")
    cfg.tune.storage = f"sqlite:///{root / 'tune' / 'study.db'}"
    cfg.sweep.runs_dir = str(root / "tune" / "sweep")
    cfg.compare.runs_dir = str(root / "compare")
    cfg.domains.runs_dir = str(root / "domains")
    cfg.export.out_dir = str(root / "export")
    cfg.prune.runs_dir = str(root / "prune")
    cfg.prune.out_dir = str(root / "pruned")
    return cfg


def first_eval_row_per_task(n: int) -> list[dict]:
    """The committed eval split's first row of each task, in the order tasks first appear, at most n."""
    rows = json.loads((Path(__file__).resolve().parents[2] / "data" / "eval_split.json").read_text())
    return [next(r for r in rows if r["task"] == task) for task in dict.fromkeys(r["task"] for r in rows)][:n]
