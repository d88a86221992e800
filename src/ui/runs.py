"""Training runs found under the project, read from the files a run writes: its adapter's
training_args.json once it is done, its run directory's config.json and log.jsonl while it trains
(or after it was stopped), the results directory's training_logs.txt, eval_results.json and report.md.
The UI never keeps its own copy of a run: the CLI and the UI read the same files."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralab.ui.paths import OutsideProject, Project

# Folders never searched: environments, caches, checkpoints (large, and not runs of their own).
SKIPPED_DIRS = {"node_modules", "venv", "__pycache__", "checkpoints", "initial_adapter", "site-packages", "src", "tests"}
MAX_DEPTH = 7
ACTIVE_SECONDS = 60  # a log written this recently belongs to a run that is still training


def walk(project: Project) -> Iterator[tuple[Path, list[str]]]:
    """(folder, its file names) for every folder of the project worth searching."""
    root_depth = len(project.root.parts)
    for folder, dirs, files in os.walk(project.root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS
                         and len(here.parts) - root_depth < MAX_DEPTH)
        yield here, files


@dataclass
class RunFiles:
    """Where one run's files are; any of them may be missing."""

    id: str  # the project-relative adapter directory (train.output_dir), known from the start of the run
    config: dict[str, Any]
    adapter_dir: Path
    run_dir: Path | None
    training_args: dict[str, Any] | None

    @property
    def done(self) -> bool:
        return self.training_args is not None

    def section(self, name: str) -> dict[str, Any]:
        return self.config.get(name) or {}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def inside(project: Project, path: str | None) -> Path | None:
    if not path:
        return None
    try:
        return project.resolve(path)
    except OutsideProject:
        return None


def find_runs(project: Project) -> dict[str, RunFiles]:
    """Every finished adapter (training_args.json) and every run directory that has started
    (config.json, written by the recipe before its first step), by run id."""
    adapters, run_dirs = [], []
    for folder, files in walk(project):
        if "training_args.json" in files:
            adapters.append(folder)
        if "log.jsonl" in files and "config.json" in files:
            run_dirs.append(folder)
    runs: dict[str, RunFiles] = {}
    for folder in adapters:
        args = read_json(folder / "training_args.json")
        if isinstance(args, dict) and isinstance(args.get("config"), dict):
            run_dir = inside(project, args["config"].get("train", {}).get("run_dir"))
            if run_dir is not None and not _logs_for(project, run_dir, folder):
                run_dir = None  # the run directory was reused by a later run for another adapter
            run_id = project.relative(folder)
            runs[run_id] = RunFiles(run_id, args["config"], folder, run_dir, args)
    for folder in run_dirs:
        config = read_json(folder / "config.json")
        adapter = inside(project, (config or {}).get("train", {}).get("output_dir")) if isinstance(config, dict) else None
        if adapter is None:
            continue
        run_id = project.relative(adapter)
        finished = runs.get(run_id)
        if finished is None or _newer(folder / "log.jsonl", adapter / "training_args.json"):
            # still training, stopped, or training again into an output directory that holds an older adapter
            runs[run_id] = RunFiles(run_id, config, adapter, folder, None)
        elif finished.run_dir is None or not (finished.run_dir / "log.jsonl").is_file():
            finished.run_dir = folder
    return runs


def _logs_for(project: Project, run_dir: Path, adapter: Path) -> bool:
    """Whether run_dir's log belongs to the run that trains `adapter`: every CLI run with the default
    config logs to runs/default/, so a later run into another adapter directory takes it over. A
    run directory from before config.json was written is taken at its word."""
    config = read_json(run_dir / "config.json")
    if not isinstance(config, dict):
        return True
    return inside(project, config.get("train", {}).get("output_dir")) == adapter


