"""Unstructured and 2:4 pruning: zero individual weights of every Linear layer in the decoder.

- magnitude: the smallest |W| of each layer (one threshold per weight matrix).
- wanda: score |W_ij| * ||X_j||_2 (Sun et al. 2023), compared within each output row, as the paper does.
- wanda-2:4: in every 4 consecutive input weights of a row keep the 2 with the largest Wanda score (the
  pattern NVIDIA's sparse tensor cores run at 2x; a CPU runs it as a dense matrix).

Why by hand: llmcompressor (the maintained library with Wanda/SparseGPT modifiers) pins
transformers<=5.17 and pulls auto-round and nvidia-ml-py; loralab runs on transformers 5.24. The
scores and masks are a few lines, checked against hand-computed examples in tests/prune/.
The embedding and the output head (tied in SmolLM2) are left dense, as in the Wanda paper.
"""

from __future__ import annotations

import torch

from loralab.prune.calibration import decoder_layers


def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every Linear inside the decoder layers, named "<layer index>.<path>" as calibration names them."""
    return {f"{index}.{name}": module for index, layer in enumerate(decoder_layers(model))
            for name, module in layer.named_modules() if isinstance(module, torch.nn.Linear)}


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    return weight.abs() * input_norm.to(weight.dtype)[None, :]


def lowest_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """True where a weight is kept: the `sparsity` fraction with the lowest scores is dropped, per row
    or over the whole matrix (ties broken by position, so the count is exact)."""
    flat = scores if per_row else scores.reshape(1, -1)
    drop = round(sparsity * flat.shape[1])
    keep = torch.ones_like(flat, dtype=torch.bool)
    if drop:
        keep.scatter_(1, torch.topk(flat, drop, dim=1, largest=False).indices, False)
    return keep.reshape(scores.shape)


def n_of_m_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the n largest of every m consecutive scores along each row (in_features % m must be 0)."""
    groups = scores.reshape(scores.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return keep.reshape(scores.shape)


@torch.no_grad()
def prune_unstructured(model: torch.nn.Module, method: str, sparsity: float,
                       input_norms: dict[str, torch.Tensor] | None) -> dict[str, float]:
    """Zero weights in place; returns each layer's achieved sparsity."""
    achieved = {}
    for name, linear in decoder_linears(model).items():
        weight = linear.weight
        if method == "magnitude":
            keep = lowest_mask(weight.abs(), sparsity, per_row=False)
        else:
            scores = wanda_scores(weight, input_norms[name])
            keep = n_of_m_mask(scores) if method == "wanda-2:4" else lowest_mask(scores, sparsity, per_row=True)
        weight.mul_(keep)
        achieved[name] = 1 - float(keep.float().mean())
    return achieved
