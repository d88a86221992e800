"""`loralab compare` on a tiny random Llama: per-method learning-rate choice on the eval split,
seeds measured on the test split, results that survive a re-run, and early errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loralab.studies.compare import compare, lr_beyond_edge
from loralab.util.errors import LoralabError


def _configure(cfg, tmp_path: Path):
    cc = cfg.compare
    cc.methods = ["lora", "full"]
    cc.seeds = [1, 2]  # the learning-rate search runs with seed 0: none of the reported ones
    cc.learning_rates = {"lora": [1e-4, 2e-2], "full": [1e-4]}
    cc.lr_extensions = 0  # the record count below is exact; lr_beyond_edge has its own test
    cc.train_examples = 8
    cc.eval_examples = 4
    cc.generation_per_task = 1
    cc.runs_dir = str(tmp_path / "runs")
    cc.results_dir = str(tmp_path / "results")  # records in results/compare_runs/
    cfg.eval.max_new_tokens = 4
    return cfg


def test_compare_chooses_lr_per_method_and_measures_seeds_on_test(tiny_config, tmp_path):
    cfg = _configure(tiny_config, tmp_path)
    summary = compare(cfg)
    assert set(summary["methods"]) == {"lora", "full"}
    lora = summary["methods"]["lora"]
    assert lora["learning_rate"] == min(lora["lr_search"], key=lambda s: s["eval_loss"])["learning_rate"]
    assert [r["seed"] for r in lora["runs"]] == [1, 2]
    assert summary["lr_seed"] == 0 and "eval-split loss" in summary["choices"]
    searched = [json.loads((Path(s["run_dir"]) / "record.json").read_text())["params"] for s in lora["lr_search"]]
    assert {p["train.seed"] for p in searched} == {0} and {r["params"]["train.seed"] for r in lora["runs"]} == {1, 2}
    assert all(r["test"]["perplexity"] > 1 for r in lora["runs"])
    assert lora["runs"][0]["params"] != lora["runs"][1]["params"]  # the seeds really differ
    assert summary["methods"]["full"]["trainable_parameters"] > 10 * lora["trainable_parameters"]
    assert json.loads(Path(cfg.compare.results_json).read_text())["methods"].keys() == summary["methods"].keys()
    table = Path(cfg.compare.summary_md).read_text()
    assert "| lora |" in table and "| full |" in table
    assert (Path(cfg.compare.plots_dir) / "quality_tradeoffs.png").stat().st_size > 10_000

    records = sorted(Path(cfg.compare.runs_dir).glob("*/record.json"))
    assert len(records) == 7  # lora: 2 lrs (seed 0) + seeds 1 and 2; full: 1 lr + seeds 1 and 2
    stamps = [p.stat().st_mtime_ns for p in records]
    again = compare(cfg)  # finished runs are reused, not retrained
    assert [p.stat().st_mtime_ns for p in records] == stamps
    assert again["methods"]["lora"]["test_perplexity"] == lora["test_perplexity"]
    import shutil

    shutil.rmtree(cfg.compare.runs_dir)  # a fresh clone: only the committed record store is left
    assert len(list(Path(cfg.compare.records_dir).glob("*.json"))) == 7
    fresh = compare(cfg)
    assert not Path(cfg.compare.runs_dir).exists()  # nothing retrained
    assert fresh["methods"] == again["methods"]


def test_compare_refuses_bad_methods_before_training(tiny_config, tmp_path):
    cfg = _configure(tiny_config, tmp_path)
    cfg.compare.methods = ["lora", "superlora"]
    with pytest.raises(LoralabError, match="lora.method='superlora'"):
        compare(cfg)
    cfg.compare.methods = ["lora"]
    cfg.compare.learning_rates = {"lora": []}
    with pytest.raises(LoralabError, match="compare.learning_rates.lora"):
        compare(cfg)
    assert not Path(cfg.compare.runs_dir).exists()


def test_lr_grid_extends_past_an_edge_only_while_the_edge_wins():
    grid = [1e-3, 3e-3, 1e-2]
    search = [{"learning_rate": lr, "eval_loss": loss} for lr, loss in zip(grid, [2.9, 2.7, 2.5])]
    assert lr_beyond_edge(search, grid, 2) == 0.032  # best at the top: one step (sqrt 10) further
    search.append({"learning_rate": 0.032, "eval_loss": 2.4})
    assert lr_beyond_edge(search, grid, 2) == 0.1
    assert lr_beyond_edge(search, grid, 1) is None  # the extension budget is spent
    search[-1]["eval_loss"] = float("nan")  # a diverged extension never wins: 1e-2 is inside now
    assert lr_beyond_edge(search, grid, 2) is None
    low = [{"learning_rate": lr, "eval_loss": loss} for lr, loss in zip(grid, [2.4, 2.7, 2.9])]
    assert lr_beyond_edge(low, grid, 2) == 0.00032
    inside = [{"learning_rate": lr, "eval_loss": loss} for lr, loss in zip(grid, [2.9, 2.5, 2.7])]
    assert lr_beyond_edge(inside, grid, 2) is None
    assert lr_beyond_edge(inside[:1], [1e-3], 2) is None
