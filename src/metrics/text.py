"""Answer-quality metrics, SQuAD-style normalisation.

Written by hand because each is a few lines and the exact definitions matter for the report:
exact match (after lower-casing, dropping punctuation and articles), token F1 (bag of words), and
ROUGE-L F-measure (longest common subsequence of tokens, as in Lin 2004 with beta = 1).
"""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    text = _PUNCT.sub(" ", text.lower())
    return " ".join(w for w in text.split() if w not in {"a", "an", "the"})


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def contains(prediction: str, reference: str) -> float:
    """Lenient: the reference appears in the prediction (credits a right answer inside a long one)."""
    ref = normalize(reference)
    return float(bool(ref) and f" {ref} " in f" {normalize(prediction)} ")


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or common == 0:
        return float(pred == ref)
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    previous = [0] * (len(ref) + 1)
    for p in pred:
        current = [0]
        for j, r in enumerate(ref, start=1):
            current.append(previous[j - 1] + 1 if p == r else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


METRICS = {"exact_match": exact_match, "contains": contains, "token_f1": token_f1, "rouge_l": rouge_l}

# The headline metric per built-in task: exact match where the answer is a code, an expansion or
# a category name,
# overlap scores where it is free text.
PRIMARY_METRIC = {
    "icd_description_to_code": "exact_match",
    "abbreviation_expansion": "exact_match",
    "icd_chapter": "exact_match",
    "hpo_category": "exact_match",
    "icd_code_to_description": "token_f1",
    "hpo_definition": "rouge_l",
    "disease_phenotypes": "token_f1",
    "legal_faq": "token_f1",  # a paragraph of advice: overlap, not identity
    "shell_command": "token_f1",  # a command line: the right tool and flags count even if a path differs
}


def primary_metric(task: str, references: list[str]) -> str:
    """Built-in tasks use the table above; a user task is scored by exact match when every
    reference is at most four words (a code, a label, a name), by token F1 otherwise."""
    if task in PRIMARY_METRIC:
        return PRIMARY_METRIC[task]
    return "exact_match" if all(len(r.split()) <= 4 for r in references) else "token_f1"


def score_all(prediction: str, reference: str) -> dict[str, float]:
    return {name: fn(prediction, reference) for name, fn in METRICS.items()}