def _newer(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_mtime > b.stat().st_mtime + 1
    except OSError:
        return not b.exists()


# --- the loss curve and the progress ------------------------------------------------------------------

def curve(project: Project, run: RunFiles) -> list[dict[str, Any]]:
    """The run's per-step log: its log.jsonl, else the results directory's training_logs.txt table
    (what a committed run keeps, its run directory being ignored by git)."""
    if run.run_dir is not None and (run.run_dir / "log.jsonl").is_file():
        return read_log(run.run_dir / "log.jsonl")
    table = result_file(project, run, "train", "log_file", "training_logs.txt")
    return parse_log_table(table.read_text(encoding="utf-8")) if table and table.is_file() else []


def read_log(path: Path) -> list[dict[str, Any]]:
    """A run's log.jsonl, up to the line being written when it was read."""
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            break
    return entries


def result_file(project: Project, run: RunFiles, section: str, key: str, name: str) -> Path | None:
    """A file the run's config names: `<section>.results_dir`/name, or, in configs written before
    results_dir existed, the file's own key (train.log_file, eval.results_json, eval.report_md)."""
    values = run.section(section)
    if values.get(key):
        return inside(project, values[key])
    folder = inside(project, values.get("results_dir"))
    return folder / name if folder else None


def parse_log_table(text: str) -> list[dict[str, Any]]:
    """training_logs.txt (TrainLog's text table) back into entries; a step logged again after a
    resume replaces the earlier line."""
    by_step: dict[int, dict[str, Any]] = {}
    columns: list[str] = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        cells = line.split("\t")
        if not columns:
            columns = [c.strip() for c in cells]
            continue
        entry = {name: _number(cell.strip()) for name, cell in zip(columns, cells)}
        if isinstance(entry.get("step"), (int, float)):
            by_step[int(entry["step"])] = entry
    return [by_step[step] for step in sorted(by_step)]


def _number(cell: str) -> float | int | None:
    if cell == "-":
        return None
    try:
        return int(cell)
    except ValueError:
        try:
            return float(cell)
        except ValueError:
            return None


def progress(entries: list[dict[str, Any]], total_steps: int | None) -> dict[str, Any] | None:
    """Step, tokens/s and ETA from the last entries of the log (the mean step time of the last ten)."""
    if not entries or not total_steps:
        return None
    last = entries[-1]
    recent = entries[-10:]
    step_seconds = None
    if len(recent) > 1 and recent[-1].get("elapsed_s") is not None and recent[0].get("elapsed_s") is not None:
        span = recent[-1]["step"] - recent[0]["step"]
        elapsed = recent[-1]["elapsed_s"] - recent[0]["elapsed_s"]
        step_seconds = elapsed / span if span > 0 and elapsed >= 0 else None
    tokens = [e["tokens_per_s"] for e in recent if e.get("tokens_per_s")]
    remaining = max(total_steps - last["step"], 0)
    return {"step": last["step"], "total_steps": total_steps,
            "tokens_per_s": round(sum(tokens) / len(tokens), 1) if tokens else None,
            "eta_s": round(remaining * step_seconds) if step_seconds is not None else None}


def status(run: RunFiles, job_status: str | None) -> str:
    """done; running or queued (a UI job, or a log written in the last minute); interrupted (a
    checkpoint to resume from); cancelled or failed before its first checkpoint."""
    if job_status in ("running", "queued"):
        return job_status
    if run.done:
        return "done"
    log = run.run_dir / "log.jsonl" if run.run_dir else None
    if log is not None and log.is_file() and time.time() - log.stat().st_mtime < ACTIVE_SECONDS and job_status is None:
        return "running"
    if run.run_dir is not None and (run.run_dir / "checkpoints").is_dir():
        return "interrupted"  # a checkpoint to resume from
    return "cancelled" if job_status == "cancelled" else "failed"  # stopped before its first checkpoint


def total_steps(run: RunFiles, entries: list[dict[str, Any]]) -> int | None:
    if run.training_args:
        return run.training_args.get("total_steps")
    return entries[-1].get("total_steps") if entries else None
