"""Answer-token cross-entropy without ever holding the answer positions' logits whole.

answer_nll_fast (metrics/losses.py) already applies the output head at answer positions only, but
autograd still keeps those positions' logits for the backward: answers x 49k vocabulary, in fp32
and again as the log-softmax output (a tenth of what the default step saves for backward, in a hand
measurement that is not committed; `python benchmarks/memory_breakdown.py` measures activations).
Here the head and the loss run chunk by chunk of answer tokens and the
backward recomputes each chunk's logits (Liger's and unsloth's fused linear cross-entropy, in plain
PyTorch): only the hidden states are saved. The loss and gradients are
those of the plain head + cross_entropy (tests/training/test_speed_paths.py); the price is one more
head matmul at the answer positions in the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loralab.metrics.losses import answer_hidden

CHUNK_ROWS = 128  # answer tokens per chunk: 128 x 49k fp32 logits = 25 MB at a time


class _ChunkedHeadNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype):
        nll = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        head = weight.to(dtype)  # cast once, not per chunk (a copy of the whole head when the weights are fp32)
        for start in range(0, len(targets), CHUNK_ROWS):  # torch's log_softmax kernel: far faster than logsumexp
            end = start + CHUNK_ROWS
            log_probs = torch.log_softmax(_logits(hidden[start:end], head), dim=-1)
            nll[start:end] = -log_probs.gather(1, targets[start:end, None])[:, 0]
        ctx.dtype = dtype
        ctx.save_for_backward(hidden, weight, targets)
        return nll

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        hidden, weight, targets = ctx.saved_tensors
        needs_hidden, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        head = weight.to(ctx.dtype)
        for start in range(0, len(targets), CHUNK_ROWS):
            end = start + CHUNK_ROWS
            # d nll / d logits = softmax - onehot(target), times the incoming gradient of each token's nll
            grad_logits = torch.softmax(_logits(hidden[start:end], head), dim=-1)
            minus_one = torch.full((len(targets[start:end]), 1), -1.0, device=hidden.device)
            grad_logits.scatter_add_(1, targets[start:end, None], minus_one)
            grad_logits = (grad_logits * grad_nll[start:end, None]).to(ctx.dtype)
            if needs_hidden:
                grad_hidden[start:end] = grad_logits @ head
            if needs_weight:
                grad_weight += grad_logits.T.float() @ hidden[start:end].to(ctx.dtype).float()
        return grad_hidden, (grad_weight.to(weight.dtype) if needs_weight else None), None, None


def _logits(hidden: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """The logits in the head's dtype (what autocast would compute them in), then fp32 for the softmax."""
    return (hidden.to(head.dtype) @ head.T).float()


def answer_nll_chunked(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of negative log-likelihoods over labelled tokens, number of labelled tokens), as answer_nll_fast."""
    hidden, targets, _, head = answer_hidden(model, batch)
    if type(head) is not torch.nn.Linear or head.bias is not None:  # e.g. a head with its own LoRA: the plain way
        nll = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
        return nll, len(targets)
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
    nll = _ChunkedHeadNLL.apply(hidden, head.weight, targets, dtype)
    return nll.sum(), nll.numel()
