"""Search spaces and budgeted run configs shared by the studies (tune, sweep, compare, domains).

A space maps `section.key` to a list (categorical choices) or a mapping {low, high, log} (a
range; an int range when both ends are ints). Everything is validated against the config
dataclasses before any training starts, so a typo costs a one-line error, not an hour.
"""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralab.config import Config, apply_overrides
from loralab.util.errors import LoralabError

# Not a config key: sets lora.alpha = ratio x lora.r, so alpha scales with the rank it is tried with.
ALPHA_RATIO = "lora.alpha_ratio"


@dataclass(frozen=True)
class Param:
    name: str
    choices: tuple | None = None
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False

    @property
    def is_int(self) -> bool:
        return self.choices is None and isinstance(self.low, int) and isinstance(self.high, int)


def _number(value: Any, where: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise LoralabError(f"{where}: expected a number, got {value!r}")
    if isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string
        try:
            return float(value)
        except ValueError:
            raise LoralabError(f"{where}: expected a number, got {value!r}") from None
    return value


def parse_space(space: dict[str, Any], cfg: Config) -> list[Param]:
    """Validate `tune.space` against `cfg` and return it as Params (raises LoralabError)."""
    if not isinstance(space, dict) or not space:
        raise LoralabError("tune.space is empty: give at least one section.key with a list or a {low, high} range")
    params = []
    for name, spec in space.items():
        where = f"tune.space.{name}"
        if isinstance(spec, list):
            if not spec:
                raise LoralabError(f"{where}: empty list of choices")
            for value in spec:
                if value is not None and not isinstance(value, (str, int, float, bool)):
                    raise LoralabError(f"{where}: choice {value!r} is not a number, string or boolean "
                                       f"(write a module set as one string: \"q_proj,v_proj\")")
            param = Param(name, choices=tuple(spec))
            samples = list(spec)
        elif isinstance(spec, dict):
            unknown = set(spec) - {"low", "high", "log"}
            if unknown or "low" not in spec or "high" not in spec:
                raise LoralabError(f"{where}: a range is {{low: .., high: .., log: true|false}}, got {spec!r}")
            low, high = _number(spec["low"], f"{where}.low"), _number(spec["high"], f"{where}.high")
            log = bool(spec.get("log", False))
            if not low < high:
                raise LoralabError(f"{where}: empty or inverted range (low={low} is not below high={high})")
            if log and low <= 0:
                raise LoralabError(f"{where}: a log range needs low > 0, got {low}")
            param = Param(name, low=low, high=high, log=log)
            samples = [low, high]
        else:
            raise LoralabError(f"{where}: expected a list of choices or a {{low, high}} range, got {spec!r}")
        for value in samples:  # unknown names and wrongly typed values fail here, before any training
            trial_overrides(cfg, {name: value})
        params.append(param)
    return params


def grid_points(params: list[Param]) -> list[dict[str, Any]]:
    ranges = [p.name for p in params if p.choices is None]
    if ranges:
        raise LoralabError(f"tune.sampler=grid needs a list of values for every parameter; {', '.join(ranges)} is a range")
    return [dict(zip([p.name for p in params], combo)) for combo in itertools.product(*(p.choices for p in params))]


def trial_overrides(cfg: Config, params: dict[str, Any]) -> Config:
    """A copy of `cfg` with `params` applied, validated (names, types, choices and ranges)."""
    trial = copy.deepcopy(cfg)
    plain = {k: v for k, v in params.items() if k != ALPHA_RATIO}
    apply_overrides(trial, [f"{k}={json.dumps(v)}" for k, v in plain.items()])
    if ALPHA_RATIO in params:
        ratio = _number(params[ALPHA_RATIO], f"tune.space.{ALPHA_RATIO}")
        if ratio <= 0:
            raise LoralabError(f"tune.space.{ALPHA_RATIO}: must be positive, got {ratio}")
        trial.lora.alpha = max(1, round(ratio * trial.lora.r))
    return trial.validate()


@dataclass(frozen=True)
class Budget:
    """What one study run may spend, given to the trial runner by each study (tune, sweep, compare,
    domains) instead of being written into another study's settings."""

    train_examples: int  # steps = train_examples / (batch x accumulation), whatever the batch size
    eval_examples: int  # eval-loss subset; 0: the whole eval split


def trial_config(cfg: Config, params: dict[str, Any], run_root: Path, reports: int, budget: Budget) -> Config:
    """The config of one budgeted run: `budget.train_examples` training examples whatever the batch
    size, `reports` intermediate eval losses, and every output under `run_root`."""
    trial = trial_overrides(cfg, params)
    t = trial.train
    steps = max(1, budget.train_examples // (t.batch_size * t.gradient_accumulation))
    t.max_steps = steps
    t.eval_examples = budget.eval_examples
    t.eval_every = max(1, steps // max(1, reports))
    t.save_every = t.eval_every
    t.run_dir = str(run_root / "run")
    t.output_dir = str(run_root / "adapter")
    t.results_dir = str(run_root)  # training_logs.txt
    t.plot_loss = False
    return trial
