"""Every fine-tuning method loralab trains, one `Method` record each: adding a method touches only this file.

PEFT implements every adapter here; a record maps `lora.method` to PEFT's configuration and holds what
the method needs from the training loop (LoRA+'s optimizer, AdaLoRA's rank allocation and orthogonality
penalty, PiSSA/OLoRA's conversion to a plain LoRA adapter on save, full fine-tuning's whole model).
The records are in one file rather than one module per family so that a new method, whatever its
family, is one record here and nothing else; the hooks a record uses sit just above it.
"""

from __future__ import annotations

from types import MappingProxyType

import torch

from loralab.adapters.method import FixedSetting, Method
from loralab.adapters.targets import find_target_modules, uses_conv1d
from loralab.config import LoraSettings
from loralab.util.errors import LoralabError

# --------------------------------------------------------------------------------------------
# The LoRA family: one PEFT LoraConfig, differing in scaling, decomposition or initialisation
# --------------------------------------------------------------------------------------------


def _lora_arguments(model: torch.nn.Module, settings: LoraSettings) -> dict:
    """What LoraConfig and AdaLoraConfig share: rank, scaling, dropout and the target modules."""
    targets = find_target_modules(model, settings.target_modules)
    return dict(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets,
                fan_in_fan_out=uses_conv1d(model, targets), bias="none", task_type="CAUSAL_LM")


def _lora_config(use_rslora: bool = False, use_dora: bool = False, init_lora_weights: bool | str = True):
    def build(model: torch.nn.Module, settings: LoraSettings, total_steps: int | None):
        from peft import LoraConfig

        return LoraConfig(use_rslora=use_rslora, use_dora=use_dora, init_lora_weights=init_lora_weights,
                          **_lora_arguments(model, settings))

    return build


LORAPLUS_DEFAULT_RATIO = 16.0  # the LoRA+ paper's default


def _loraplus_optimizer(
    model: torch.nn.Module, settings: LoraSettings, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    from peft.optimizers import create_loraplus_optimizer

    ratio = settings.loraplus_lr_ratio if settings.loraplus_lr_ratio is not None else LORAPLUS_DEFAULT_RATIO
    # PEFT puts loraplus_weight_decay (default 0) on every group, overriding weight_decay.
    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                     weight_decay=weight_decay, loraplus_weight_decay=weight_decay)


LORA = Method("lora", "LoRA", _lora_config())
RSLORA = Method("rslora", "rank-stabilised LoRA (scaling alpha / sqrt(r))", _lora_config(use_rslora=True))
DORA = Method("dora", "DoRA (weight-decomposed LoRA)", _lora_config(use_dora=True))
# PiSSA and OLoRA move the principal part of each weight into the adapter when they initialise, so the
# base changes; the initial adapter is kept to convert the final one for the untouched base.
PISSA = Method("pissa", "LoRA initialised from the principal singular vectors (PiSSA)",
               _lora_config(init_lora_weights="pissa_niter_16"),  # fast randomised SVD
               changes_base=True, keeps_initial_adapter=True)
OLORA = Method("olora", "LoRA with orthonormal QR initialisation (OLoRA)", _lora_config(init_lora_weights="olora"),
               changes_base=True, keeps_initial_adapter=True)
LORAPLUS = Method("loraplus", "LoRA+ (B learns loraplus_lr_ratio times faster than A)", _lora_config(),
                  options=("loraplus_lr_ratio",), make_optimizer=_loraplus_optimizer)

# --------------------------------------------------------------------------------------------
# AdaLoRA: the rank budget is reallocated between modules during training
# --------------------------------------------------------------------------------------------

ADALORA_ORTH_REG_WEIGHT = 0.5  # PEFT's default
ADALORA_MIN_STEPS = 5


