"""Answer-quality metrics, and the chance correction that makes a task's primary metric uninflatable.

From libraries where one fits: chrF (sacrebleu's sentence chrF, character 6-grams, beta 2) and
ROUGE-L (Google's rouge-score, Porter stemming). Written by hand only where no offline library fits:
exact match and token F1 with SQuAD v1.1 normalisation (lower-casing, dropping punctuation and
articles; Hugging Face `evaluate` fetches its squad metric from the hub, unreachable here; the tests
check token F1 against rouge-score's ROUGE-1, the same bag-of-words F-measure), and `contains`.

Chance correction (`above_chance`): a task's primary score of an answer is its score against its own
reference minus its mean score against the other references of the task. Summed over a task, the two
terms of an answer that ignores its question (a constant string, a majority class, frequent words)
cancel exactly, so such an answer scores 0 however much an overlap metric or a skewed label
distribution would reward it raw; only what is specific to each question counts.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable
from functools import cache

import numpy as np

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


@cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


@cache
def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()  # sacrebleu's defaults: character 6-grams, no word n-grams, beta 2


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure with Porter stemming, from rouge-score (0-1)."""
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def chrf(prediction: str, reference: str) -> float:
    """Sentence chrF from sacrebleu, scaled to 0-1: character n-grams, so it credits a right word
    with another ending and is not fooled by word order alone."""
    return _chrf().sentence_score(prediction, [reference]).score / 100


METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match, "contains": contains, "token_f1": token_f1, "rouge_l": rouge_l, "chrf": chrf}

# The primary metric per built-in task: exact match where the answer is a code, an expansion or a
# category name; chrF where it is free text. Either is then corrected for chance (`above_chance`).
PRIMARY_METRIC = {
    "icd_description_to_code": "exact_match",
    "abbreviation_expansion": "exact_match",
    "icd_chapter": "exact_match",
    "hpo_category": "exact_match",
    "icd_code_to_description": "chrf",
    "hpo_definition": "chrf",
    "disease_phenotypes": "chrf",
    "legal_faq": "chrf",  # a paragraph of advice: overlap, not identity
    "shell_command": "chrf",  # a command line: the right tool and flags count even if a path differs
}


def primary_metric(task: str, references: list[str]) -> str:
    """Built-in tasks use the table above; a user task is scored by exact match when every
    reference is at most four words (a code, a label, a name), by chrF otherwise."""
    if task in PRIMARY_METRIC:
        return PRIMARY_METRIC[task]
    return "exact_match" if all(len(r.split()) <= 4 for r in references) else "chrf"


def score_all(prediction: str, reference: str) -> dict[str, float]:
    return {name: fn(prediction, reference) for name, fn in METRICS.items()}


def above_chance(metric: str, answers: list[str], references: list[str]) -> np.ndarray:
    """Per question i of one task: metric(answer_i, reference_i) minus the mean of
    metric(answer_i, reference_j) over the task's other questions j (uncorrected with a single question).
    The mean over the task of any answer that does not depend on its question is exactly 0."""
    return raw_and_above_chance(metric, answers, references)[1]


def raw_and_above_chance(metric: str, answers: list[str], references: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per question: the raw score metric(answer_i, reference_i), and the score above chance (above_chance)."""
    score, seen = METRICS[metric], {}

    def scored(answer: str, reference: str) -> float:  # a constant answer or a class label repeats
        if (answer, reference) not in seen:
            seen[(answer, reference)] = score(answer, reference)
        return seen[(answer, reference)]

    own = np.array([scored(a, r) for a, r in zip(answers, references)], dtype=np.float64)
    if len(answers) < 2:
        return own, own
    against_all = np.array([sum(scored(a, r) for r in references) for a in answers], dtype=np.float64)
    # Rounded so that a constant's exact 0 is not a float's 1e-17, which would rank it above a model's 0.
    return own, np.round(own - (against_all - own) / (len(references) - 1), 12) + 0.0  # + 0.0: no -0.0
