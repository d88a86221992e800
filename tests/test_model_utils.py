import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loralab.adapters.targets import find_target_modules
from loralab.config import LoraSettings, ModelConfig
from loralab.model_utils import attach_lora, load_base_model, merge_adapter, resolve_autocast_dtype, save_adapter
from loralab.util.errors import LoralabError


def test_llama_targets(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert find_target_modules(model, "auto") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert find_target_modules(model, "all-linear") == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    assert find_target_modules(model, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    with pytest.raises(LoralabError, match=r"\['c_attn'\] not found in LlamaForCausalLM"):
        find_target_modules(model, ["c_attn"])


def test_gpt2_targets_are_attention_conv1d_with_fan_in_fan_out(tiny_gpt2_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    assert find_target_modules(model, "auto") == ["attn.c_attn", "attn.c_proj"]
    peft_model = attach_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    assert peft_model.peft_config["default"].fan_in_fan_out is True
    wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert wrapped and all(".attn." in n for n in wrapped)  # the MLP's c_proj is left alone
    out = peft_model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert out.shape[-1] == model.config.vocab_size


def test_model_errors_are_one_line(tmp_path):
    with pytest.raises(LoralabError, match="no such file or directory"):
        load_base_model(ModelConfig(name_or_path=str(tmp_path / "nope")))
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(LoralabError, match="expected a .gguf file"):
        load_base_model(ModelConfig(name_or_path=str(tmp_path / "weights.bin")))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf")
    with pytest.raises(LoralabError, match="cannot load as a GGUF"):
        load_base_model(ModelConfig(name_or_path=str(fake), cache_dir=str(tmp_path / "cache")))
    with pytest.raises(LoralabError, match="lora.r=0"):
        attach_lora(torch.nn.Linear(2, 2), LoraSettings(r=0))


def test_precision_choice():
    cpu = torch.device("cpu")
    assert resolve_autocast_dtype("fp32", cpu) is None
    assert resolve_autocast_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(LoralabError):
        resolve_autocast_dtype("fp8", cpu)


def test_adapter_roundtrip_plain_peft_and_merge(tiny_llama_dir, tmp_path):
    loaded = load_base_model(ModelConfig(name_or_path=str(tiny_llama_dir)))
    peft_model = attach_lora(loaded.model, LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # make the adapter non-trivial (LoRA B starts at zero)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids = torch.tensor([[1, 5, 9, 22, 7]])
    expected = peft_model(input_ids=ids).logits
    save_adapter(peft_model, tmp_path / "lora", "stable/name", extra_json={"training_args.json": {"x": 1}})
    files = sorted(p.name for p in (tmp_path / "lora").iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "training_args.json"} <= set(files)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "stable/name"

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)  # exactly what a plain PEFT user does
    reloaded = PeftModel.from_pretrained(base, tmp_path / "lora")
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    merged = merge_adapter(reloaded)
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    bin_state = torch.load(tmp_path / "lora" / "adapter_model.bin")
    assert set(bin_state) and all("lora_" in k for k in bin_state)


def test_merge_to_directory_loads_with_plain_transformers(tiny_llama_dir, tmp_path):
    from loralab.model_utils import merge_to_directory

    loaded = load_base_model(ModelConfig(name_or_path=str(tiny_llama_dir)))
    peft_model = attach_lora(loaded.model, LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    expected = peft_model(input_ids=ids).logits
    save_adapter(peft_model, tmp_path / "lora", "tiny")
    out = merge_to_directory(ModelConfig(name_or_path=str(tiny_llama_dir)), tmp_path / "lora", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert (out / "tokenizer_config.json").is_file()
