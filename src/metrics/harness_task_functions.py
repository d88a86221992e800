"""Functions that loralab's lm-evaluation-harness task YAMLs name with `!function`.

lm-eval loads a `!function` module from a file next to the YAML, so `loralab.metrics.harness` copies
this file into the generated task folder. It imports nothing from loralab: the folder runs with the
stock `lm_eval` command and no loralab installed.
"""

from __future__ import annotations


def answer_loglikelihood(doc: dict, results: list[tuple[float, bool]]) -> dict:
    """domain_ppl: the answer's summed log-likelihood, weighted by its token count.

    lm-eval moves a context's trailing whitespace into the continuation before scoring, so a chat
    prompt ending in "assistant\\n" would have its final newline token scored with the answer. The
    document's context is therefore the prompt without that whitespace, and its continuations are
    the whitespace followed by the answer and, when there is whitespace, the whitespace alone; the
    difference of their log-likelihoods is that of exactly the answer tokens that loralab's answer
    perplexity counts. The aggregation `weighted_perplexity` is exp(-sum log-likelihood / sum answer tokens)."""
    loglikelihoods = [loglikelihood for loglikelihood, _ in results]
    answer = loglikelihoods[0] - sum(loglikelihoods[1:])
    return {"answer_perplexity": (answer, doc["answer_tokens"])}
