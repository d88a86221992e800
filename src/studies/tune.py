"""`loralab tune`: hyperparameter search on Optuna, resumable and shared by many workers.

Optuna does the search itself: TPE, grid and random samplers, median or Hyperband pruning, and an
RDB storage that any number of workers on any number of machines share (SQLite on one machine,
PostgreSQL across machines), with heartbeats that fail a dead worker's trial and re-queue it.
loralab adds what Optuna cannot know about fine-tuning:
- every trial trains on the same number of examples (`tune.trial_examples`), so batch size is a
  fair parameter, and reports its eval loss at the same fractions of that budget, so pruning
  compares like with like;
- a trial re-queued after its worker died, or after Ctrl-C, resumes its own checkpoint;
- a grid is queued once, and trials are taken from the queue atomically (a row lock in the
  database), so two workers never run the same grid point (Optuna's GridSampler does, by design,
  once every point has started);
- the study records its search space and budget: a worker with other settings is refused instead
  of silently mixing two experiments in one study;
- results people read: metrics_comparison.json, a Markdown table, plots (tune_report.py), and
  best_config.yaml that `loralab train --config` accepts unchanged.

The objective is the eval-split answer loss; the test split is never looked at here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import torch

from loralab.config import Config, run_identity
from loralab.data.prepare import prepare_dataset
from loralab.studies.optuna_storage import RESUME_OF, continued_trial, import_optuna, masked_url, open_storage
from loralab.studies.runner import run_trial
from loralab.studies.space import Budget, Param, grid_points, parse_space
from loralab.training.tracking import StudyRun, study_run
from loralab.util.errors import LoralabError

SETUP_ATTR = "loralab_setup"  # study user attr: the settings every worker of this study must share
READY_ATTR = "loralab_ready"  # set once the study's creator has queued its grid


def budget(cfg: Config) -> Budget:
    return Budget(cfg.tune.trial_examples, cfg.tune.trial_eval_examples)


def _setup_fingerprint(cfg: Config) -> dict:
    """Everything that makes two trials comparable: the search, its budget, and the run identity
    (config.run_identity) of every setting that is not searched (a worker with another max_length
    or dataset would measure something else). JSON-normalised so YAML ints and floats compare equal."""
    tc = cfg.tune
    searched = set(tc.space)
    setup = {"space": tc.space, "sampler": tc.sampler, "trial_examples": tc.trial_examples,
             "trial_eval_examples": tc.trial_eval_examples, "reports_per_trial": tc.reports_per_trial}
    for section, values in run_identity(cfg).items():
        setup[section] = {k: v for k, v in values.items() if f"{section}.{k}" not in searched}
    return json.loads(json.dumps(setup, sort_keys=True, default=str))


def _make_sampler(cfg: Config):
    optuna = import_optuna()
    tc = cfg.tune
    if tc.sampler == "tpe":
        # constant_liar: concurrent workers do not all pick the point that looks best right now.
        # Unseeded: a fixed seed would make every worker (and every restart) draw the same
        # random startup trials; the study's storage, not the seed, makes a search reproducible.
        return optuna.samplers.TPESampler(n_startup_trials=tc.startup_trials, multivariate=True, constant_liar=True)
    # grid: every trial comes from the queue, so this sampler is never asked for a value.
    return optuna.samplers.RandomSampler()


def _make_pruner(cfg: Config):
    optuna = import_optuna()
    tc = cfg.tune
    if tc.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tc.startup_trials, n_warmup_steps=0)
    if tc.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=tc.reports_per_trial, reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(cfg: Config, params: list[Param], wait_s: float = 60.0):
    """Create the study or join it; refuse one made with other settings. The creator (the one
    whose create_study wins in the database) queues the grid before marking the study ready."""
    optuna = import_optuna()
    tc = cfg.tune
    storage = open_storage(tc)
    setup = _setup_fingerprint(cfg)
    kwargs = dict(study_name=tc.study_name, storage=storage, sampler=_make_sampler(cfg), pruner=_make_pruner(cfg))
    try:
        study = optuna.create_study(direction="minimize", **kwargs)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(**kwargs)
        created = False
    if created:
        study.set_user_attr(SETUP_ATTR, setup)
        if tc.sampler == "grid":
            for point in grid_points(params):
                study.enqueue_trial(point)
        study.set_user_attr(READY_ATTR, True)
    deadline = time.monotonic() + wait_s
    while not study.user_attrs.get(READY_ATTR):
        if time.monotonic() > deadline:
            raise LoralabError(f"study '{tc.study_name}' in {masked_url(tc.storage)} was never set up (its creator died "
                               f"while queueing?); delete it or use another tune.study_name")
        time.sleep(0.5)
    existing = study.user_attrs.get(SETUP_ATTR)
    if existing != setup:
        differ = sorted(k for k in set(setup) | set(existing or {}) if (existing or {}).get(k) != setup.get(k))
        raise LoralabError(
            f"study '{tc.study_name}' in {masked_url(tc.storage)} was made with another {', '.join(differ)}; "
            f"use another tune.study_name (or the same settings) -- the study was not changed"
        )
    return study


def _finished_count(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


class Objective:
    """One Optuna trial: suggest params, train with pruning on intermediate eval loss, record cost."""

    def __init__(self, cfg: Config, params: list[Param], tracked: StudyRun | None = None):
        self.cfg = cfg
        self.params = params
        self.tracked = tracked  # the study's parent run in train.report_to's trackers
        self.started = time.monotonic()

    def _suggest(self, trial) -> dict[str, Any]:
        values = {}
        for p in self.params:
            if p.choices is not None:
                values[p.name] = trial.suggest_categorical(p.name, list(p.choices))
            elif p.is_int:
                values[p.name] = trial.suggest_int(p.name, p.low, p.high, log=p.log)
            else:
                values[p.name] = trial.suggest_float(p.name, float(p.low), float(p.high), log=p.log)
        return values

    def __call__(self, trial) -> float:
        optuna = import_optuna()
        tc = self.cfg.tune
        # A live Trial does not expose system attrs in Optuna 5; its stored (frozen) copy does.
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        if tc.sampler == "grid" and "fixed_params" not in frozen.system_attrs:
            # Another worker emptied the queue between our look and our ask: nothing to run.
            trial.set_user_attr("skipped", "grid queue was empty")
            raise optuna.TrialPruned("grid queue was empty")
        values = self._suggest(trial)
        origin = continued_trial(frozen)
        run_root = Path(tc.runs_dir) / tc.study_name / f"trial-{origin if origin is not None else trial.number:04d}"
        reported: set[int] = set()

        def on_eval(step: int, total_steps: int, loss: float) -> None:
            # Keyed by the fraction of the budget (1..reports), not the step, so trials with
            # different batch sizes (and so step counts) are compared at equal data.
            key = min(tc.reports_per_trial, math.ceil(tc.reports_per_trial * step / total_steps - 1e-9))
            if key in reported:
                return
            reported.add(key)
            trial.report(loss, key)
            if step < total_steps and trial.should_prune():  # a finished trial is complete, not pruned
                trial.set_user_attr("pruned_at", f"{key}/{tc.reports_per_trial} of the budget")
                raise optuna.TrialPruned(f"eval loss {loss:.4f} at {key}/{tc.reports_per_trial} of the budget")

        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # which machine ran what
        print(f"trial {trial.number}: {values}" + (f" (continues trial {origin})" if origin is not None else ""), flush=True)
        try:
            record, _ = run_trial(self.cfg, values, run_root, budget(self.cfg), tc.reports_per_trial,
                                  resume=origin is not None, on_eval=on_eval,
                                  tracking=self.tracked.child(run_root.name) if self.tracked else None)
        except optuna.TrialPruned:
            shutil.rmtree(run_root, ignore_errors=True)  # its checkpoints will never be resumed
            raise
        except KeyboardInterrupt:
            # Re-queue the same params so the next `loralab tune` resumes this trial's checkpoint.
            trial.study.enqueue_trial(values, user_attrs={RESUME_OF: origin if origin is not None else trial.number})
            raise
        for key, value in record.to_json().items():
            if key != "params":
                trial.set_user_attr(key, value)
        return record.eval_loss


def _log_trial(cfg: Config):
    def callback(study, frozen) -> None:
        try:
            best = f"best {study.best_value:.4f} (trial {study.best_trial.number})"
        except ValueError:
            best = "no complete trial yet"
        value = f"eval loss {frozen.value:.4f}" if frozen.value is not None else frozen.state.name.lower()
        if frozen.state.name == "PRUNED":
            value = f"pruned at {frozen.user_attrs.get('pruned_at', '?')}"
        wall = frozen.duration.total_seconds() if frozen.duration else 0.0
        print(f"trial {frozen.number} {value} in {wall:.0f} s; {best}; {_finished_count(study)}/{cfg.tune.n_trials} trials",
              flush=True)

    return callback


# A trial that runs out of memory (a large rank or batch) is recorded as failed; the search goes on.
_CATCH = (torch.OutOfMemoryError, MemoryError)


def _work_grid(study, objective: Objective, cfg: Config, deadline: float | None) -> None:
    """Take grid points from the queue until none is waiting or running. Waiting on a RUNNING
    trial matters: if its worker died, it is re-queued after the grace period and run here."""
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    while deadline is None or time.monotonic() < deadline:
        fail_stale_trials(study)
        states = {t.state for t in study.get_trials(deepcopy=False)}
        if TrialState.WAITING in states:
            study.optimize(objective, n_trials=1, callbacks=[_log_trial(cfg)], gc_after_trial=True, catch=_CATCH)
        elif TrialState.RUNNING in states:
            time.sleep(min(cfg.tune.heartbeat_seconds, 5))
        else:
            return


def _work_sampled(study, objective: Objective, cfg: Config, deadline: float | None) -> None:
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    if _finished_count(study) >= cfg.tune.n_trials:
        return
    timeout = None if deadline is None else max(1.0, deadline - time.monotonic())
    stop = MaxTrialsCallback(cfg.tune.n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED))
    study.optimize(objective, timeout=timeout, callbacks=[_log_trial(cfg), stop], gc_after_trial=True, catch=_CATCH)


def validate(cfg: Config) -> list[Param]:
    """The config (choices and ranges: config.py) and the search space, before any training."""
    tc = cfg.validate().tune
    params = parse_space(tc.space, cfg)
    if tc.sampler == "grid":
        grid_points(params)
    return params


def report_only(cfg: Config) -> dict:
    """Rewrite the results of an existing study from its storage (no training, no settings check)."""
    optuna = import_optuna()
    from loralab.studies.tune_report import write_results

    try:
        study = optuna.load_study(study_name=cfg.tune.study_name, storage=open_storage(cfg.tune))
    except KeyError:
        raise LoralabError(f"no study '{cfg.tune.study_name}' in {masked_url(cfg.tune.storage)}") from None
    return write_results(study, cfg)


def tune(cfg: Config) -> dict:
    """Run this worker's share of the study, then write the results of the whole study."""
    from loralab.studies.tune_report import write_results

    params = validate(cfg)
    card = prepare_dataset(cfg.data)
    if not card["splits"]["eval"]:
        raise LoralabError("tuning scores trials on the eval split, which is empty: raise data.eval_fraction")
    study = open_study(cfg, params)
    deadline = time.monotonic() + 60 * cfg.tune.timeout_minutes if cfg.tune.timeout_minutes > 0 else None
    with study_run(cfg, "tune", cfg.tune.study_name) as tracked:  # every trial a nested run of this one
        objective = Objective(cfg, params, tracked)
        try:
            if cfg.tune.sampler == "grid":
                _work_grid(study, objective, cfg, deadline)
            else:
                _work_sampled(study, objective, cfg, deadline)
        finally:
            summary = write_results(study, cfg)  # also after Ctrl-C: what finished is on disk
            tracked.log_artifact(cfg.tune.summary_md)
            tracked.log_artifact(cfg.tune.results_json)
    return summary

