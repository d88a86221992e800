"""The dtype the frozen base weights are held in while the adapter trains in fp32."""

from __future__ import annotations

import torch

from loralab.util.errors import LoralabError


def hold_frozen_weights_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store the frozen base weights in `dtype` (bf16 halves their memory, and autocast no longer
    re-casts every fp32 weight on every forward); the trainable adapter stays fp32."""
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point():
            param.data = param.data.to(dtype)


def resolve_frozen_dtype(setting: str, amp_dtype: torch.dtype | None) -> torch.dtype:
    if setting == "auto":
        return amp_dtype if amp_dtype == torch.bfloat16 else torch.float32
    if setting == "bf16" and amp_dtype != torch.bfloat16:  # fp32 activations cannot meet bf16 weights
        raise LoralabError(
            "model.frozen_dtype=bf16 needs bf16 autocast: set model.precision=bf16 (or auto on a bf16 CPU/GPU)"
        )
    if setting in ("bf16", "fp32"):
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[setting]
    raise LoralabError(f"model.frozen_dtype={setting!r}: expected auto, bf16 or fp32")
