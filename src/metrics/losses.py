"""Answer-token cross-entropy, computed the fast way and the plain way.

The fast path runs the decoder, keeps only the hidden states whose next token is labelled, and
applies the output head to those alone. With SmolLM2's 49k vocabulary the head over every position
costs ~20 % of the forward FLOPs and a batch x length x 49k logits tensor (400 MB in fp32 at batch 8,
length 256); answers are a fraction of each sequence, so most of that work is thrown away.
The plain path (model(...).logits over every position) is kept as the reference: a test checks that
both give the same loss on identical batches, so speed never changes what is learned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loralab.data.chat import IGNORE_INDEX


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (LoRA layers stay injected in its modules)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def answer_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """(hidden states whose next token is labelled, those next tokens, their rows in the batch, the output head)."""
    lm = _unwrap(model)
    decoder = getattr(lm, lm.base_model_prefix)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    selected = targets != IGNORE_INDEX
    return hidden[:, :-1][selected], targets[selected], selected.nonzero()[:, 0], lm.get_output_embeddings()


def answer_token_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per labelled token: (negative log-likelihood, index of its row in the batch)."""
    hidden, targets, rows, head = answer_hidden(model, batch)
    return F.cross_entropy(head(hidden).float(), targets, reduction="none"), rows


def answer_nll_fast(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of negative log-likelihoods over labelled tokens, number of labelled tokens)."""
    nll, _ = answer_token_nll(model, batch)
    return nll.sum(), nll.numel()


def answer_nll_plain(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())
