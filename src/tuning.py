"""`loralab tune`: grid search over learning rate, batch size and LoRA rank (any config key).

Each trial trains on `tune.trial_examples` examples (the same for every batch size) and is scored by its eval-split answer loss
(the test split is never looked at). Results are rewritten after every trial, and a trial whose
parameters are already in the results file is skipped, so a killed search continues where it
stopped. The best trial's full config is written as YAML that `loralab train --config` accepts.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import sys
import time
from pathlib import Path

import yaml

from . import atomic_io
from .config import Config, apply_overrides
from .data_preparation import prepare_dataset
from .errors import LoralabError
from .fine_tune_lora import train


def grid_trials(grid: dict[str, list]) -> list[dict[str, object]]:
    if not grid:
        raise LoralabError("tune.grid is empty: give at least one section.key with a list of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise LoralabError(f"tune.grid.{key}: expected a non-empty list of values")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _params_key(params: dict[str, object]) -> str:
    return json.dumps(params, sort_keys=True)


def trial_config(cfg: Config, params: dict[str, object], index: int) -> Config:
    trial = copy.deepcopy(cfg)
    apply_overrides(trial, [f"{k}={json.dumps(v)}" for k, v in params.items()])  # validates the names too
    # Named by its parameters, so editing the grid never resumes another trial's checkpoint.
    digest = hashlib.sha1(_params_key(params).encode()).hexdigest()[:8]
    run = Path(cfg.tune.runs_dir) / f"trial-{index:03d}-{digest}"
    steps = max(1, cfg.tune.trial_examples // (trial.train.batch_size * trial.train.gradient_accumulation))
    trial.train.max_steps = steps
    trial.train.eval_examples = cfg.tune.trial_eval_examples
    trial.train.eval_every = max(1, steps // 3)
    trial.train.save_every = max(1, steps // 3)
    trial.train.run_dir = str(run / "run")
    trial.train.output_dir = str(run / "adapter")
    trial.train.log_file = str(run / "training_logs.txt")
    trial.train.loss_plot = ""
    return trial


def tune(cfg: Config) -> dict:
    trials = grid_trials(cfg.tune.grid)
    configs = [trial_config(cfg, params, i) for i, params in enumerate(trials)]  # all validated up front
    card = prepare_dataset(cfg.data)
    if cfg.tune.trial_eval_examples < 0:
        raise LoralabError("tune.trial_eval_examples must be >= 0 (0 means the whole eval split)")
    if not card["splits"]["eval"]:
        raise LoralabError("tuning scores trials on the eval split, which is empty: raise data.eval_fraction")
    results_path = Path(cfg.tune.results_json)
    previous = json.loads(results_path.read_text()) if results_path.is_file() else {}
    done = {_params_key(t["params"]): t for t in previous.get("trials", []) if t.get("trial_examples") == cfg.tune.trial_examples}
    records = []
    for index, (params, trial_cfg) in enumerate(zip(trials, configs)):
        if _params_key(params) in done:
            records.append(done[_params_key(params)])
            continue
        print(f"trial {index + 1}/{len(trials)}: {params}", flush=True)
        started = time.perf_counter()
        result = train(trial_cfg, resume=True)
        if result.interrupted:
            raise KeyboardInterrupt
        if result.final_eval_loss is None:
            raise LoralabError(f"trial {params}: no eval example fits in train.max_length; raise it")
        args = json.loads((Path(trial_cfg.train.output_dir) / "training_args.json").read_text())
        records.append({
            "trial": index,
            "params": params,
            "trial_examples": cfg.tune.trial_examples,
            "steps": trial_cfg.train.max_steps,
            "eval_loss": result.final_eval_loss,
            "eval_perplexity": math.exp(result.final_eval_loss),
            "final_train_loss": result.final_train_loss,
            "trainable_parameters": args["trainable_parameters"],
            "wall_seconds": round(time.perf_counter() - started, 1),
            "mean_tokens_per_s": args["mean_tokens_per_s"],
            "peak_rss_mb": args["peak_rss_mb"],
        })
        _write(cfg, records, configs, trials)
    return _write(cfg, records, configs, trials)


def _write(cfg: Config, records: list[dict], configs: list[Config], trials: list[dict]) -> dict:
    best = min(records, key=lambda r: r["eval_loss"])
    summary = {
        "method": "grid search",
        "objective": "eval-split answer loss after tune.trial_examples training examples (lower is better)",
        "grid": cfg.tune.grid,
        "trial_examples": cfg.tune.trial_examples,
        "trials": records,
        "best": best,
        "complete": len(records) == len(trials),
    }
    atomic_io.write_json(cfg.tune.results_json, summary)
    best_cfg = copy.deepcopy(cfg)
    apply_overrides(best_cfg, [f"{k}={json.dumps(v)}" for k, v in best["params"].items()])
    atomic_io.write_text(cfg.tune.best_config_yaml, "# best grid-search trial (loralab tune)\n" + yaml.safe_dump(best_cfg.to_dict(), sort_keys=False))
    return summary


if __name__ == "__main__":
    from loralab.cli import main

    sys.exit(main(["tune", *sys.argv[1:]]))
