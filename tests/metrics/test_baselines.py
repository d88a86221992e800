"""Constant-answer baselines and the bootstrap interval of the fine-tuned gain (metrics/baselines.py),
and `loralab evaluate --rescore`, which adds them to stored answers without a model."""

import json
from contextlib import nullcontext

import pytest

from loralab.cli import main
from loralab.config import Config
from loralab.metrics import evaluate
from loralab.metrics.baselines import compare_with_baselines, constant_answers
from loralab.metrics.text import above_chance, chrf

TRAIN = ([{"task": "label", "answer": "Yes"}] * 3 + [{"task": "label", "answer": "No"}] * 2
         + [{"task": "text", "answer": "fracture of the left arm"}, {"task": "text", "answer": "fracture of the skull"},
            {"task": "text", "answer": "burn of the arm"}])


def test_the_constants_are_the_majority_answer_and_the_most_frequent_words():
    constants = constant_answers(TRAIN)
    assert constants["label"]["majority"] == "Yes"
    # counted as the metric compares answers: "no", "No." and "NO" are one answer, written as first seen
    assert constant_answers([{"task": "t", "answer": a} for a in ("Yes", "Yes", "no", "No.", "NO")])["t"]["majority"] == "no"
    # median answer 3 normalised words ("fracture of left arm" 4, "fracture of skull" 3, "burn of arm" 3)
    assert constants["text"]["frequent_words"] == "of fracture arm"


def samples(tuned: list[str], base: list[str], refs: list[str], task: str) -> list[dict]:
    return [{"task": task, "reference": r, "base": b, "fine_tuned": t} for t, b, r in zip(tuned, base, refs)]


def test_a_model_that_answers_the_constant_gains_nothing_and_a_right_one_gains_with_an_interval_above_zero():
    refs = ["Yes", "No", "Yes", "No", "Yes", "No", "Yes", "No"]
    parrot = compare_with_baselines(samples(["Yes"] * 8, ["maybe"] * 8, refs, "label"), TRAIN)
    row = parrot["per_task"]["label"]
    # Raw, the majority answer is right half the time; above chance, it and the parrot score exactly 0.
    assert row["raw"]["majority_answer"] == 50.0 and row["majority_answer"] == 0.0 and row["fine_tuned"] == 0.0
    # It is the majority answer, so no resample puts it above the best competitor: the interval ends at 0.
    assert row["gain"] == 0.0 and row["gain_ci95"][0] < 0.0 == row["gain_ci95"][1]
    right = compare_with_baselines(samples(refs, ["maybe"] * 8, refs, "label"), TRAIN)
    low, high = right["gain_ci95"]
    # Each right answer: 1 against its own reference, minus 3/7 against the other seven (three share it).
    assert right["gain"] == pytest.approx(100 * 4 / 7) and 0 < low < right["gain"] <= high + 1e-9


def test_a_gain_that_cancels_to_zero_reads_0_not_minus_0():
    from loralab.metrics.baselines import _points

    # A float difference of two equal means can be -1e-17; the report printed it as "-0.0".
    assert f"{_points(-1e-17):+.1f}" == "+0.0" and f"{_points(0.25 - 0.25):.1f}" == "0.0" and _points(0.1234) == 12.34


def test_no_answer_that_ignores_its_question_scores_above_zero_however_much_the_raw_metric_gives_it():
    references = ["fracture of the left arm", "fracture of the skull", "burn of the arm", "fracture of rib"]
    for metric in ("chrf", "exact_match", "token_f1", "rouge_l"):
        for constant in ("fracture of the arm", "of", "fracture of the skull"):
            assert above_chance(metric, [constant] * 4, references).mean() == pytest.approx(0.0, abs=1e-12)
    assert chrf("fracture of the arm", references[0]) > 0.5  # raw, the constant scores well
    assert above_chance("chrf", references, references).mean() > 0.3  # each right answer is specific


