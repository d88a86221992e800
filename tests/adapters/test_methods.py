"""Every `lora.method` trains on a tiny random Llama, saves something plain PEFT / transformers loads,
and bad method options fail before any training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loralab.adapters.methods import METHODS, validate
from loralab.config import LoraSettings
from loralab.data.prepare import load_split
from loralab.model_utils import is_full_model_dir, load_adapter, load_base_model
from loralab.training.recipe import encode_rows, mean_answer_loss, train
from loralab.util.errors import LoralabError


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_and_reloads(method, tiny_config):
    tiny_config.lora.method = method
    tiny_config.lora.dropout = 0.0
    tiny_config.train.max_steps = 8
    tiny_config.train.save_every = 0
    result = train(tiny_config, quiet=True)
    out = Path(result.adapter_dir)
    assert result.final_train_loss is not None and torch.isfinite(torch.tensor(result.final_train_loss))
    args = json.loads((out / "training_args.json").read_text())
    assert args["config"]["lora"]["method"] == method
    assert is_full_model_dir(out) == (method == "full")

    loaded = load_base_model(tiny_config.model)
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        before = loaded.model(input_ids=ids).logits
        tuned = load_adapter(loaded.model, out).eval()
        after = tuned(input_ids=ids).logits
    assert not torch.allclose(before, after, atol=1e-6)  # training changed the model's outputs
    # What was saved is what was trained: the reloaded model gives the eval loss of the last training step.
    eval_rows = load_split(tiny_config.data.out_dir, "eval")[: tiny_config.train.eval_examples]
    examples = encode_rows(loaded.tokenizer, eval_rows, tiny_config.train.max_length)
    reloaded_loss = mean_answer_loss(
        tuned, examples, loaded.tokenizer.pad_token_id, tiny_config.train.batch_size, torch.device("cpu"), None
    )
    assert reloaded_loss == pytest.approx(result.final_eval_loss, rel=1e-4)


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_pissa_and_olora_adapters_are_converted_for_the_untouched_base(method, tiny_config, tmp_path):
    """PiSSA/OLoRA train on a modified base; the saved adapter must reproduce the trained model on the
    original base (PEFT's conversion to a rank-2r LoRA), since that base is what users load."""
    from loralab.adapters.methods import save_initial_adapter
    from loralab.model_utils import attach_lora, save_adapter

    settings = LoraSettings(method=method, r=4, alpha=8, dropout=0.0)
    model = attach_lora(load_base_model(tiny_config.model).model, settings)
    initial = save_initial_adapter(model, settings, tmp_path / "initial")
    with torch.no_grad():  # stand-in for training: move every adapter weight
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn_like(param))
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        trained = model.eval()(input_ids=ids).logits
    save_adapter(model, tmp_path / "adapter", "tiny", initial_adapter=initial)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    with torch.no_grad():
        reloaded = load_adapter(load_base_model(tiny_config.model).model, tmp_path / "adapter").eval()(input_ids=ids).logits
    torch.testing.assert_close(reloaded, trained, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("settings, message", [
    (LoraSettings(method="qlora-magic"), "lora.method='qlora-magic'"),
    (LoraSettings(method="lora", loraplus_lr_ratio=8.0), "applies only to lora.method=loraplus"),
    (LoraSettings(method="dora", adalora_init_r=12), "applies only to lora.method=adalora"),
    (LoraSettings(method="ia3", target_modules=["q_proj"]), "ia3 only as auto"),
    (LoraSettings(method="adalora", r=8, adalora_init_r=8), "must exceed lora.r=8"),
])
def test_bad_method_options_fail_clearly(settings, message):
    with pytest.raises(LoralabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(settings)


def test_bad_method_fails_before_training(tiny_config):
    tiny_config.lora.method = "nope"
    with pytest.raises(LoralabError, match="expected one of lora, rslora"):
        train(tiny_config, quiet=True)
    assert not Path(tiny_config.train.output_dir).exists()


def test_adalora_after_rank_reallocation_reloads_exactly(tiny_config, tmp_path):
    """AdaLoRA prunes ranks while training and saves a rank pattern; plain PEFT loading must give
    back the trained model (PEFT warns about the pattern's keys, but the weights carry the pruning)."""
    from loralab.adapters import methods as peft_methods
    from loralab.model_utils import attach_lora, save_adapter

    settings = LoraSettings(method="adalora", r=2, alpha=4, dropout=0.0)
    model = attach_lora(load_base_model(tiny_config.model).model, settings, 20)
    optimizer = peft_methods.make_optimizer(model, settings, 1e-2, 0.0)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    for step in range(1, 21):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        peft_methods.after_optimizer_step(model, settings, step)
        optimizer.zero_grad()
    assert model.peft_config["default"].rank_pattern  # ranks were reallocated
    with torch.no_grad():
        trained = model.eval()(input_ids=ids).logits
    save_adapter(model, tmp_path / "adalora", "tiny")
    with torch.no_grad():
        reloaded = load_adapter(load_base_model(tiny_config.model).model, tmp_path / "adalora").eval()(input_ids=ids).logits
    torch.testing.assert_close(reloaded, trained, rtol=1e-4, atol=1e-5)


def test_quantized_base_options_fail_clearly(monkeypatch, tiny_config):
    import importlib.util

    from loralab.model_utils import quantization_config

    assert quantization_config("none") is None
    with pytest.raises(LoralabError, match="model.quantize_base='fp3'"):
        quantization_config("fp3")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    with pytest.raises(LoralabError, match="needs bitsandbytes, which is not installed"):
        quantization_config("nf4")
    with pytest.raises(LoralabError, match="pissa changes the base weights"):
        validate(LoraSettings(method="pissa"), "nf4")
    tiny_config.lora.method = "full"
    tiny_config.model.quantize_base = "nf4"
    with pytest.raises(LoralabError, match="cannot use model.quantize_base=nf4"):
        train(tiny_config, quiet=True)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_lora_on_a_quantized_base_trains(kind, tiny_config, smol_tokenizer, tmp_path):
    """QLoRA on this CPU: bitsandbytes holds the frozen base in 8 or 4 bits, LoRA trains on top.
    (Its 4-bit CPU kernel needs every projection at least 64 wide, hence this slightly wider model.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    wide = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                       pad_token_id=smol_tokenizer.pad_token_id, eos_token_id=smol_tokenizer.eos_token_id)
    LlamaForCausalLM(wide).save_pretrained(tmp_path / "wide")
    smol_tokenizer.save_pretrained(tmp_path / "wide")
    tiny_config.model.name_or_path = str(tmp_path / "wide")
    tiny_config.model.quantize_base = kind
    tiny_config.model.precision = "bf16"
    tiny_config.train.max_steps = 4
    tiny_config.train.save_every = 0
    result = train(tiny_config, quiet=True)
    config = json.loads((Path(result.adapter_dir) / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and torch.isfinite(torch.tensor(result.final_train_loss))
    quantized = load_base_model(tiny_config.model).model
    assert type(quantized.model.layers[0].self_attn.q_proj).__module__.startswith("bitsandbytes")


@pytest.mark.parametrize("method", ["pissa", "adalora"])
def test_interrupted_run_of_a_method_resumes_to_the_same_adapter(method, tiny_config, tmp_path):
    """PiSSA must convert against its initial adapter, not the checkpoint's; AdaLoRA, whose rank
    allocator cannot be checkpointed, starts again. Either way: the uninterrupted run's adapter."""
    from safetensors.torch import load_file

    tiny_config.lora.method = method
    tiny_config.train.max_steps = 10
    tiny_config.train.save_every = 2
    expected = load_file(Path(train(tiny_config, quiet=True).adapter_dir) / "adapter_model.safetensors")
    tiny_config.train.run_dir, tiny_config.train.output_dir = str(tmp_path / "run2"), str(tmp_path / "lora2")
    assert train(tiny_config, stop_at_step=5, quiet=True).interrupted
    got = load_file(Path(train(tiny_config, resume=True, quiet=True).adapter_dir) / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_loraplus_groups_carry_the_lr_ratio_and_weight_decay(tiny_config):
    from loralab.adapters.methods import make_optimizer
    from loralab.model_utils import attach_lora

    settings = LoraSettings(method="loraplus", r=2, loraplus_lr_ratio=8.0)
    model = attach_lora(load_base_model(tiny_config.model).model, settings)
    optimizer = make_optimizer(model, settings, lr=1e-3, weight_decay=0.01)
    lrs = sorted({group["lr"] for group in optimizer.param_groups if group["params"]})
    assert lrs == [pytest.approx(1e-3), pytest.approx(8e-3)]
    assert all(group["weight_decay"] == 0.01 for group in optimizer.param_groups if group["params"])


def test_full_fine_tuning_with_gradient_checkpointing(tiny_config):
    tiny_config.lora.method = "full"
    tiny_config.model.gradient_checkpointing = True
    tiny_config.train.max_steps = 3
    result = train(tiny_config, quiet=True)
    assert is_full_model_dir(result.adapter_dir) and torch.isfinite(torch.tensor(result.final_train_loss))


def test_run_names_separate_quantized_bases():
    """A sweep or compare must never reuse a plain run's results for the same run on a quantized base."""
    from loralab.config import Config, run_digest

    plain, quantized = Config(), Config()
    quantized.model.quantize_base = "nf4"
    assert run_digest(plain) != run_digest(quantized)
