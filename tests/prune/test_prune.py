"""Pruning on tiny random models: exact sparsity, Wanda's scores by hand, structured removal equal to
the masked model it stands for, pruned directories that reload, recovery, the study, and bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from loralab.cli import main
from loralab.config import load_config
from loralab.data.prepare import load_split
from loralab.prune.calibration import calibrate, calibration_batches
from loralab.prune.prune import REPORT_FILE, prune, prune_model, save_pruned
from loralab.prune.unstructured import decoder_linears, lowest_mask, n_of_m_mask, wanda_scores
from loralab.util.errors import LoralabError


def _model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _rows(cfg):
    return load_split(cfg.data.out_dir, "train")[:8]


def _batch(cfg, tokenizer):
    return calibration_batches(tokenizer, _rows(cfg), 128, batch_size=8)[0]


def test_wanda_scores_and_row_mask_match_a_hand_computed_example():
    weight = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    inputs = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # two tokens, two input channels
    norms = inputs.pow(2).sum(0).sqrt()  # [sqrt(10), sqrt(20)]
    scores = wanda_scores(weight, norms)
    expected = torch.tensor([[math.sqrt(10), 2 * math.sqrt(20)], [3 * math.sqrt(10), 0.5 * math.sqrt(20)]])
    assert torch.allclose(scores, expected)
    # per row, half of the weights go: row 0 drops its first weight, row 1 its second
    assert lowest_mask(scores, 0.5, per_row=True).tolist() == [[False, True], [True, False]]
    # magnitude over the whole matrix would drop both small weights instead
    assert lowest_mask(weight.abs(), 0.5, per_row=False).tolist() == [[False, True], [True, False]]
    assert lowest_mask(torch.tensor([[4.0, 1.0], [2.0, 3.0]]), 0.5, per_row=False).tolist() == [[True, False], [False, True]]


def test_calibration_norms_are_those_of_the_real_inputs(tiny_config, tiny_llama_dir, smol_tokenizer):
    model = _model(tiny_llama_dir)
    batch = _batch(tiny_config, smol_tokenizer)
    seen = []
    hook = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    hook.remove()
    real = seen[0].reshape(-1, seen[0].shape[-1])[batch["attention_mask"].reshape(-1).bool()]
    calib = calibrate(model, [batch])
    assert calib.tokens == int(batch["attention_mask"].sum())
    assert torch.allclose(calib.input_norms["1.mlp.down_proj"], real.pow(2).sum(0).sqrt(), rtol=1e-4)
    assert len(calib.layer_influence) == 2 and all(v > 0 for v in calib.layer_influence)


@pytest.mark.parametrize("method,sparsity", [("magnitude", 0.3), ("wanda", 0.5), ("wanda-2:4", 0.5)])
def test_unstructured_sparsity_is_the_requested_one_in_every_layer(tiny_config, tiny_llama_dir, smol_tokenizer,
                                                                    method, sparsity):
    model = _model(tiny_llama_dir)
    report = prune_model(model, smol_tokenizer, method, sparsity, _rows(tiny_config), 128)
    for name, linear in decoder_linears(model).items():
        zeros = (linear.weight == 0)
        if method == "magnitude":
            assert zeros.sum().item() == round(sparsity * linear.weight.numel()), name
        else:  # per output row
            assert (zeros.sum(1) == round(sparsity * linear.weight.shape[1])).all(), name
        if method == "wanda-2:4":
            assert (zeros.reshape(zeros.shape[0], -1, 4).sum(-1) == 2).all(), name
    assert report["parameters_after"] == report["parameters_before"]
    assert abs(report["decoder_linear_sparsity"] - sparsity) < 0.01


def test_n_of_m_keeps_the_two_largest_of_each_four():
    scores = torch.tensor([[1.0, 4.0, 3.0, 2.0, 8.0, 5.0, 6.0, 7.0]])
    assert n_of_m_mask(scores).tolist() == [[False, True, True, False, True, False, False, True]]


def _masked_equivalent(model, pruned_report, method, calib_model):
    """The unpruned model with the removed structures' output projections zeroed: what removal must equal."""
    layers = model.model.layers
    if method == "layers":
        for index in pruned_report["structure"]["removed_layers"]:
            layers[index].self_attn.o_proj.weight.data.zero_()
            layers[index].mlp.down_proj.weight.data.zero_()
        return model
    for layer, pruned_layer in zip(layers, calib_model.model.layers):
        if method == "mlp":  # channels whose down_proj column survived (columns are unique on random init)
            kept = [torch.isclose(layer.mlp.down_proj.weight.T, col).all(1).nonzero().item()
                    for col in pruned_layer.mlp.down_proj.weight.T]
            drop = sorted(set(range(layer.mlp.down_proj.weight.shape[1])) - set(kept))
            layer.mlp.down_proj.weight.data[:, drop] = 0
        else:
            head_dim = model.config.hidden_size // model.config.num_attention_heads
            full = layer.self_attn.o_proj.weight.reshape(-1, model.config.num_attention_heads, head_dim)
            kept_cols = pruned_layer.self_attn.o_proj.weight.reshape(full.shape[0], -1, head_dim)
            kept = [next(h for h in range(full.shape[1]) if torch.equal(full[:, h], kept_cols[:, k]))
                    for k in range(kept_cols.shape[1])]
            for h in set(range(full.shape[1])) - set(kept):
                layer.self_attn.o_proj.weight.data[:, h * head_dim:(h + 1) * head_dim] = 0
    return model


