"""The fine-tuning methods loralab trains: PEFT's, plus full fine-tuning as the reference.

PEFT implements every adapter here; this module only maps `lora.method` to PEFT's configuration,
fails early on options that do not apply, and holds the few things a method needs from the training
loop (LoRA+'s optimizer, AdaLoRA's rank allocation and orthogonality penalty, PiSSA/OLoRA's
conversion to a plain LoRA adapter on save, full fine-tuning's whole-model checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import torch

from loralab.adapters.targets import find_target_modules, uses_conv1d
from loralab.config import LoraSettings
from loralab.util.errors import LoralabError

METHODS = {
    "lora": "LoRA",
    "rslora": "rank-stabilised LoRA (scaling alpha / sqrt(r))",
    "dora": "DoRA (weight-decomposed LoRA)",
    "pissa": "LoRA initialised from the principal singular vectors (PiSSA)",
    "olora": "LoRA with orthonormal QR initialisation (OLoRA)",
    "loraplus": "LoRA+ (B learns loraplus_lr_ratio times faster than A)",
    "adalora": "AdaLoRA (rank budget reallocated during training)",
    "ia3": "(IA)3 (learned rescaling vectors)",
    "full": "full fine-tuning (every weight; the reference)",
}
LORA_FAMILY = {"lora", "rslora", "dora", "pissa", "olora", "loraplus"}
ADALORA_ORTH_REG_WEIGHT = 0.5  # PEFT's default


def validate(settings: LoraSettings, quantize_base: str = "none") -> None:
    """Unknown methods and options that do not apply fail here, before any model is loaded."""
    if settings.method not in METHODS:
        raise LoralabError(f"lora.method={settings.method!r}: expected one of {', '.join(METHODS)}")
    if settings.loraplus_lr_ratio is not None and settings.method != "loraplus":
        raise LoralabError(f"lora.loraplus_lr_ratio applies only to lora.method=loraplus (method is {settings.method})")
    if settings.adalora_init_r is not None and settings.method != "adalora":
        raise LoralabError(f"lora.adalora_init_r applies only to lora.method=adalora (method is {settings.method})")
    if settings.adalora_init_r is not None and settings.adalora_init_r <= settings.r:
        raise LoralabError(f"lora.adalora_init_r={settings.adalora_init_r} must exceed lora.r={settings.r} (AdaLoRA prunes from it down to r)")
    if settings.method == "ia3" and settings.target_modules != "auto":
        raise LoralabError("lora.target_modules applies to lora.method=ia3 only as auto (PEFT's (IA)3 modules for the architecture)")
    if settings.method in LORA_FAMILY | {"adalora"} and settings.r < 1:
        raise LoralabError(f"lora.r={settings.r}: must be at least 1")
    if not 0 <= settings.dropout < 1:
        raise LoralabError(f"lora.dropout={settings.dropout}: must be in [0, 1)")
    if quantize_base != "none" and settings.method in ("pissa", "olora", "full"):
        raise LoralabError(f"lora.method={settings.method} changes the base weights, so it cannot use model.quantize_base={quantize_base}")


def peft_config(model: torch.nn.Module, settings: LoraSettings, total_steps: int | None):
    from peft import AdaLoraConfig, IA3Config, LoraConfig

    method = settings.method
    if method == "ia3":
        return IA3Config(task_type="CAUSAL_LM")
    targets = find_target_modules(model, settings.target_modules)
    common = dict(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets,
                  fan_in_fan_out=uses_conv1d(model, targets), bias="none", task_type="CAUSAL_LM")
    if method == "adalora":
        if not total_steps or total_steps < 5:
            raise LoralabError("lora.method=adalora needs at least 5 training steps (it reallocates ranks during training)")
        init_r = settings.adalora_init_r or max(settings.r + 1, round(1.5 * settings.r))
        common.pop("r")
        # Warm-up 10 %, reallocate, then keep the final ranks for the last 20 % of the steps.
        return AdaLoraConfig(init_r=init_r, target_r=settings.r, total_step=total_steps, tinit=total_steps // 10,
                             tfinal=total_steps // 5, deltaT=max(1, total_steps // 20), orth_reg_weight=ADALORA_ORTH_REG_WEIGHT, **common)
    init = {"pissa": "pissa_niter_16", "olora": "olora"}.get(method, True)  # fast randomised SVD for PiSSA
    return LoraConfig(use_rslora=method == "rslora", use_dora=method == "dora", init_lora_weights=init, **common)


def attach(model: torch.nn.Module, settings: LoraSettings, total_steps: int | None = None) -> torch.nn.Module:
    validate(settings)
    if settings.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    from peft import get_peft_model

    return get_peft_model(model, peft_config(model, settings, total_steps))


def make_optimizer(model: torch.nn.Module, settings: LoraSettings, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if settings.method == "loraplus":
        from peft.optimizers import create_loraplus_optimizer

        ratio = settings.loraplus_lr_ratio if settings.loraplus_lr_ratio is not None else 16.0  # the paper's default
        # PEFT puts loraplus_weight_decay (default 0) on every group, overriding weight_decay.
        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                         weight_decay=weight_decay, loraplus_weight_decay=weight_decay)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


def regularization(model: torch.nn.Module, settings: LoraSettings) -> torch.Tensor | None:
    """AdaLoRA's orthogonality penalty on P and Q. PEFT adds it inside the model's forward only when
    the model computes the loss itself; loralab computes the answer-token loss outside, so adds it here."""
    if settings.method != "adalora":
        return None
    penalties = []
    for name, param in model.named_parameters():
        if param.requires_grad and ("lora_A" in name or "lora_B" in name):
            cov = param @ param.T if "lora_A" in name else param.T @ param
            penalties.append(torch.linalg.matrix_norm(cov - torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)))
    return ADALORA_ORTH_REG_WEIGHT * torch.stack(penalties).mean() if penalties else None


def after_optimizer_step(model: torch.nn.Module, settings: LoraSettings, step: int) -> None:
    if settings.method == "adalora":  # uses this step's gradients: before zero_grad
        model.base_model.update_and_allocate(step)


def trainable_state(model: torch.nn.Module, settings: LoraSettings) -> dict[str, torch.Tensor]:
    if settings.method == "full":
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def load_trainable_state(model: torch.nn.Module, settings: LoraSettings, state: dict[str, torch.Tensor]) -> None:
    if settings.method == "full":
        model.load_state_dict(state)
        return
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, state)


def save_initial_adapter(model, settings: LoraSettings, directory: Path) -> Path | None:
    """PiSSA and OLoRA change the base weights when they initialise. Their initial adapter is kept so
    the final one can be converted into a plain LoRA adapter (rank 2r) for the untouched base model."""
    if settings.method not in ("pissa", "olora"):
        return None
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True
    model.save_pretrained(directory, safe_serialization=True)
    config.init_lora_weights = init
    return directory
