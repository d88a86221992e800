"""Which attention kernel trains fastest here: chosen per CPU class, since the answer differs.

A hand microbenchmark on this model's shapes (batch 8, 80 tokens, 9 query / 3 key-value heads of 64;
forward and backward; not committed) found PyTorch's CPU flash-attention kernel (what transformers'
"sdpa" runs) more than twice as slow as transformers' "eager" (two batched matmuls, softmax in fp32)
in bf16, and the faster of the two in fp32. The figure of record is end to end: the "default, sdpa
attention" row of `python benchmarks/train_throughput.py --ablation`.
Short sequences are the common case for instruction data, where the flash kernel's blocking
does not pay. Both compute the same attention; only the rounding differs.
"""

from __future__ import annotations

import torch

from loralab.util.errors import LoralabError


def resolve_attention(setting: str, device: torch.device, amp_dtype: torch.dtype | None) -> str:
    """transformers' attn_implementation for training: train.attention, with auto chosen as measured above."""
    if setting in ("sdpa", "eager"):
        return setting
    if setting != "auto":
        raise LoralabError(f"train.attention={setting!r}: expected auto, sdpa or eager")
    return "eager" if device.type == "cpu" and amp_dtype == torch.bfloat16 else "sdpa"


def use_attention(model: torch.nn.Module, implementation: str) -> None:
    """Switch a loaded transformers model (or its PEFT wrapper) to `implementation`."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(lm.config, "_attn_implementation", None) != implementation:
        lm.set_attn_implementation(implementation)
