"""End to end with the real bundled SmolLM2-135M-Instruct on a handful of medical examples."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from loralab.config import Config
from loralab.data.prepare import prepare_dataset
from loralab.metrics.evaluate import evaluate_model_pair
from loralab.training.recipe import train

from helpers.data import outputs_under

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def trained(tmp_path_factory, smol_dir):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = outputs_under(Config(), tmp)
    cfg.model.cache_dir = str(smol_dir.parent)
    cfg.data.builtin_per_task = {task: 20 for task in cfg.data.builtin_per_task}
    cfg.train.learning_rate = 1e-3
    cfg.train.batch_size = 4
    cfg.train.max_steps = 8
    cfg.train.eval_every = 4
    cfg.train.eval_examples = 16
    cfg.eval.generation_per_task = 1
    cfg.eval.max_new_tokens = 16
    cfg.eval.few_shot_ks = [1, 2]
    cfg.eval.few_shot_eval_per_task = 1
    cfg.eval.recall_per_task = 1  # the recall test's logic is tests/metrics/test_baselines.py's; here it only runs
    prepare_dataset(cfg.data)
    result = train(cfg, quiet=True)
    return cfg, result


def test_a_few_steps_lower_the_eval_loss(trained):
    cfg, result = trained
    log = [json.loads(text) for text in (Path(cfg.train.run_dir) / "log.jsonl").read_text().splitlines()]
    evals = [e["eval_loss"] for e in log if e["eval_loss"] is not None]
    assert len(evals) == 2 and evals[-1] < evals[0]
    assert result.final_train_loss < log[0]["loss"]


def test_adapter_reloads_with_plain_peft_and_merges_to_the_same_logits(trained, smol_dir):
    cfg, result = trained
    adapter_config = json.loads((Path(result.adapter_dir) / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What does the medical abbreviation 'BID' stand for?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(smol_dir)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        model = PeftModel.from_pretrained(base, result.adapter_dir)
        adapted = model(input_ids=ids).logits
        assert (adapted - base_logits).abs().max() > 1e-3  # the adapter does something
        merged = model.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-3, atol=1e-3)


def test_evaluation_writes_results_and_report(trained):
    cfg, _ = trained
    results = evaluate_model_pair(cfg, quiet=True)
    for name in ("base", "fine_tuned"):
        model = results["models"][name]
        assert model["perplexity"] > 1 and 0 <= model["domain_accuracy"] <= 100
        assert set(model["per_task"]) == set(cfg.data.builtin_per_task)
    report = Path(cfg.eval.report_md).read_text()
    assert "| answer perplexity" in report and "## Before and after" in report
    assert results["few_shot"]["k"] in (1, 2) and set(results["few_shot"]["eval_domain_accuracy_by_k"]) == {"1", "2"}
    assert all(s["few_shot_base"] is not None for s in results["samples"]) and "few-shot base |" in report
    assert set(results["baselines"]["per_task"]) == set(cfg.data.builtin_per_task)
    assert Path(cfg.eval.plots_dir, "accuracy_by_task.png").is_file()
    assert json.loads(Path(cfg.eval.results_json).read_text())["summary"]["perplexity_ratio_base_over_tuned"] > 0
