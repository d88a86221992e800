"""Baselines that cannot be gamed, beside every domain-accuracy score: what a constant answer gets,
and (when the evaluation generated them) the base model's answers with k training examples.

Per task, from the training split alone: the most frequent training answer (the majority class of
a classification task), and a constant string of the most frequent training-answer words, as long
as the task's median answer (what an overlap metric rewards most cheaply). Each is scored on the
same questions with the same primary metric as the models. The fine-tuned model's gain is stated
over the best competitor of each task (the base model or a constant, whichever scores higher on
that task), with a 95 % confidence interval from a paired bootstrap over questions, stratified by
task (so every resample keeps each task's size and the macro mean stays a mean of tasks); the best
competitor is chosen again in every resample, so the interval carries the uncertainty of that
choice too.

Written here rather than taken from a library because no library ships constant-answer baselines;
the scores themselves come from metrics.text, the same functions as the models' scores.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict

import numpy as np

from loralab.metrics.text import METRICS, normalize, primary_metric

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def constant_answers(train_rows: list[dict]) -> dict[str, dict[str, str]]:
    """task -> {"majority": its most frequent training answer, "frequent_words": its most frequent
    answer words, as many as the median answer has}. Ties go to the answer or word seen first."""
    answers: dict[str, list[str]] = defaultdict(list)
    for row in train_rows:
        answers[row["task"]].append(row["answer"])
    constants = {}
    for task, texts in answers.items():
        words = Counter(w for text in texts for w in normalize(text).split())
        length = max(1, round(statistics.median(len(normalize(text).split()) for text in texts)))
        # Counted as the metrics compare them ("Yes" and "yes." are one answer), written as first seen.
        majority = Counter(normalize(text) for text in texts).most_common(1)[0][0]
        constants[task] = {"majority": next(text for text in texts if normalize(text) == majority),
                           "frequent_words": " ".join(w for w, _ in words.most_common(length))}
    return constants


def _question_scores(samples: list[dict], answer_of) -> dict[str, np.ndarray]:
    """task -> the primary-metric score of each question, for answers given by `answer_of(sample)`."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for sample in samples:
        by_task[sample["task"]].append(sample)
    scores = {}
    for task, rows in by_task.items():
        metric = METRICS[primary_metric(task, [r["reference"] for r in rows])]
        scores[task] = np.array([metric(answer_of(r), r["reference"]) for r in rows], dtype=np.float64)
    return scores


def compare_with_baselines(samples: list[dict], train_rows: list[dict]) -> dict:
    """Every competitor's per-task primary score on the generated questions (`samples`: task,
    reference, base and fine_tuned answers), and the fine-tuned gain over the best competitor of each
    task, per task and as a macro mean, each with a bootstrap 95 % interval (points of 0-100)."""
    constants = constant_answers(train_rows)
    competitors = {
        "base": _question_scores(samples, lambda s: s["base"]),
        "majority_answer": _question_scores(samples, lambda s: constants.get(s["task"], {}).get("majority", "")),
        "frequent_words": _question_scores(samples, lambda s: constants.get(s["task"], {}).get("frequent_words", "")),
    }
    if samples and all("few_shot_base" in s for s in samples):  # the base model shown k training examples
        competitors["few_shot_base"] = _question_scores(samples, lambda s: s["few_shot_base"])
    tuned = _question_scores(samples, lambda s: s["fine_tuned"])
    tasks = sorted(tuned)
    best = {t: max(competitors, key=lambda name: (competitors[name][t].mean(), name == "base")) for t in tasks}
    rng = np.random.default_rng(BOOTSTRAP_SEED)  # one stream: each task draws its own questions, independently
    draws = {t: rng.integers(0, len(tuned[t]), size=(BOOTSTRAP_RESAMPLES, len(tuned[t]))) for t in tasks}
    per_task, gain_draws = {}, []
    for t in tasks:
        draw = _gain_draws(tuned[t], [competitors[name][t] for name in competitors], draws[t])
        gain_draws.append(draw)
        low, high = np.percentile(draw, [2.5, 97.5])
        per_task[t] = {"n": len(tuned[t]),
                       "metric": primary_metric(t, [s["reference"] for s in samples if s["task"] == t]),
                       "fine_tuned": 100 * tuned[t].mean(),
                       **{name: 100 * scores[t].mean() for name, scores in competitors.items()},
                       "best_baseline": best[t], "gain": 100 * (tuned[t].mean() - competitors[best[t]][t].mean()),
                       "gain_ci95": [100 * float(low), 100 * float(high)], "constants": constants.get(t, {})}
    low, high = np.percentile(np.mean(gain_draws, axis=0), [2.5, 97.5])
    return {
        "per_task": per_task,
        "fine_tuned": 100 * float(np.mean([tuned[t].mean() for t in tasks])),
        "best_baseline": 100 * float(np.mean([competitors[best[t]][t].mean() for t in tasks])),
        "gain": float(np.mean([row["gain"] for row in per_task.values()])),
        "gain_ci95": [100 * float(low), 100 * float(high)],
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED,
                      "method": "paired percentile bootstrap over questions, stratified by task; the best "
                                "competitor chosen again in each resample"},
    }


def _gain_draws(tuned: np.ndarray, competitors: list[np.ndarray], picks: np.ndarray) -> np.ndarray:
    """The fine-tuned mean minus the best competitor's mean in each resample (the same questions for all)."""
    best = np.max([scores[picks].mean(axis=1) for scores in competitors], axis=0)
    return tuned[picks].mean(axis=1) - best
