"""One budgeted training run with its cost measured: the unit of work of `tune` and `sweep`."""

from __future__ import annotations

import json
import math
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

from loralab.util import atomic_io
from loralab.config import Config
from loralab.util.errors import LoralabError
from loralab.training.recipe import train
from loralab.util.library_noise import quiet_library_noise
from loralab.util.resources import PeakRss, machine_description
from loralab.studies.space import trial_config


def adapter_megabytes(adapter_dir: str | Path) -> float:
    """Size on disk of what a user ships: the adapter, or the whole model for lora.method=full."""
    files = list(Path(adapter_dir).glob("adapter_model.safetensors")) or list(Path(adapter_dir).glob("model*.safetensors"))
    return round(sum(f.stat().st_size for f in files) / 2**20, 3)


def run_trial(
    cfg: Config,
    params: dict[str, Any],
    run_root: Path,
    reports: int,
    resume: bool,
    on_eval: Callable[[int, int, float], None] | None = None,
) -> tuple[dict, Config]:
    """Train one trial under `run_root`; return its record (params, eval loss, cost) and its config.

    `resume=False` clears `run_root` first: a trial number or digest reused by a new study must
    never continue a stale checkpoint. KeyboardInterrupt propagates after the checkpoint is saved.
    """
    trial_cfg = trial_config(cfg, params, run_root, reports)
    if not resume and run_root.exists():
        shutil.rmtree(run_root)
    started = time.perf_counter()
    with PeakRss() as rss:
        result = train(trial_cfg, resume=resume, quiet=True, on_eval=on_eval)
    if result.interrupted:
        raise KeyboardInterrupt
    if result.final_eval_loss is None:
        raise LoralabError("no eval example fits in train.max_length; raise it (or give the eval split more rows)")
    args = json.loads((Path(trial_cfg.train.output_dir) / "training_args.json").read_text())
    record = {
        "params": params,
        "lora_alpha": trial_cfg.lora.alpha,
        "trial_examples": cfg.tune.trial_examples,
        "steps": trial_cfg.train.max_steps,
        "eval_loss": result.final_eval_loss,
        "eval_perplexity": math.exp(result.final_eval_loss),
        "final_train_loss": result.final_train_loss,
        "trainable_parameters": args["trainable_parameters"],
        "adapter_mb": adapter_megabytes(trial_cfg.train.output_dir),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "tokens_per_s": args["mean_tokens_per_s"],
        "peak_rss_mb": round(rss.peak_mb, 1),
        "run_dir": str(run_root),
        "machine": machine_description(),  # timings compare only on the same CPU; a study may span machines
    }
    return record, trial_cfg


def record_path(run_root: Path) -> Path:
    return run_root / "record.json"


def recorded_trial(cfg: Config, params: dict[str, Any], run_root: Path) -> dict:
    """`run_trial` once per run directory: one whose record.json and adapter exist is reused, not retrained;
    an unfinished one resumes from its checkpoint."""
    if record_path(run_root).is_file() and (run_root / "adapter" / "training_args.json").is_file():
        return json.loads(record_path(run_root).read_text())
    record, _ = run_trial(cfg, params, run_root, reports=1, resume=True)
    atomic_io.write_json(record_path(run_root), record)
    return record


def in_fresh_process(function: Callable[..., dict], *args: Any) -> dict:
    """function(*args) in a new spawned process: its peak memory is its own, not the high-water mark of
    every run before it in this process (freed tensors stay in a process's heap)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                             initializer=quiet_library_noise) as pool:  # a spawned process starts with no filters
        return pool.submit(function, *args).result()
