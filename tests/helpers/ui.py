"""A project folder for `loralab ui` tests."""

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def committed_copy(root: Path) -> Path:
    """A project holding the committed adapter's record, results and prepared data (not its weights)."""
    (root / "lora").mkdir(parents=True)
    shutil.copy(REPO / "lora" / "training_args.json", root / "lora")
    shutil.copytree(REPO / "experiments", root / "experiments",
                    ignore=shutil.ignore_patterns("best", "compare_runs", "prune_runs", "plots"))
    shutil.copytree(REPO / "data", root / "data")
    return root
