"""The provenance block every result file carries: which code, command, config, CPU and libraries wrote it.

A committed number is only as good as the code it came from. Each result records the git commit of
the checkout it ran in and whether that checkout's code differed from the commit (uncommitted edits
to the code, not to results: a run that writes experiments/ must not call itself dirty), so that
`loralab provenance` can tell which results predate a later change to the code they depend on.
Written by hand because no library records this for arbitrary result files (MLflow tags a run with
the commit, but our results are plain files that must stand on their own in the repository).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from loralab.util.cpu import cpu_profile

# Paths whose uncommitted edits make a result "dirty": the code and the configs, not results or docs.
CODE_PATHS = ("src", "benchmarks/*.py", "scripts", "configs", "Makefile", "pyproject.toml", "requirements.txt")
# The libraries whose versions can change a number.
LIBRARIES = ("loralab", "torch", "transformers", "peft", "accelerate", "trl", "optuna", "numpy", "tokenizers",
             "safetensors", "gguf", "sacrebleu", "rouge-score", "lm-eval", "bitsandbytes")


def repo_root(start: Path | None = None) -> Path | None:
    """The git checkout loralab runs from (its package folder's checkout), or None when installed elsewhere."""
    here = start or Path(__file__).resolve().parent
    found = git_output(here, "rev-parse", "--show-toplevel")
    return Path(found.strip()) if found else None


def git_output(cwd: Path, *args: str) -> str | None:
    """`git ARGS` run in `cwd`: its stdout, or None when git is missing, fails or hangs."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None  # unstripped: porcelain lines start with a space


def code_state(root: Path | None) -> dict[str, Any]:
    """{"commit", "dirty", "dirty_paths"} of the checkout; commit None outside a git checkout."""
    if root is None:
        return {"commit": None, "dirty": None, "dirty_paths": []}
    status = git_output(root, "status", "--porcelain", "--untracked-files=normal", "--", *CODE_PATHS) or ""
    paths = sorted(line[3:] for line in status.splitlines() if line.strip())
    return {"commit": (git_output(root, "rev-parse", "HEAD") or "").strip() or None, "dirty": bool(paths),
            "dirty_paths": paths[:20]}


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def command_line(argv: list[str] | None = None) -> str:
    """The command as a user would retype it: `loralab <verb> ...` for the CLI, `python <script> ...` otherwise."""
    argv = list(sys.argv if argv is None else argv)
    program = Path(argv[0]).name if argv else ""
    if program in ("loralab", "__main__.py", "-m"):
        head = ["loralab"]
    else:
        head = ["python", argv[0]] if argv else ["python"]
    return shlex.join([*head, *argv[1:]])


def record(config: dict[str, Any] | None, command: str | None = None) -> dict[str, Any]:
    """The provenance block: commit and dirtiness, command line, resolved config, CPU, library versions, time."""
    return {
        **code_state(repo_root()),
        "command": command or command_line(),
        "config": config,
        "machine": cpu_profile(),
        "versions": library_versions(),
        "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
