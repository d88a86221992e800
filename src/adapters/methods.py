"""The fine-tuning methods loralab trains, as the training code calls them: each function looks up
the `Method` record of `settings.method` (src/adapters/registry.py) and does what the record says.

PEFT implements every adapter; these functions fail early on options that do not apply, attach the
method, and give the training loop its optimizer, loss penalty, per-step hook and checkpoint state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from loralab.adapters.method import FixedSetting, Method
from loralab.adapters.registry import METHOD_NAMES, METHOD_OPTIONS, REGISTRY, get_method
from loralab.config import LoraSettings
from loralab.util.errors import LoralabError

__all__ = [
    "METHODS", "METHOD_NAMES", "METHOD_OPTIONS", "REGISTRY", "FixedSetting", "Method", "after_optimizer_step", "attach",
    "get_method", "load_trainable_state", "make_optimizer", "peft_config", "regularization", "run_overrides",
    "save_initial_adapter", "trainable_state", "validate",
]

METHODS: dict[str, str] = {name: method.description for name, method in REGISTRY.items()}  # name -> description


def _owner(option: str) -> str:
    return next(m.name for m in REGISTRY.values() if option in m.options)


def validate(settings: LoraSettings, quantize_base: str = "none") -> None:
    """Unknown methods and options that do not apply fail here, before any model is loaded."""
    method = get_method(settings.method)
    for option in METHOD_OPTIONS:
        if getattr(settings, option) is not None and option not in method.options:
            raise LoralabError(f"lora.{option} applies only to lora.method={_owner(option)} (method is {method.name})")
    if method.check is not None:
        method.check(settings)
    for fixed in method.fixed:
        if getattr(settings, fixed.key) != fixed.value:
            raise LoralabError(
                f"lora.{fixed.key} applies to lora.method={method.name} only as {fixed.value} ({fixed.why})"
            )
    if method.has_rank and settings.r < 1:
        raise LoralabError(f"lora.r={settings.r}: must be at least 1")
    if not 0 <= settings.dropout < 1:
        raise LoralabError(f"lora.dropout={settings.dropout}: must be in [0, 1)")
    if quantize_base != "none" and method.changes_base:
        raise LoralabError(
            f"lora.method={method.name} changes the base weights, so it cannot use model.quantize_base={quantize_base}"
        )


def run_overrides(name: str, settings: LoraSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    """What a study sets to run method `name` from a config written for another, as two groups of
    `lora.*` overrides: (options the method does not take, cleared; settings the method fixes). An
    unknown name gets none, so that `validate` reports it with the caller's context."""
    method = REGISTRY.get(name)
    if method is None:
        return {}, {}
    foreign = [o for o in METHOD_OPTIONS if o not in method.options and getattr(settings, o) is not None]
    cleared = {f"lora.{o}": None for o in foreign}
    return cleared, {f"lora.{f.key}": f.value for f in method.fixed}


def peft_config(model: torch.nn.Module, settings: LoraSettings, total_steps: int | None):
    """The PEFT configuration of `settings.method` (None for a whole-model method: it has no adapter)."""
    build = get_method(settings.method).peft_config
    return None if build is None else build(model, settings, total_steps)


def attach(model: torch.nn.Module, settings: LoraSettings, total_steps: int | None = None) -> torch.nn.Module:
    """Wrap `model` with the method's PEFT adapter; a whole-model method makes every weight trainable instead."""
    validate(settings)
    if get_method(settings.method).whole_model:
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    from peft import get_peft_model

    return get_peft_model(model, peft_config(model, settings, total_steps))


def make_optimizer(
    model: torch.nn.Module, settings: LoraSettings, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    return get_method(settings.method).make_optimizer(model, settings, lr, weight_decay)


def regularization(model: torch.nn.Module, settings: LoraSettings) -> torch.Tensor | None:
    """The method's penalty to add to the loss (AdaLoRA's orthogonality penalty), or None."""
    penalty = get_method(settings.method).penalty
    return None if penalty is None else penalty(model)


def after_optimizer_step(model: torch.nn.Module, settings: LoraSettings, step: int) -> None:
    """The method's per-step hook (AdaLoRA's rank allocation), after optimizer.step and before zero_grad."""
    hook = get_method(settings.method).after_optimizer_step
    if hook is not None:
        hook(model, step)


def trainable_state(model: torch.nn.Module, settings: LoraSettings) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the model: the adapter's weights, or a whole model's state dict."""
    if get_method(settings.method).whole_model:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def load_trainable_state(model: torch.nn.Module, settings: LoraSettings, state: dict[str, torch.Tensor]) -> None:
    if get_method(settings.method).whole_model:
        model.load_state_dict(state)
        return
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, state)


def save_initial_adapter(model, settings: LoraSettings, directory: Path) -> Path | None:
    """PiSSA and OLoRA change the base weights when they initialise. Their initial adapter is kept so
    the final one can be converted into a plain LoRA adapter (rank 2r) for the untouched base model."""
    if not get_method(settings.method).keeps_initial_adapter:
        return None
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    model.save_pretrained(directory, safe_serialization=True)
    config.init_lora_weights = init
    return directory
