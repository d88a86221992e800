"""The spec's script entry points reach the same CLI as `loralab <verb>`."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "script, verb",
    [
        ("src/data_preparation.py", "prepare"),
        ("src/fine_tune_lora.py", "train"),
        ("src/evaluation.py", "evaluate"),
        ("train_lora.py", "train"),
        ("evaluate_model.py", "evaluate"),
        ("experiments/hyperparameter_tuning.py", "tune"),
    ],
)
def test_script_shows_its_verbs_help(script, verb):
    result = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"usage: loralab {verb}" in result.stdout


def test_script_reports_bad_input_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "src/data_preparation.py", "--dataset", str(tmp_path / "missing.jsonl"),
         "--out-dir", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"loralab: error: {tmp_path / 'missing.jsonl'}: file not found"
