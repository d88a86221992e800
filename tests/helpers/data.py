"""Small datasets and output redirection shared by tests."""

from __future__ import annotations

import json
from pathlib import Path

from loralab.config import outputs_under  # noqa: F401  (re-exported for the tests)

QA_ROWS = [
    {"question": f"What does the code X{i:02d} mean?", "answer": f"Condition number {i} of the tiny test set",
     "task": "t1" if i % 2 else "t2"}
    for i in range(40)
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def first_eval_row_per_task(n: int) -> list[dict]:
    """The committed eval split's first row of each task, in the order tasks first appear, at most n."""
    rows = json.loads((Path(__file__).resolve().parents[2] / "data" / "eval_split.json").read_text())
    return [next(r for r in rows if r["task"] == task) for task in dict.fromkeys(r["task"] for r in rows)][:n]
