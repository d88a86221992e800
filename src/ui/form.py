"""The Launch form, generated from the typed config, and the config a submitted form makes: the same
`load_config` as the CLI, so a bad value gets the CLI's one-line error."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from contextlib import ExitStack
from importlib.resources import as_file
from pathlib import Path
from typing import Any, Literal

from loralab.config import QUICK_PRESET, Config, choices, load_config, outputs_under
from loralab.util.errors import LoralabError

VERBS = ("train", "run", "tune", "compare")  # what the UI may launch; nothing else ever runs
SECTIONS = ("data", "model", "lora", "train", "eval", "tune", "compare")
PRIMARY = ("data.dataset", "data.out_dir", "model.name_or_path", "lora.method", "lora.r", "lora.alpha",
           "train.learning_rate", "train.batch_size", "train.epochs", "train.max_steps")
# Where a job writes is the UI's choice (runs/ui/<job>/), not the form's; data.out_dir stays, as the
# prepared dataset `train`, `tune` and `compare` read.
HIDDEN = {"model.cache_dir", "model.device", "tune.storage"}


def _field_type(annotation: Any) -> tuple[str, tuple] | None:
    if typing.get_origin(annotation) is Literal:
        return "choice", choices(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _field_type(kinds[0]) if len(kinds) == 1 else None
    if annotation is Any:  # lora.target_modules: "auto", "all-linear" or names, typed as text
        return "str", ()
    names = {bool: "bool", int: "int", float: "float", str: "str"}
    return (names[annotation], ()) if annotation in names else None


def _shown(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def form_fields() -> list[dict[str, Any]]:
    """One entry per settable field, with its default and its value under the quick preset."""
    defaults = Config()
    with as_file(QUICK_PRESET) as preset:
        quick = load_config(preset)
    fields = []
    for section in SECTIONS:
        values = getattr(defaults, section)
        hints = typing.get_type_hints(type(values))
        for f in dataclasses.fields(values):
            key = f"{section}.{f.name}"
            kind = _field_type(hints[f.name])
            if kind is None or key in HIDDEN or (f.name.endswith("_dir") and key != "data.out_dir"):
                continue
            fields.append({"key": key, "section": section, "name": f.name, "type": kind[0], "choices": list(kind[1]),
                           "default": _shown(getattr(values, f.name)),
                           "quick_default": _shown(getattr(getattr(quick, section), f.name)), "primary": key in PRIMARY})
    fields.sort(key=lambda field: (not field["primary"], PRIMARY.index(field["key"]) if field["primary"] else 0))
    return fields


def job_config(verb: str, settings: dict[str, Any], quick: bool, job_root: Path) -> Config:
    """The resolved config of a job: defaults, the quick preset, the form's settings (checked exactly
    as `--set` is), then every output under `job_root`; raises the CLI's one-line LoralabError."""
    if verb not in VERBS:
        raise LoralabError(f"verb {verb!r}: the UI launches only {', '.join(VERBS)}")
    if not isinstance(settings, dict):
        raise LoralabError("settings: expected a mapping of section.key to value")
    # Text goes in as `--set key=text` would (YAML-parsed: lora.target_modules=[q_proj, v_proj] is a list);
    # numbers and booleans as JSON, which YAML reads back as the same value.
    overrides = [f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in settings.items()
                 if value is not None]
    with ExitStack() as stack:
        presets = [stack.enter_context(as_file(QUICK_PRESET))] if quick else []
        cfg = load_config(*presets, overrides=overrides)
    data_dir = cfg.data.out_dir
    outputs_under(cfg, job_root)
    if verb != "run":  # `run` prepares its own data; the others read the prepared folder the form names
        cfg.data.out_dir = data_dir
    return cfg.validate()
