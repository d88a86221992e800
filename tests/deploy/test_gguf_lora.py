"""The adapter as a llama.cpp GGUF adapter: the file's layout is llama.cpp's (names, shapes, alpha,
Q/K rows permuted like the base GGUF), the deltas it makes llama.cpp add equal PEFT's (LoRA,
rsLoRA, per-module ranks and alphas), and what llama.cpp cannot apply is refused with one line."""

import json

import numpy as np
import pytest
import torch

from loralab.deploy.gguf import permute_qk
from loralab.deploy.gguf_lora import read_gguf_lora, unpermute_qk, write_gguf_lora
from loralab.util.errors import LoralabError


def _adapter(tiny_llama_dir, out, **lora_kwargs):
    """A PEFT adapter on the tiny Llama with random (nonzero) A and B, saved as loralab saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                **lora_kwargs}
    peft_model = get_peft_model(model, LoraConfig(**settings))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    peft_model.save_pretrained(out, safe_serialization=True)
    return peft_model


def _peft_deltas(peft_model) -> dict[str, torch.Tensor]:
    deltas = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            hf = name.removeprefix("base_model.model.") + ".weight"
            deltas[hf] = module.get_delta_weight("default").detach()
    return deltas


@pytest.mark.parametrize("kwargs", [{}, {"use_rslora": True}, {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"o_proj": 3}}],
                         ids=["lora", "rslora", "patterns"])
def test_the_file_adds_exactly_peft_s_deltas(tiny_llama_dir, tmp_path, kwargs):
    peft_model = _adapter(tiny_llama_dir, tmp_path / "adapter", **kwargs)
    config = peft_model.base_model.model.config
    path = write_gguf_lora(tmp_path / "adapter", config, tmp_path / "a.lora.gguf")
    expected = _peft_deltas(peft_model)
    written = read_gguf_lora(path, config)
    assert set(written) == set(expected) and len(expected) == 2 * 5
    for name, delta in expected.items():
        torch.testing.assert_close(written[name], delta, rtol=1e-5, atol=1e-6)


def test_layout_is_llama_cpp_s(tiny_llama_dir, tmp_path):
    import gguf

    peft_model = _adapter(tiny_llama_dir, tmp_path / "adapter")
    config = peft_model.base_model.model.config
    reader = gguf.GGUFReader(write_gguf_lora(tmp_path / "adapter", config, tmp_path / "a.gguf"))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(8.0)  # alpha / rank is llama.cpp's scale
    tensors = {t.name: t for t in reader.tensors}
    a, b = tensors["blk.1.attn_q.weight.lora_a"], tensors["blk.1.attn_q.weight.lora_b"]
    # llama.cpp checks ne(a) = (n_embd, r) and ne(b) = (r, n_out): GGUF lists dimensions innermost first.
    assert list(a.shape) == [32, 4] and list(b.shape) == [4, 32]
    peft_b = dict(peft_model.named_parameters())["base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight"]
    np.testing.assert_array_equal(np.array(b.data), permute_qk(peft_b.detach().numpy(), config.num_attention_heads))
    k_b = dict(peft_model.named_parameters())["base_model.model.model.layers.1.self_attn.k_proj.lora_B.default.weight"]
    assert not np.array_equal(np.array(tensors["blk.1.attn_k.weight.lora_b"].data), k_b.detach().numpy())


def test_unpermute_inverts_permute():
    weight = np.arange(8 * 3 * 5, dtype=np.float32).reshape(8 * 3, 5)
    np.testing.assert_array_equal(unpermute_qk(permute_qk(weight, 3), 3), weight)


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "DoRA"),
    ({"peft_type": "IA3"}, "IA3 adapter has no llama.cpp LoRA form"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_what_llama_cpp_cannot_apply_is_refused_and_nothing_written(tiny_llama_dir, tmp_path, change, message):
    peft_model = _adapter(tiny_llama_dir, tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    with pytest.raises(LoralabError, match=message):
        write_gguf_lora(tmp_path / "adapter", peft_model.base_model.model.config, tmp_path / "a.gguf")
    assert list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".*tmp")) == []