@pytest.mark.parametrize("method", ["heads", "mlp", "layers"])
def test_structured_removal_equals_the_masked_model_and_reloads(tiny_config, tiny_llama_dir, smol_tokenizer, tmp_path,
                                                               method):
    pruned = _model(tiny_llama_dir)
    report = prune_model(pruned, smol_tokenizer, method, 0.5, _rows(tiny_config), 128)
    assert report["parameters_after"] < report["parameters_before"]
    masked = _masked_equivalent(_model(tiny_llama_dir), report, method, pruned)
    batch = _batch(tiny_config, smol_tokenizer)
    with torch.no_grad():
        expected = masked(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = pruned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    assert torch.allclose(got[real], expected[real], atol=1e-5)
    # the KV cache still works (layer indices renumbered) and greedy decoding agrees
    prompt = batch["input_ids"][:1, :10]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=smol_tokenizer.pad_token_id)
    assert torch.equal(pruned.generate(prompt, **kwargs), masked.generate(prompt, **kwargs))
    out = save_pruned(pruned, smol_tokenizer, tmp_path / "pruned", report)
    reloaded = _model(out)
    with torch.no_grad():
        again = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(again[real], got[real], atol=1e-6)
    assert sum(p.numel() for p in reloaded.parameters()) == report["parameters_after"]


def test_prune_verb_writes_a_directory_and_a_recovery_adapter_that_plain_peft_loads(tiny_config, tmp_path):
    from peft import PeftModel

    cfg = tiny_config
    cfg.prune.source, cfg.prune.method, cfg.prune.sparsity = "base", "mlp", 0.25
    cfg.prune.recover, cfg.prune.recovery_examples, cfg.prune.evaluate = True, 8, False
    report = prune(cfg)
    out = tmp_path / "pruned"
    assert json.loads((out / REPORT_FILE).read_text())["structure"]["intermediate_size"] == 48
    assert report["recovery"]["train_examples"] == 8
    peft_model = PeftModel.from_pretrained(_model(out), report["recovery"]["adapter"])
    assert any("lora_A" in name for name, _ in peft_model.named_parameters())
    # run again (as after a killed recovery): the same pruning is reused, not redone over the recovery run
    written = (out / "model.safetensors").stat().st_mtime_ns
    cfg.prune.recover = False
    prune(cfg)
    assert (out / "model.safetensors").stat().st_mtime_ns == written and (out / "recovery" / "adapter").is_dir()
    cfg.prune.sparsity = 0.5  # another pruning replaces the directory, stale recovery included
    assert prune(cfg)["structure"]["intermediate_size"] == 32 and not (out / "recovery").exists()


