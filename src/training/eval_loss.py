"""The held-out loss the loop reports: mean cross-entropy over answer tokens, as training minimises."""

from __future__ import annotations

import torch

from loralab.data.chat import EncodedExample, collate
from loralab.metrics.losses import answer_nll_fast
from loralab.model_utils import autocast


@torch.no_grad()
def answer_loss_sums(
    model, examples: list[EncodedExample], pad_id: int, batch_size: int, device, amp_dtype
) -> tuple[float, int]:
    """(summed answer-token NLL, answer tokens): sums, so data-parallel ranks can add theirs."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # similar lengths pad little
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start : start + batch_size]], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, amp_dtype):
            nll, n = answer_nll_fast(model, batch)
        total += float(nll)
        count += n
    model.train(was_training)
    return total, count


def mean_answer_loss(model, examples: list[EncodedExample], pad_id: int, batch_size: int, device, amp_dtype) -> float:
    total, count = answer_loss_sums(model, examples, pad_id, batch_size, device, amp_dtype)
    return total / max(count, 1)
