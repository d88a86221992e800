"""What a fine-tuning method is, as data: the `Method` record every entry of the registry fills in.

Like PEFT's LoRA variants, a method is a record of the few things that differ between methods (its
PEFT configuration, its optimizer, a per-step hook, a loss penalty, and facts the rest of loralab
asks about) rather than string comparisons spread over the training code. The records themselves
live in `loralab.adapters.registry`; the defaults below are what most methods share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from loralab.config import LoraSettings

PeftConfigBuilder = Callable[[torch.nn.Module, LoraSettings, "int | None"], Any]
OptimizerFactory = Callable[[torch.nn.Module, LoraSettings, float, float], torch.optim.Optimizer]
LossPenalty = Callable[[torch.nn.Module], "torch.Tensor | None"]
StepHook = Callable[[torch.nn.Module, int], None]
SettingsCheck = Callable[[LoraSettings], None]


@dataclass(frozen=True)
class FixedSetting:
    """A `lora.*` setting a method accepts at one value only (PEFT decides it for that method)."""

    key: str  # a LoraSettings field
    value: Any
    why: str  # ends the error message: what decides the value instead


def adamw_over_trainable(
    model: torch.nn.Module, settings: LoraSettings, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """The optimizer of every method that does not bring its own: AdamW over the trainable weights."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


@dataclass(frozen=True)
class Method:
    """One value of `lora.method`: everything loralab needs to know to train, resume and save it.

    `peft_config` is None exactly when `whole_model` is True: such a method trains the model's own
    weights (no adapter), checkpoints its whole state dict and saves a whole Hugging Face model.
    """

    name: str
    description: str  # one phrase, for logs and the comparison table
    peft_config: PeftConfigBuilder | None  # (model, settings, total_steps) -> a PEFT config
    changes_base: bool = False  # initialisation or training changes the base weights: no quantized base
    exact_resume: bool = True  # False: a resumed run would differ from an uninterrupted one, so restart
    whole_model: bool = False  # trains every weight; checkpoints and saves a whole model
    has_rank: bool = True  # lora.r means something (and must be at least 1)
    keeps_initial_adapter: bool = False  # save the adapter as initialised, to convert the final one on save
    min_steps: int = 1  # fewer training steps than this cannot run the method
    options: tuple[str, ...] = ()  # LoraSettings fields only this method takes (None everywhere else)
    fixed: tuple[FixedSetting, ...] = ()
    make_optimizer: OptimizerFactory = adamw_over_trainable
    penalty: LossPenalty | None = None  # added to the loss; PEFT adds it only when the model computes the loss
    after_optimizer_step: StepHook | None = None  # (model, step), after optimizer.step and before zero_grad
    check: SettingsCheck | None = None  # rules on the method's own options, beyond "set only for this method"

    def __post_init__(self) -> None:
        if (self.peft_config is None) != self.whole_model:
            raise ValueError(f"method {self.name}: a whole-model method has no PEFT config; every other has one")