def test_the_gain_is_over_the_best_competitor_of_each_task_and_macro_averaged():
    label = samples(["Yes", "No"], ["Yes", "No"], ["Yes", "No"], "label")  # the base model is right: gain 0
    references = ["arm fracture of the humerus bone here", "burn of the skin on the left hand, second degree"]
    text = samples(references, ["fracture", "fracture"], references, "text")  # over four words: chrF
    result = compare_with_baselines(label + text, TRAIN)
    assert result["per_task"]["label"]["best_baseline"] == "base" and result["per_task"]["label"]["gain"] == 0.0
    text_row = result["per_task"]["text"]
    assert text_row["metric"] == "chrf" and text_row["frequent_words"] == 0.0 and text_row["raw"]["frequent_words"] > 0
    assert 0 < text_row["gain"] <= 100
    assert result["gain"] == pytest.approx((0.0 + text_row["gain"]) / 2)
    assert result["by_metric"]["chrf"]["gain"] == pytest.approx(text_row["gain"])
    assert result["by_metric"]["exact_match"]["tasks"] == ["label"]


def test_rescore_adds_the_baselines_to_stored_answers_without_a_model(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train_split.json").write_text(json.dumps(TRAIN))
    results_dir = tmp_path / "out"
    results_dir.mkdir()
    model = {"perplexity": 2.0, "examples_scored": 2, "per_task_ppl": {"label": 2.0}, "domain_accuracy": 50.0,
             "domain_accuracy_se": 1.0, "per_task": {"label": {"n": 2, "primary_metric": "exact_match", "primary": 0.5,
                                                             "primary_se": 0.5, "exact_match": 0.5, "contains": 0.5}}}
    stored = {"split": "test", "examples": 2, "generation_examples": 2, "adapter_dir": "lora", "base_model": "m",
              "models": {"base": model, "fine_tuned": model},
              "summary": {"perplexity_ratio_base_over_tuned": 1.0, "domain_accuracy_gain_points": 0.0},
              "samples": samples(["Yes", "No"], ["No", "No"], ["Yes", "No"], "label"), "showcase": []}
    (results_dir / "eval_results.json").write_text(json.dumps(stored))
    args = ["evaluate", "--rescore", "--set", f"data.out_dir={tmp_path / 'data'}", "--set", f"eval.results_dir={results_dir}"]
    assert main(args) == 0
    rescored = json.loads((results_dir / "eval_results.json").read_text())
    assert rescored["baselines"]["per_task"]["label"]["gain"] == 100.0  # right and specific; constants score 0
    tuned, base = rescored["models"]["fine_tuned"], rescored["models"]["base"]
    assert tuned["domain_accuracy"] == 100.0 and base["domain_accuracy"] == 0.0  # scored again with today's metric
    assert tuned["perplexity"] == 2.0 and rescored["samples"] == stored["samples"]  # what the models said stays
    assert rescored["summary"]["domain_accuracy_gain_points"] == 100.0
    assert "## Against baselines" in (results_dir / "report.md").read_text()
    stored["samples"] = stored["samples"][:1]  # not every generated answer: refused, nothing rewritten
    (results_dir / "eval_results.json").write_text(json.dumps(stored))
    assert main(args) == 2


def conversation(task: str, question: str, answer: str) -> dict:
    return {"task": task, "question": question, "answer": answer,
            "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def test_few_shot_prepends_the_first_k_training_conversations_of_the_same_task():
    train = [conversation("a", "qa1", "A1"), conversation("b", "qb1", "B1"), conversation("a", "qa2", "A2")]
    (row,) = evaluate.with_examples([conversation("a", "q", "ref")], train, 2)
    assert [m["content"] for m in row["messages"]] == ["qa1", "A1", "qa2", "A2", "q", "ref"]


def test_few_shot_chooses_k_on_the_eval_split_then_answers_the_test_questions(tmp_path, monkeypatch):
    """A stand-in model that answers right only when shown exactly 3 examples: k=3 is chosen, on eval rows."""
    splits = {"train": [conversation("t", f"train {i}", f"answer {i}") for i in range(5)],
              "eval": [conversation("t", f"eval {i}", f"yes {i}") for i in range(4)],
              "test": [conversation("t", f"test {i}", f"yes {i}") for i in range(3)]}
    for name, rows in splits.items():
        (tmp_path / f"{name}_split.json").write_text(json.dumps(rows))
    seen = []

    def fake_generate(model, tokenizer, rows, *args, desc):
        seen.append((desc, [r["question"] for r in rows]))
        return [r["answer"] if len(r["messages"]) == 2 * 3 + 2 else "no" for r in rows]

    monkeypatch.setattr(evaluate, "generate_answers", fake_generate)
    cfg = Config()
    cfg.data.out_dir = str(tmp_path)
    cfg.eval.few_shot_ks, cfg.eval.few_shot_eval_per_task = [1, 3, 5], 2
    result = evaluate.few_shot_answers(None, None, cfg, splits["test"], "cpu", None)
    assert result["k"] == 3 and result["eval_domain_accuracy_by_k"] == {"1": 0.0, "3": 100.0, "5": 0.0}
    assert all(question.startswith("eval") for desc, questions in seen[:3] for question in questions)
    assert seen[-1][1] == ["test 0", "test 1", "test 2"] and result["answers"] == ["yes 0", "yes 1", "yes 2"]


def test_recall_asks_training_facts_as_trained_and_in_new_words_and_reports_both(tmp_path, monkeypatch):
    """A stand-in fine-tuned model that remembers the training sentence but not the fact: right as trained,
    wrong in new words; the report says so."""
    train = [{**conversation("t", f"train {i}", f"fact {i}"), "paraphrase": f"reworded {i}"} for i in range(4)]
    train.append(conversation("t", "no second phrasing", "fact x"))
    (tmp_path / "train_split.json").write_text(json.dumps(train))
    assert [r["question"] for r in evaluate.recall_rows(train, 3)] == ["train 0", "train 1", "train 2"]
    (asked,) = evaluate.as_paraphrased(train[:1])
    assert asked["messages"] == [{"role": "user", "content": "reworded 0"}, {"role": "assistant", "content": "fact 0"}]

    def fake_generate(model, tokenizer, rows, *args, desc):
        return [r["answer"] if model == "fine_tuned" and r["question"].startswith("train") else "?" for r in rows]

    monkeypatch.setattr(evaluate, "generate_answers", fake_generate)
    cfg = Config()
    cfg.data.out_dir, cfg.eval.results_dir, cfg.eval.recall_per_task = str(tmp_path), str(tmp_path / "out"), 4
    recall = evaluate.recall_samples(cfg, lambda name: (name, nullcontext()), None, "cpu", None)
    assert [s["fine_tuned_as_trained"] for s in recall] == ["fact 0", "fact 1", "fact 2", "fact 3"]
    assert [s["fine_tuned"] for s in recall] == ["?"] * 4 and recall[0]["paraphrase"] == "reworded 0"
    model = {"perplexity": 2.0, "examples_scored": 1, "per_task_ppl": {"t": 2.0},
             **evaluate.score_answers([{"task": "t", "answer": "fact 9"}], ["fact 9"])}
    results = {"split": "test", "generation_examples": 1, "adapter_dir": "lora", "base_model": "m",
               "models": {"base": model, "fine_tuned": model}, "showcase": [],
               "summary": {"perplexity_ratio_base_over_tuned": 1.0, "domain_accuracy_gain_points": 0.0},
               "samples": samples(["fact 9"], ["?"], ["fact 9"], "t"), "recall": {"questions": 4, "samples": recall}}
    evaluate._write_with_baselines(results, cfg)
    written = json.loads((tmp_path / "out" / "eval_results.json").read_text())["recall"]
    assert written["as_trained"]["per_task"]["t"]["fine_tuned"] == 100.0  # exact match above chance: 1 - 0
    assert written["paraphrased"]["per_task"]["t"]["fine_tuned"] == 0.0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Recall of training facts" in report and "| t | exact_match | 0.0 | 100.0 | 0.0 | 0.0 |" in report
