"""Baselines that cannot be gamed, beside every domain-accuracy score: what a constant answer gets,
and (when the evaluation generated them) the base model's answers with k training examples.

Per task, from the training split alone: the most frequent training answer (the majority class of
a classification task), and a constant string of the most frequent training-answer words, as long
as the task's median answer (what an overlap metric rewards most cheaply). Each is scored on the
same questions with the same primary metric as the models, corrected for chance (metrics.text.
above_chance), under which a constant scores 0 by construction: the constants stay in the table, with
their raw scores beside, as the check that the correction holds on real data. The fine-tuned model's gain is stated
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

from loralab.metrics.text import normalize, primary_metric, raw_and_above_chance

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


def _points(mean: float) -> float:
    """A 0-1 mean in points, rounded so that a constant's sum of cancelling terms reads 0.0, not -0.0."""
    return round(100 * float(mean), 9) + 0.0


def _by_task(samples: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for sample in samples:
        groups[sample["task"]].append(sample)
    return groups


def _question_scores(groups: dict[str, list[dict]], answer_of) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """For answers given by `answer_of(sample)`: task -> each question's primary score above chance, and
    task -> 100 x the mean raw score (before the chance correction, for the report's side table)."""
    scores, raw_means = {}, {}
    for task, rows in groups.items():
        references = [r["reference"] for r in rows]
        raw, scores[task] = raw_and_above_chance(primary_metric(task, references), [answer_of(r) for r in rows], references)
        raw_means[task] = 100 * float(raw.mean())
    return scores, raw_means


def compare_with_baselines(samples: list[dict], train_rows: list[dict]) -> dict:
    """Every competitor's per-task primary score above chance on the generated questions (`samples`:
    task, reference, base and fine_tuned answers), and the fine-tuned gain over the best competitor of
    each task, per task and as a macro mean, each with a bootstrap 95 % interval (points of 0-100)."""
    constants = constant_answers(train_rows)
    answer_of = {
        "base": lambda s: s["base"],
        "majority_answer": lambda s: constants.get(s["task"], {}).get("majority", ""),
        "frequent_words": lambda s: constants.get(s["task"], {}).get("frequent_words", ""),
    }
    if samples and all("few_shot_base" in s for s in samples):  # the base model shown k training examples
        answer_of["few_shot_base"] = lambda s: s["few_shot_base"]
    groups = _by_task(samples)
    scored = {name: _question_scores(groups, fn) for name, fn in {**answer_of, "fine_tuned": lambda s: s["fine_tuned"]}.items()}
    raw = {name: raw_means for name, (_, raw_means) in scored.items()}
    tuned = scored.pop("fine_tuned")[0]
    competitors = {name: above for name, (above, _) in scored.items()}
    tasks = sorted(tuned)
    best = {t: max(competitors, key=lambda name: (competitors[name][t].mean(), name == "base")) for t in tasks}
    rng = np.random.default_rng(BOOTSTRAP_SEED)  # one stream: each task draws its own questions, independently
    draws = {t: rng.integers(0, len(tuned[t]), size=(BOOTSTRAP_RESAMPLES, len(tuned[t]))) for t in tasks}
    per_task, gain_draws = {}, {}
    for t in tasks:
        draw = gain_draws[t] = _gain_draws(tuned[t], [competitors[name][t] for name in competitors], draws[t])
        low, high = np.percentile(draw, [2.5, 97.5])
        per_task[t] = {"n": len(tuned[t]),
                       "metric": primary_metric(t, [s["reference"] for s in samples if s["task"] == t]),
                       "fine_tuned": _points(tuned[t].mean()),
                       **{name: _points(scores[t].mean()) for name, scores in competitors.items()},
                       "best_baseline": best[t], "gain": _points(tuned[t].mean() - competitors[best[t]][t].mean()),
                       "gain_ci95": [100 * float(low), 100 * float(high)], "constants": constants.get(t, {}),
                       "raw": {name: means[t] for name, means in raw.items()}}
    metrics = sorted({row["metric"] for row in per_task.values()})
    return {
        "per_task": per_task,
        **_macro(per_task, gain_draws, tasks),
        "by_metric": {m: {"tasks": [t for t in tasks if per_task[t]["metric"] == m],
                          **_macro(per_task, gain_draws, [t for t in tasks if per_task[t]["metric"] == m])}
                      for m in metrics},
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED,
                      "method": "paired percentile bootstrap over questions, stratified by task; the best "
                                "competitor chosen again in each resample"},
    }


def _macro(per_task: dict, gain_draws: dict[str, np.ndarray], tasks: list[str]) -> dict:
    """The macro means over `tasks` of the fine-tuned score, the best competitor's and the gain, with
    the gain's 95 % interval from the tasks' resampled gains averaged draw by draw."""
    low, high = np.percentile(np.mean([gain_draws[t] for t in tasks], axis=0), [2.5, 97.5])
    return {"fine_tuned": float(np.mean([per_task[t]["fine_tuned"] for t in tasks])),
            "best_baseline": float(np.mean([per_task[t][per_task[t]["best_baseline"]] for t in tasks])),
            "gain": float(np.mean([per_task[t]["gain"] for t in tasks])),
            "gain_ci95": [100 * float(low), 100 * float(high)]}


def _gain_draws(tuned: np.ndarray, competitors: list[np.ndarray], picks: np.ndarray) -> np.ndarray:
    """The fine-tuned mean minus the best competitor's mean in each resample (the same questions for all)."""
    best = np.max([scores[picks].mean(axis=1) for scores in competitors], axis=0)
    return tuned[picks].mean(axis=1) - best
