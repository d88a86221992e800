import math

import pytest

from loralab.config import Config
from loralab.metrics.evaluate import generation_subset, score_answers
from loralab.metrics.report import write_report
from loralab.metrics.text import chrf, contains, exact_match, primary_metric, rouge_l, token_f1


def test_metric_definitions():
    assert exact_match("The Twice a day.", "twice a day") == 1.0
    assert exact_match("twice daily", "twice a day") == 0.0
    assert contains("It means twice a day, usually.", "twice a day") == 1.0
    assert contains("twice", "twice a day") == 0.0
    assert token_f1("red blood cell", "red cell count") == pytest.approx(2 / 3)
    assert rouge_l("fractures of the arms", "fracture of the arm") == 1.0  # rouge-score, Porter-stemmed
    assert rouge_l("x y z", "p q") == 0.0
    assert chrf("fracture of the arm", "fracture of the arm") == 1.0 and chrf("xyz", "fracture") == 0.0
    assert primary_metric("icd_description_to_code", ["E11.9"]) == "exact_match"
    assert primary_metric("hpo_definition", ["a definition"]) == "chrf"
    assert primary_metric("user_task", ["short label", "two words"]) == "exact_match"
    assert primary_metric("user_task", ["a much longer free text answer here"]) == "chrf"


def test_hand_written_token_f1_agrees_with_rouge_score_unigram_f_measure():
    """Token F1 is ROUGE-1's bag-of-words F-measure; on texts without articles (which SQuAD
    normalisation drops and rouge-score keeps) the two agree."""
    from rouge_score import rouge_scorer

    rouge1 = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    pairs = [("red blood cell count", "red cell count"), ("fracture of left arm, closed", "closed fracture of arm"),
             ("x y z", "p q"), ("ab ab ab cd", "ab cd cd"), ("Type 2 diabetes mellitus", "diabetes mellitus type 2")]
    for prediction, reference in pairs:
        expected = rouge1.score(reference, prediction)["rouge1"].fmeasure
        assert token_f1(prediction, reference) == pytest.approx(expected)


def test_scores_are_chance_corrected_means_with_standard_errors_and_one_headline_per_metric():
    rows = ([{"task": "abbreviation_expansion", "answer": a} for a in ("twice a day", "at night", "by mouth", "as needed")]
            + [{"task": "hpo_definition", "answer": a} for a in ("swelling of the knee joint", "loss of hair on the scalp")])
    answers = ["twice a day", "at night", "no", "no", "swelling of the knee joint", "loss of hair on the scalp"]
    scores = score_answers(rows, answers)
    expansion = scores["per_task"]["abbreviation_expansion"]
    assert expansion["primary_raw"] == 0.5 and expansion["primary"] == 0.5  # no reference repeats: chance is 0
    assert expansion["primary_se"] == pytest.approx(math.sqrt((4 * 0.25 / 3) / 4))
    definition = scores["per_task"]["hpo_definition"]
    assert definition["primary_metric"] == "chrf" and definition["primary_raw"] == 1.0
    assert 0.5 < definition["primary"] < 1.0  # less what each answer shares with the other reference
    assert scores["by_metric"]["exact_match"] == {"tasks": ["abbreviation_expansion"], "score": 50.0}
    assert scores["by_metric"]["chrf"]["score"] == pytest.approx(100 * definition["primary"])
    assert scores["domain_accuracy"] == pytest.approx(50 * (0.5 + definition["primary"]))


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
