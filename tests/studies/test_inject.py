"""`loralab inject` (studies/inject.py) on a tiny model: the runs it trains, what it measures, resuming,
and the one-line refusals before any training."""

import json
from pathlib import Path

import pytest

from loralab.data.prepare import prepare_dataset
from loralab.studies.inject import run_inject, study_points
from loralab.util.errors import LoralabError

from helpers.data import QA_ROWS, write_jsonl


def _with_paraphrases(cfg, tmp_path: Path):
    rows = [{**row, "paraphrase": f"Reworded: {row['question']}"} for row in QA_ROWS]
    cfg.data.dataset = str(write_jsonl(tmp_path / "qa_paraphrased.jsonl", rows))
    prepare_dataset(cfg.data)
    ic = cfg.inject
    ic.facts_per_task, ic.epochs, ic.variants, ic.general_questions, ic.eval_examples = 3, [1, 2], {"rank 4": {"lora.r": 4}}, 4, 4
    cfg.train.batch_size = 2  # 6 facts: 3 steps an epoch
    return cfg


def test_inject_trains_each_epoch_count_and_variant_on_the_facts_and_measures_recall_and_forgetting(tiny_config, tmp_path):
    cfg = _with_paraphrases(tiny_config, tmp_path)
    assert [p.label for p in study_points(cfg)] == ["default, 1 epoch", "default, 2 epochs", "rank 4, 2 epochs"]
    summary = run_inject(cfg)
    runs = {row["label"]: row for row in summary["runs"]}
    assert list(runs) == ["base", "default, 1 epoch", "default, 2 epochs", "rank 4, 2 epochs"]
    assert summary["facts"] == 6 and summary["tasks"] == ["t1", "t2"]  # 3 per task, each with its second phrasing
    facts = json.loads((Path(cfg.inject.runs_dir) / "facts" / "train_split.json").read_text())
    assert all(f["paraphrase"].startswith("Reworded: ") for f in facts)
    assert (runs["default, 1 epoch"]["steps"], runs["default, 2 epochs"]["steps"]) == (3, 6)
    for row in runs.values():
        assert set(row["as_trained"]["by_metric"]) == set(row["paraphrased"]["by_metric"]) == {"chrf"}
        assert 0 <= row["as_trained"]["exact"] <= 6 and row["general"]["questions"] == 4
    # the adapters changed the model: its forgetting probe moved away from the base model's
    assert runs["default, 2 epochs"]["general"]["text_perplexity"] != pytest.approx(runs["base"]["general"]["text_perplexity"])
    text = Path(cfg.inject.summary_md).read_text()
    assert "| rank 4, 2 epochs | 2 |" in text and "The default configuration (default, 1 epoch)" in text
    assert Path(cfg.inject.plot).stat().st_size > 10_000
    assert json.loads(Path(cfg.inject.results_json).read_text())["provenance"]["config"]["inject"]["epochs"] == [1, 2]

    cells = Path(cfg.inject.runs_dir) / "cells.json"
    stamp = cells.stat().st_mtime_ns
    assert run_inject(cfg)["runs"] == summary["runs"] and cells.stat().st_mtime_ns == stamp  # nothing redone


def test_inject_refuses_a_misspelt_variant_and_data_without_second_phrasings_before_training(tiny_config, tmp_path):
    cfg = _with_paraphrases(tiny_config, tmp_path)
    cfg.inject.variants = {"typo": {"lora.rank": 4}}
    with pytest.raises(LoralabError, match=r"inject.variants\[.typo.\]: .*unknown key .rank."):
        run_inject(cfg)
    cfg.inject.variants = {}
    cfg.data.dataset = str(write_jsonl(tmp_path / "plain.jsonl", QA_ROWS))
    prepare_dataset(cfg.data)
    with pytest.raises(LoralabError, match="no row with a second phrasing"):
        run_inject(cfg)
    assert not (Path(cfg.inject.runs_dir) / "adapters").exists()
