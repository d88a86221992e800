"""`loralab export` on the tiny Llama: merged directory, GGUF F16/Q8_0 round-trips through
transformers, the GGUF adapter and its Modelfile, and every verification the command makes,
including that an export which lost the adapter is rejected."""

import json
from pathlib import Path

import pytest
import torch

from loralab.deploy.export import FALLBACK_PAIRS, answer_logprobs, compare, export
from loralab.deploy.gguf import load_gguf, permute_qk, write_gguf
from loralab.training.recipe import train
from loralab.util.errors import LoralabError


@pytest.fixture
def trained(tiny_config, tmp_path):
    train(tiny_config, quiet=True)
    tiny_config.export.out_dir = str(tmp_path / "export")
    tiny_config.export.results_dir = str(tmp_path)  # export_report.md and export_report.json
    return tiny_config


def test_export_writes_verified_merged_gguf_and_the_adapter(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Q4_0 is left out: on a random tiny model its error is far above what it is on a trained one
    # (its bound is checked on SmolLM2 by the e2e test and the committed export run).
    results = export(trained, formats=["merged", "gguf-f16", "gguf-q8_0", "gguf-lora"])
    formats = results["formats"]
    from loralab.data.prepare import load_split

    # Teacher-forced on the eval split's reference answers (4 rows here; at most 8).
    assert results["adapter_effect_kl"] > 0 and results["verification_answers"] == len(load_split(trained.data.out_dir, "eval"))
    for fmt, entry in formats.items():
        assert entry["verification"]["passed"], (fmt, entry["verification"])
        assert entry["verification"]["mean_kl"] < 0.1 * results["adapter_effect_kl"]
        assert entry["size_mb"] > 0
        if fmt != "gguf-lora":
            assert entry["test_perplexity"] > 1 and entry["tokens_per_s_batch1"] > 0
    assert formats["merged"]["verification"]["mean_kl"] < formats["gguf-f16"]["verification"]["mean_kl"] \
        < formats["gguf-q8_0"]["verification"]["mean_kl"]
    assert formats["gguf-q8_0"]["size_mb"] < formats["gguf-f16"]["size_mb"] < formats["merged"]["size_mb"]
    assert "| gguf-q8_0 |" in (tmp_path / "export_report.md").read_text()
    # The merged directory is plain transformers: no PEFT, no loralab.
    merged_dir = tmp_path / "export" / "merged"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in name for name in merged.state_dict())
    # The GGUF carries the tokenizer (same ids) and the chat template.
    original = AutoTokenizer.from_pretrained(merged_dir)
    model, tokenizer = load_gguf(formats["gguf-f16"]["path"])
    text = "Essential hypertension, ICD-10-CM I10 — défini ✓"
    assert tokenizer(text)["input_ids"] == original(text)["input_ids"]
    assert tokenizer.chat_template == original.chat_template
    saved = json.loads((tmp_path / "export" / "export_report.json").read_text())
    assert set(saved["formats"]) == set(formats)
    reported = json.loads(Path(trained.export.report_json).read_text())  # the committed kind of result
    assert reported["formats"] == saved["formats"] and reported["provenance"]["command"] == saved["provenance"]["command"]
    # The tiny base is a HF directory, so the Modelfile's base is an F16 GGUF the export wrote beside the adapter.
    modelfile = (tmp_path / "export" / "Modelfile").read_text().splitlines()
    base_gguf = tmp_path / "export" / "tiny-llama0.F16.gguf"
    assert f"FROM {base_gguf.resolve()}" in modelfile and base_gguf.is_file()
    assert f"ADAPTER ./{Path(formats['gguf-lora']['path']).name}" in modelfile


def test_an_export_that_lost_the_adapter_is_rejected(trained, tmp_path, monkeypatch):
    """Merging that silently drops the adapter gives the base model: the check must catch it."""
    import loralab.model_utils as model_utils

    def merge_without_adapter(model_cfg, adapter_dir, out_dir):
        loaded = model_utils.load_base_model(model_cfg)
        loaded.model.save_pretrained(out_dir)
        loaded.tokenizer.save_pretrained(out_dir)
        return Path(out_dir)

    monkeypatch.setattr(model_utils, "merge_to_directory", merge_without_adapter)
    trained.export.evaluate = False
    with pytest.raises(LoralabError, match=r"export verification failed for \['merged', 'gguf-f16'\]"):
        export(trained, formats=["merged", "gguf-f16", "gguf-lora"])
    report = json.loads((tmp_path / "export" / "export_report.json").read_text())
    lost = report["formats"]["merged"]["verification"]
    assert lost["mean_kl"] == pytest.approx(report["adapter_effect_kl"], rel=1e-3)
    assert report["formats"]["gguf-lora"]["verification"]["passed"]  # the adapter file never went through the merge


def test_gguf_round_trip_is_exact_in_f16_up_to_rounding(trained, tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    path = write_gguf(model, tokenizer, tmp_path / "tiny.F16.gguf", "f16", "tiny")
    back, back_tokenizer = load_gguf(path)
    for name, tensor in model.state_dict().items():  # Q/K permutation undone, every tensor where it was
        torch.testing.assert_close(back.state_dict()[name], tensor.half().float(), rtol=0, atol=0)
    check = compare(answer_logprobs(model, tokenizer, FALLBACK_PAIRS), answer_logprobs(back, back_tokenizer, FALLBACK_PAIRS))
    assert check["top1_agreement"] == 1.0


def test_permute_qk_moves_rows_within_each_head_only():
    weight = torch.arange(8 * 3).reshape(8, 3).numpy()  # 2 heads of 4 rows
    permuted = permute_qk(weight, 2)
    assert sorted(map(tuple, permuted[:4])) == sorted(map(tuple, weight[:4]))
    assert (permuted[[0, 1, 2, 3]] == weight[[0, 2, 1, 3]]).all()


def test_bad_export_requests_fail_in_one_line(trained, tiny_gpt2_dir, tmp_path):
    with pytest.raises(LoralabError, match="expected some of"):
        export(trained, formats=["gguf-q2"])
    with pytest.raises(LoralabError, match="no adapter_config.json"):
        export(trained, adapter_dir=tmp_path / "nothing")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    with pytest.raises(LoralabError, match="supports the llama architecture"):
        write_gguf(gpt2, AutoTokenizer.from_pretrained(tiny_gpt2_dir), tmp_path / "x.gguf", "f16", "x")
    assert not (tmp_path / "x.gguf").exists()