def _adalora_config(model: torch.nn.Module, settings: LoraSettings, total_steps: int | None):
    from peft import AdaLoraConfig

    if not total_steps or total_steps < ADALORA_MIN_STEPS:
        raise LoralabError(
            f"lora.method=adalora needs at least {ADALORA_MIN_STEPS} training steps "
            "(it reallocates ranks during training)"
        )
    init_r = settings.adalora_init_r or max(settings.r + 1, round(1.5 * settings.r))
    common = _lora_arguments(model, settings)
    common.pop("r")
    # Warm-up 10 %, reallocate, then keep the final ranks for the last 20 % of the steps.
    return AdaLoraConfig(init_r=init_r, target_r=settings.r, total_step=total_steps, tinit=total_steps // 10,
                         tfinal=total_steps // 5, deltaT=max(1, total_steps // 20),
                         orth_reg_weight=ADALORA_ORTH_REG_WEIGHT, **common)


def _adalora_check(settings: LoraSettings) -> None:
    if settings.adalora_init_r is not None and settings.adalora_init_r <= settings.r:
        raise LoralabError(f"lora.adalora_init_r={settings.adalora_init_r} must exceed lora.r={settings.r} "
                           "(AdaLoRA prunes from it down to r)")


def _adalora_penalty(model: torch.nn.Module) -> torch.Tensor | None:
    """AdaLoRA's orthogonality penalty on P and Q. PEFT adds it inside the model's forward only when
    the model computes the loss itself; loralab computes the answer-token loss outside, so adds it here."""
    penalties = []
    for name, param in model.named_parameters():
        if param.requires_grad and ("lora_A" in name or "lora_B" in name):
            cov = param @ param.T if "lora_A" in name else param.T @ param
            penalties.append(torch.linalg.matrix_norm(cov - torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)))
    return ADALORA_ORTH_REG_WEIGHT * torch.stack(penalties).mean() if penalties else None


def _adalora_allocate(model: torch.nn.Module, step: int) -> None:
    model.base_model.update_and_allocate(step)  # uses this step's gradients: before zero_grad


# Its rank allocator keeps running importance scores that PEFT cannot save, so a resumed run would
# allocate ranks differently from an uninterrupted one.
ADALORA = Method("adalora", "AdaLoRA (rank budget reallocated during training)", _adalora_config,
                 exact_resume=False, min_steps=ADALORA_MIN_STEPS, options=("adalora_init_r",),
                 penalty=_adalora_penalty, after_optimizer_step=_adalora_allocate, check=_adalora_check)

# --------------------------------------------------------------------------------------------
# (IA)3 and full fine-tuning
# --------------------------------------------------------------------------------------------


def _ia3_config(model: torch.nn.Module, settings: LoraSettings, total_steps: int | None):
    from peft import IA3Config

    return IA3Config(task_type="CAUSAL_LM")  # PEFT picks the modules for the architecture


IA3 = Method("ia3", "(IA)3 (learned rescaling vectors)", _ia3_config, has_rank=False,
             fixed=(FixedSetting("target_modules", "auto", "PEFT's (IA)3 modules for the architecture"),))
FULL = Method("full", "full fine-tuning (every weight; the reference)", None,
              changes_base=True, whole_model=True, has_rank=False)

# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------

REGISTRY = MappingProxyType({m.name: m for m in (LORA, RSLORA, DORA, PISSA, OLORA, LORAPLUS, ADALORA, IA3, FULL)})
METHOD_NAMES: tuple[str, ...] = tuple(REGISTRY)  # registry order; config's `lora.method` Literal repeats it
# Every option some method owns; each is None (unset) under every other method.
METHOD_OPTIONS: tuple[str, ...] = tuple(dict.fromkeys(o for m in REGISTRY.values() for o in m.options))


def get_method(name: str) -> Method:
    """The record of `lora.method=name`; an unknown name fails with the valid choices."""
    method = REGISTRY.get(name)
    if method is None:
        raise LoralabError(f"lora.method={name!r}: expected one of {', '.join(METHOD_NAMES)}")
    return method
