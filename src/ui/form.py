"""The Launch form, generated from the typed config, and the config a submitted form makes: the same
`load_config` as the CLI, so a bad value gets the CLI's one-line error."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from contextlib import ExitStack
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ConfigSource:
    """What `loralab ui` was started with (its --config files and --set overrides): the base of every
    job and of the form's defaults, applied in the CLI's order (preset, files, --set, then the form)."""

    files: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()

    def load(self, quick: bool, extra: list[str] | None = None) -> Config:
        with ExitStack() as stack:
            presets = [stack.enter_context(as_file(QUICK_PRESET))] if quick else []
            return load_config(*presets, *self.files, overrides=[*self.overrides, *(extra or [])])


def _settable() -> list[tuple[str, str, str, tuple]]:
    """(key, section, name, (type, choices)) of every field the form shows and a job may set."""
    found, defaults = [], Config()
    for section in SECTIONS:
        cls = type(getattr(defaults, section))
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key, kind = f"{section}.{f.name}", _field_type(hints[f.name])
            if kind is not None and key not in HIDDEN and (not f.name.endswith("_dir") or key == "data.out_dir"):
                found.append((key, section, f.name, kind))
    return found


def form_fields(source: ConfigSource) -> list[dict[str, Any]]:
    """One entry per settable field, with its default and its value under the quick preset."""
    plain, quick = source.load(quick=False), source.load(quick=True)
    fields = [{"key": key, "section": section, "name": name, "type": kind[0], "choices": list(kind[1]),
               "default": _shown(getattr(getattr(plain, section), name)),
               "quick_default": _shown(getattr(getattr(quick, section), name)), "primary": key in PRIMARY}
              for key, section, name, kind in _settable()]
    fields.sort(key=lambda field: (not field["primary"], PRIMARY.index(field["key"]) if field["primary"] else 0))
    return fields


def job_config(verb: str, settings: dict[str, Any], quick: bool, job_root: Path, source: ConfigSource) -> Config:
    """The resolved config of a job: the UI's own config (with the quick preset first if asked), the
    form's settings (checked exactly as `--set` is), then every output under `job_root`; raises the
    CLI's one-line LoralabError. Only the form's own keys are accepted, spelled exactly."""
    if verb not in VERBS:
        raise LoralabError(f"verb {verb!r}: the UI launches only {', '.join(VERBS)}")
    if not isinstance(settings, dict):
        raise LoralabError("settings: expected a mapping of section.key to value")
    settable = {key for key, *_ in _settable()}
    for key in settings:
        if key not in settable:
            raise LoralabError(f"settings: {key!r} is not a setting of the form (e.g. train.learning_rate)")
    # Text goes in as `--set key=text` would (YAML-parsed: lora.target_modules=[q_proj, v_proj] is a list);
    # numbers and booleans as JSON, which YAML reads back as the same value.
    overrides = [f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in settings.items()
                 if value is not None]
    cfg = source.load(quick, overrides)
    data_dir = cfg.data.out_dir
    outputs_under(cfg, job_root)
    if verb != "run":  # `run` prepares its own data; the others read the prepared folder the form names
        cfg.data.out_dir = data_dir
    return cfg.validate()
