"""One-off migration (restructure, issue 13): rename the committed compare records to the unified run identity.

Run directories of `loralab compare` were named by `studies/space.py:settings_digest`,
a hand-kept field list; they are now named by `config.run_digest`, the one run identity. This script
recomputes, for every run the committed results describe, the old name (with the old formula, kept
here) and the new one, checks that every old name is a committed record, then:
- renames experiments/compare_runs/<old>.json to <new>.json, its `run_dir` rewritten and its keys in the
  order of `studies/records.py:RunRecord` (older records had `test` before `machine`);
- rewrites the run directories (and record key order) inside experiments/method_comparison.json, so
  that `loralab compare` regenerates it byte for byte from the migrated records.
No number changes and nothing is retrained. experiments/sensitivity.json is left alone: its point
digests were already stale before this change (they predate lora.method, length_bucketing and other
fields, so those points were trained differently from today's defaults and a sweep re-measures them).
Run once from the repository root:

    python scripts/migrate_compare_records.py

A second run finds nothing left to rename and changes nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from loralab.config import Config, load_config
from loralab.studies import compare
from loralab.studies.records import RunRecord
from loralab.studies.runner import run_root
from loralab.studies.space import trial_config
from loralab.studies.writer import json_bytes
from loralab.util import atomic_io

# The old settings_digest's train fields: every TrainConfig field whose name did not end in _dir, _file or _plot.
_OLD_TRAIN_FIELDS = ("learning_rate", "lr_scheduler", "warmup_ratio", "weight_decay", "max_grad_norm", "batch_size",
                     "gradient_accumulation", "epochs", "max_steps", "max_length", "seed", "eval_every", "eval_examples",
                     "save_every", "keep_checkpoints", "length_bucketing", "answer_only_logits", "compile")
_OLD_NUMERICS_DEFAULTS = {"quantize_base": "none", "frozen_dtype": "auto", "precision": "auto"}


def old_digest(trial: Config) -> str:
    """studies/space.py:settings_digest as it was, applied to a run's config."""
    key = {"lora": dataclasses.asdict(trial.lora), "train": {k: getattr(trial.train, k) for k in _OLD_TRAIN_FIELDS},
           "model": trial.model.name_or_path, "data": trial.data.out_dir}
    numerics = {k: getattr(trial.model, k) for k, default in _OLD_NUMERICS_DEFAULTS.items() if getattr(trial.model, k) != default}
    if numerics:
        key["model_numerics"] = numerics
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _renames(old_and_new: list[tuple[str, str]]) -> dict[str, str]:
    renames = dict(old_and_new)
    if len(set(renames.values())) != len(renames):
        raise SystemExit("two runs would get the same new name: the identity lost a field; nothing was changed")
    return renames


def compare_renames(cfg: Config, results: dict) -> dict[str, str]:
    """Old -> new run name of every run in method_comparison.json (its learning rates include the extensions)."""
    budget = compare.budget(cfg)
    pairs = []
    for entry, m in results["methods"].items():
        runs = [(s["learning_rate"], cfg.compare.seeds[0]) for s in m["lr_search"]]
        runs += [(m["learning_rate"], r["seed"]) for r in m["runs"]]
        for lr, seed in runs:
            params = compare._params(cfg, entry, lr, seed)
            trial = trial_config(cfg, params, Path("."), 1, budget)
            pairs.append((old_digest(trial), run_root(cfg.compare.runs_dir, cfg, params, budget).name))
    return _renames(pairs)


def _renamed_record(data: dict, renames: dict[str, str]) -> dict:
    record = RunRecord.from_json(data)
    root = Path(record.run_dir)
    record.run_dir = str(root.with_name(renames.get(root.name, root.name)))
    return record.to_json()


def migrate_compare(cfg: Config) -> int:
    results_path, records = Path(cfg.compare.results_json), Path(cfg.compare.records_dir)
    results = json.loads(results_path.read_text())
    renames = compare_renames(cfg, results)
    todo = {old: new for old, new in renames.items() if old != new and (records / f"{old}.json").is_file()}
    if not todo:
        return 0
    missing = sorted(old for old, new in renames.items() if not (records / f"{old}.json").is_file()
                     and not (records / f"{new}.json").is_file())
    stray = sorted(p.stem for p in records.glob("*.json") if p.stem not in renames and p.stem not in renames.values())
    if missing or stray:
        raise SystemExit(f"records and results disagree (missing {missing}, not in the results {stray}); nothing was changed")
    files: dict[Path, bytes] = {}
    for old, new in todo.items():
        files[records / f"{new}.json"] = json_bytes(_renamed_record(json.loads((records / f"{old}.json").read_text()), renames))
    for m in results["methods"].values():
        for s in m["lr_search"]:
            root = Path(s["run_dir"])
            s["run_dir"] = str(root.with_name(renames.get(root.name, root.name)))
        m["runs"] = [{"seed": r["seed"], **_renamed_record({k: v for k, v in r.items() if k != "seed"}, renames)}
                     for r in m["runs"]]
    files[results_path] = json_bytes(results)
    atomic_io.write_files(files)
    for old in todo:
        (records / f"{old}.json").unlink()
    return len(todo)


def main() -> None:
    renamed = migrate_compare(load_config())
    print(f"compare: {renamed} records renamed to the unified run identity")


if __name__ == "__main__":
    main()