@pytest.mark.parametrize("args,message", [
    (["--method", "heads", "--sparsity", "0.1"], "possible sparsities: 0.50"),
    (["--method", "layers", "--sparsity", "0.9"], "removes 2 of 2 decoder layers"),
    (["--sparsity", "1.5"], "prune.sparsity=1.5: must be between 0 and 1"),
    (["--method", "wanda-2:4", "--sparsity", "0.3"], "sparsity is 0.5"),
])
def test_bad_prune_input_stops_with_one_line_and_writes_nothing(tiny_config, tmp_path, capsys, args, message):
    config = tmp_path / "cfg.yaml"
    config.write_text(json.dumps({"data": {"out_dir": tiny_config.data.out_dir},
                                  "model": {"name_or_path": tiny_config.model.name_or_path}}))
    code = main(["prune", "--config", str(config), "--source", "base", "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_structure_the_architecture_lacks_is_refused(tiny_gpt2_dir, smol_tokenizer):
    model = _model(tiny_gpt2_dir)
    with pytest.raises(LoralabError, match="use magnitude or wanda"):
        prune_model(model, smol_tokenizer, "heads", 0.5, [], 128)


def test_unknown_method_is_refused_at_load():
    with pytest.raises(LoralabError, match="prune.method"):
        load_config(overrides=["prune.method=sparsegpt"])


def test_study_measures_every_point_then_resumes_without_measuring_again(tiny_config, monkeypatch):
    import loralab.prune.measure as measure
    import loralab.prune.study as study

    def inline(function, *args):  # the spawned process is the runner's business (tests/studies); seconds here
        return function(*args)

    monkeypatch.setattr(study, "in_fresh_process", inline)
    monkeypatch.setattr(measure, "in_fresh_process", inline)
    cfg = tiny_config
    cfg.prune.source = "base"
    cfg.prune.study_points, cfg.prune.recovery_points, cfg.prune.gguf_points = ["mlp@0.5"], ["mlp@0.5"], ["mlp@0.5"]
    cfg.prune.recovery_examples, cfg.prune.generation_per_task, cfg.prune.speed_tokens = 8, 1, 2
    cfg.eval.max_new_tokens = 4
    summary = study.prune_study(cfg)
    point = summary["points"]["mlp@0.5"]
    reference = summary["points"]["none"]["quality"]
    assert point["quality"]["parameters"] < reference["parameters"]
    assert point["quality"]["size_mb"] < reference["size_mb"]
    assert {"recovered", "gguf_q8_0", "gguf_q4_1"} <= set(point) and point["recovered"]["train_examples"] == 8
    assert point["gguf_q4_1"]["size_mb"] < point["gguf_q8_0"]["size_mb"] < point["quality"]["size_mb"]
    assert set(point["speed"]) == {"quality", "recovered", "gguf_q8_0", "gguf_q4_1"}  # every variant, median of 5
    assert all(len(s["runs"]) == 5 for s in point["speed"].values())
    markdown = Path(cfg.prune.summary_md).read_text()
    assert "| mlp@0.5 | pruned + LoRA recovery |" in markdown and "## Findings" in markdown
    assert Path(cfg.prune.plots_dir, study.PLOT).is_file()

    def no_measuring(*args, **kwargs):
        raise AssertionError("a recorded stage was measured again")

    for name in ("measure_directory", "measure_gguf", "measure_speeds", "recover", "in_fresh_process"):
        monkeypatch.setattr(study, name, no_measuring)
    shutil.rmtree(cfg.prune.runs_dir)  # a fresh clone has the committed records but none of the models
    again = study.prune_study(cfg)
    assert again["points"] == summary["points"]
