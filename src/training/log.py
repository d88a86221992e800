"""What a run reports as it goes: the training log (a text table plus JSONL) and the loss plot."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

from loralab.util import atomic_io


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


class TrainLog:
    """Human-readable table (experiments/training_logs.txt) plus JSONL for plots; flushed per line
    so a killed run keeps every finished step."""

    COLUMNS = ("step", "epoch", "loss", "eval_loss", "lr", "tokens_per_s", "peak_rss_mb", "elapsed_s")

    def __init__(self, text_path: Path, jsonl_path: Path, resume_from: int):
        self.text_path, self.jsonl_path = text_path, jsonl_path
        text_path.parent.mkdir(parents=True, exist_ok=True)
        jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from and jsonl_path.exists():  # keep what the checkpoint covers, drop the rest
            kept = [text for text in jsonl_path.read_text().splitlines() if text and json.loads(text)["step"] <= resume_from]
            atomic_io.write_text(jsonl_path, "".join(text + "\n" for text in kept))
            self._append(self.text_path, f"# resumed from checkpoint at step {resume_from}\n")
        else:
            atomic_io.write_text(jsonl_path, "")
            header = "\t".join(f"{c:>12}" for c in self.COLUMNS)
            started = time.strftime("%Y-%m-%d %H:%M:%S")
            atomic_io.write_text(text_path, f"# loralab training log, started {started}\n{header}\n")

    @staticmethod
    def _append(path: Path, line: str) -> None:
        with path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()

    def write(self, entry: dict) -> None:
        self._append(self.jsonl_path, json.dumps(entry) + "\n")
        cells = []
        for column in self.COLUMNS:
            value = entry.get(column)
            if value is None:
                cells.append(f"{'-':>12}")
            else:
                cells.append(f"{value:>12.6g}" if isinstance(value, float) else f"{value:>12}")
        self._append(self.text_path, "\t".join(cells) + "\n")

    def entries(self) -> list[dict]:
        return [json.loads(text) for text in self.jsonl_path.read_text().splitlines() if text]


def plot_losses(entries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(e["step"], e["loss"]) for e in entries if e.get("loss") is not None]
    evals = [(e["step"], e["eval_loss"]) for e in entries if e.get("eval_loss") is not None]
    if train:
        ax.plot(*zip(*train), label="train loss (answer tokens)", alpha=0.6)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss (answer tokens)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("LoRA fine-tuning loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_io.save_figure(fig, path)
    plt.close(fig)
