"""The study runner: one budgeted training run with its cost measured, run once, in a fresh process.

tune, sweep, compare and domains all train through `run_trial`; sweep, compare and domains run
each training in its own spawned process (`in_fresh_process`), so its peak memory is its own.
tune trains in the worker's process: Optuna's pruning asks the live trial after every report.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from loralab.config import Config, run_digest
from loralab.metrics.evaluate import evaluate_adapter
from loralab.studies.records import RECORD_FILE, RecordStore, RunRecord, TestQuality, read_record, write_record
from loralab.studies.space import Budget, trial_config
from loralab.training.recipe import train
from loralab.training.tracking import TrackingContext
from loralab.util import provenance
from loralab.util.errors import LoralabError
from loralab.util.library_noise import quiet_library_noise
from loralab.util.resources import PeakRss, machine_description

T = TypeVar("T")


def adapter_megabytes(adapter_dir: str | Path) -> float:
    """Size on disk of what a user ships: the adapter, or the whole model for lora.method=full."""
    files = list(Path(adapter_dir).glob("adapter_model.safetensors")) or list(Path(adapter_dir).glob("model*.safetensors"))
    return round(sum(f.stat().st_size for f in files) / 2**20, 3)


def run_root(runs_dir: str | Path, cfg: Config, params: dict[str, Any], budget: Budget) -> Path:
    """A run's directory, named by the identity of what it trains (config.run_digest)."""
    return Path(runs_dir) / run_digest(trial_config(cfg, params, Path("."), 1, budget))


def run_trial(
    cfg: Config,
    params: dict[str, Any],
    root: Path,
    budget: Budget,
    reports: int,
    resume: bool,
    on_eval: Callable[[int, int, float], None] | None = None,
    tracking: TrackingContext | None = None,
) -> tuple[RunRecord, Config]:
    """Train one run under `root` on `budget`; return its record (params, eval loss, cost) and its config.

    `resume=False` clears `root` first: a trial number or digest reused by a new study must
    never continue a stale checkpoint. KeyboardInterrupt propagates after the checkpoint is saved.
    `tracking`: the run's place under its study's parent run in train.report_to's trackers.
    """
    trial_cfg = trial_config(cfg, params, root, reports, budget)
    if not resume and root.exists():
        shutil.rmtree(root)
    started = time.perf_counter()
    with PeakRss() as rss:
        result = train(trial_cfg, resume=resume, quiet=True, on_eval=on_eval, tracking=tracking)
    if result.interrupted:
        raise KeyboardInterrupt
    if result.final_eval_loss is None:
        raise LoralabError("no eval example fits in train.max_length; raise it (or give the eval split more rows)")
    args = json.loads((Path(trial_cfg.train.output_dir) / "training_args.json").read_text())
    record = RunRecord(
        params=params,
        lora_alpha=trial_cfg.lora.alpha,
        trial_examples=budget.train_examples,
        steps=trial_cfg.train.max_steps,
        eval_loss=result.final_eval_loss,
        eval_perplexity=math.exp(result.final_eval_loss),
        final_train_loss=result.final_train_loss,
        trainable_parameters=args["trainable_parameters"],
        adapter_mb=adapter_megabytes(trial_cfg.train.output_dir),
        wall_seconds=round(time.perf_counter() - started, 1),
        tokens_per_s=args["mean_tokens_per_s"],
        peak_rss_mb=round(rss.peak_mb, 1),
        run_dir=str(root),
        machine=machine_description(),
        provenance=provenance.record(trial_cfg.to_dict()),
    )
    return record, trial_cfg


def _train_and_test(cfg: Config, params: dict[str, Any], root: Path, budget: Budget, test_generation: int,
                    tracking: TrackingContext | None = None) -> RunRecord:
    """In the run's own process: the training (resumed, or reused when it finished before its test was
    measured), then its test-split quality when test_generation > 0."""
    if (root / RECORD_FILE).is_file() and (root / "adapter" / "training_args.json").is_file():
        record = read_record(root / RECORD_FILE)
    else:
        record, _ = run_trial(cfg, params, root, budget, reports=1, resume=True, tracking=tracking)
        write_record(root / RECORD_FILE, record)
    if test_generation and record.test is None:
        trial_cfg = trial_config(cfg, params, root, 1, budget)
        quality = evaluate_adapter(trial_cfg, trial_cfg.train.output_dir, "test", test_generation)
        record.test = TestQuality(quality["perplexity"], quality["domain_accuracy"],
                                  {task: v["primary"] for task, v in quality["per_task"].items()})
        write_record(root / RECORD_FILE, record)
    return record


def recorded_run(cfg: Config, params: dict[str, Any], root: Path, budget: Budget, store: RecordStore,
                 test_generation: int = 0, needs_adapter: bool = False,
                 tracking: TrackingContext | None = None) -> RunRecord:
    """A run done once: its stored record when it finished, otherwise the run (resumed from its checkpoint
    when it was interrupted) in a fresh process, stored as soon as it ends. `needs_adapter`: the caller
    goes on to use the adapter, so a record without it on disk does not count. `tracking`: see run_trial."""
    record = store.load(root, needs_test=test_generation > 0, needs_adapter=needs_adapter)
    if record is None:
        record = in_fresh_process(_train_and_test, cfg, params, root, budget, test_generation, tracking)
        store.save(root, record)
    return record


def in_fresh_process(function: Callable[..., T], *args: Any) -> T:
    """function(*args) in a new spawned process: its peak memory is its own, not the high-water mark of
    every run before it in this process (freed tensors stay in a process's heap)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                             initializer=quiet_library_noise) as pool:  # a spawned process starts with no filters
        return pool.submit(function, *args).result()
