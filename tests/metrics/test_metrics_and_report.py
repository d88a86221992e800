import math

import pytest

from loralab.config import Config
from loralab.metrics.evaluate import generation_subset, score_answers
from loralab.metrics.report import write_report
from loralab.metrics.text import contains, exact_match, primary_metric, rouge_l, token_f1


def test_metric_definitions():
    assert exact_match("The Twice a day.", "twice a day") == 1.0
    assert exact_match("twice daily", "twice a day") == 0.0
    assert contains("It means twice a day, usually.", "twice a day") == 1.0
    assert contains("twice", "twice a day") == 0.0
    assert token_f1("red blood cell", "red cell count") == pytest.approx(2 / 3)
    assert rouge_l("a b c d", "a c d e") == pytest.approx(2 / 3)  # "b c d" vs "c d e" (articles dropped): LCS 2 of 3
    assert rouge_l("x y z", "p q") == 0.0
    assert primary_metric("icd_description_to_code", ["E11.9"]) == "exact_match"
    assert primary_metric("user_task", ["short label", "two words"]) == "exact_match"
    assert primary_metric("user_task", ["a much longer free text answer here"]) == "token_f1"


def test_scores_are_macro_means_with_standard_errors():
    rows = [{"task": "abbreviation_expansion", "answer": "twice a day"}] * 4 + [{"task": "hpo_definition", "answer": "a b"}] * 2
    answers = ["twice a day", "twice a day", "no", "no", "a b", "a b"]
    scores = score_answers(rows, answers)
    assert scores["per_task"]["abbreviation_expansion"]["primary"] == 0.5
    assert scores["per_task"]["abbreviation_expansion"]["primary_se"] == pytest.approx(math.sqrt((4 * 0.25 / 3) / 4))
    assert scores["per_task"]["hpo_definition"]["primary"] == 1.0
    assert scores["domain_accuracy"] == pytest.approx(75.0)


def test_generation_subset_takes_the_first_n_per_task():
    rows = [{"task": t, "i": i} for i, t in enumerate("aabbbac")]
    assert [r["i"] for r in generation_subset(rows, 2)] == [0, 1, 2, 3, 6]


def test_report_renders_tables_plots_and_escapes_cells(tmp_path):
    cfg = Config()
    cfg.eval.results_dir = str(tmp_path / "out")  # report.md and plots/ are derived from it
    model = {"perplexity": 10.0, "examples_scored": 2, "per_task_ppl": {"t": 10.0},
             **score_answers([{"task": "t", "answer": "x"}], ["x"])}
    results = {"split": "test", "generation_examples": 1, "adapter_dir": "lora", "base_model": "m",
               "models": {"base": model, "fine_tuned": model},
               "summary": {"perplexity_ratio_base_over_tuned": 1.0, "domain_accuracy_gain_points": 0.0},
               "showcase": [{"task": "t", "question": "a | b", "reference": "x", "base": "y\nz", "fine_tuned": "x"}]}
    write_report(results, cfg)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "a \\| b" in report and "| y z |" in report
    assert "(plots/accuracy_by_task.png)" in report  # linked relative to the report
    assert (tmp_path / "out" / "plots" / "perplexity_by_task.png").stat().st_size > 1000
