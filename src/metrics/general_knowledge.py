"""Forgetting probe: does an adapter damage what the base model knew outside its domain?

Measured on general-knowledge MMLU questions (domain_datasets.general_knowledge_questions), as
plain text with no chat template, so the probe sees the language model and not the chat format the
adapters were trained on:
- text perplexity: exp(mean NLL) over every token after the first of "Question: q\\nAnswer: a", a
  the correct answer;
- multiple-choice accuracy: the choice whose tokens have the highest summed log-probability after
  "Question: q\\nAnswer:" (lm-evaluation-harness's unnormalised `acc`), with its standard error.
A 135M model is near chance (25 %) on MMLU, so the perplexity is the more sensitive of the two.
"""

from __future__ import annotations

import math

import torch

from loralab.model_utils import autocast


def _prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


@torch.no_grad()
def continuation_logprobs(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int, device, amp_dtype) -> list[dict]:
    """For each (context, continuation): the summed log-prob of the continuation's tokens, and the
    summed log-prob and count of every token after the first of the whole text."""
    model.eval()
    encoded = []
    for context, continuation in pairs:
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        # BPE may merge across the boundary; the continuation is what follows the longest common prefix.
        split = next((i for i, (a, b) in enumerate(zip(context_ids, full_ids)) if a != b), min(len(context_ids), len(full_ids)))
        encoded.append((full_ids, max(split, 1)))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    results: list[dict] = [{}] * len(encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i][0]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            tokens = encoded[i][0]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        with autocast(device, amp_dtype):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        token_lp = logprobs.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1).cpu()
        for row, i in enumerate(chunk):
            tokens, split = encoded[i]
            lp = token_lp[row, : len(tokens) - 1]
            results[i] = {"continuation_logprob": float(lp[split - 1 :].sum()), "text_logprob": float(lp.sum()),
                          "text_tokens": len(tokens) - 1}
    return results


def score_general_knowledge(model, tokenizer, questions: list[dict], batch_size: int, device, amp_dtype) -> dict:
    pairs = [(_prompt(q["question"]), f" {choice}") for q in questions for choice in q["choices"]]
    scored = continuation_logprobs(model, tokenizer, pairs, batch_size, device, amp_dtype)
    correct, nll, tokens = [], 0.0, 0
    for index, q in enumerate(questions):
        options = scored[4 * index : 4 * index + 4]
        best = max(range(4), key=lambda c: options[c]["continuation_logprob"])
        correct.append(1.0 if best == q["correct"] else 0.0)
        nll -= options[q["correct"]]["text_logprob"]
        tokens += options[q["correct"]]["text_tokens"]
    accuracy = sum(correct) / len(correct)
    return {"questions": len(questions), "text_perplexity": math.exp(nll / tokens),
            "mc_accuracy": 100 * accuracy, "mc_accuracy_se": 100 * math.sqrt(accuracy * (1 - accuracy) / len(correct))}
