"""loralab's training speed paths compute what the plain paths compute (tiny random models, tight tolerances)."""

import copy

import pytest
import torch

from loralab.config import LoraSettings, ModelConfig
from loralab.data.chat import collate, encode_chat, ensure_chat_template
from loralab.data.prepare import load_split
from loralab.metrics.losses import answer_nll_fast
from loralab.model_utils import attach_lora, load_base_model
from loralab.training import chunked_ce, fused_lora
from loralab.training.attention import resolve_attention, use_attention
from loralab.training.recipe import setup, train_step
from loralab.util.errors import LoralabError


def _lora_model(model_dir, dropout: float = 0.0, targets="all-linear"):
    loaded = load_base_model(ModelConfig(name_or_path=str(model_dir)))
    ensure_chat_template(loaded.tokenizer)
    model = attach_lora(loaded.model, LoraSettings(r=4, alpha=8, dropout=dropout, target_modules=targets))
    with torch.no_grad():  # B starts at zero; give the adapter an effect to compare
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model, loaded.tokenizer


def _batch(tokenizer, config, n: int = 6):
    rows = load_split(config.data.out_dir, "train")[:n]
    return collate([encode_chat(tokenizer, r["messages"], 128) for r in rows], tokenizer.pad_token_id)


def _loss_and_grads(model, batch, nll=answer_nll_fast):
    model.zero_grad()
    loss, _ = nll(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(a, b, rtol=1e-4, atol=1e-4):  # fp32 rounding of other summation orders
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=name)


def test_fused_lora_equals_peft_without_dropout(tiny_llama_dir, tiny_config):
    model, tokenizer = _lora_model(tiny_llama_dir)
    fused = copy.deepcopy(model)
    groups = fused_lora.fuse_lora_layers(fused)
    assert groups == 2 * 4  # per layer: q/k/v together, gate/up together, o and down alone
    batch = _batch(tokenizer, tiny_config)
    _assert_same(_loss_and_grads(fused, batch), _loss_and_grads(model, batch))


def test_fused_lora_in_eval_mode_equals_peft_with_dropout(tiny_llama_dir, tiny_config):
    model, tokenizer = _lora_model(tiny_llama_dir, dropout=0.3)
    fused = copy.deepcopy(model)
    fused_lora.fuse_lora_layers(fused)
    batch = _batch(tokenizer, tiny_config)
    model.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits,
                                   model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits,
                                   rtol=1e-4, atol=1e-4)


def test_a_group_draws_one_mask_per_input(tiny_llama_dir, tiny_config, monkeypatch):
    model, tokenizer = _lora_model(tiny_llama_dir, dropout=0.3)
    fused_lora.fuse_lora_layers(model)
    draws = []
    real = fused_lora.dropout_bool_mask
    monkeypatch.setattr(fused_lora, "dropout_bool_mask", lambda x, p, training: draws.append(p) or real(x, p, training))
    model.train()
    answer_nll_fast(model, _batch(tokenizer, tiny_config))
    assert draws == [0.3] * (2 * 4)  # 2 layers x (q/k/v, o, gate/up, down): PEFT would draw 2 x 7 masks


def test_bool_mask_dropout_keeps_the_expectation_and_the_rate():
    torch.manual_seed(0)
    x = torch.ones(400, 500)
    dropped = fused_lora.dropout_bool_mask(x, 0.2, training=True)
    assert abs(float((dropped == 0).float().mean()) - 0.2) < 0.01
    assert abs(float(dropped.mean()) - 1.0) < 0.02
    assert fused_lora.dropout_bool_mask(x, 0.2, training=False) is x


def test_fused_lora_leaves_dora_layers_to_peft(tiny_llama_dir):
    loaded = load_base_model(ModelConfig(name_or_path=str(tiny_llama_dir)))
    model = attach_lora(loaded.model, LoraSettings(method="dora", r=4, alpha=8, dropout=0.0))
    assert fused_lora.fuse_lora_layers(model) == 0


@pytest.mark.parametrize("rows_per_chunk", [3, 128])
def test_chunked_loss_equals_the_plain_head(rows_per_chunk, tiny_llama_dir, tiny_config, monkeypatch):
    monkeypatch.setattr(chunked_ce, "CHUNK_ROWS", rows_per_chunk)  # 3: many chunks, a short last one
    model, tokenizer = _lora_model(tiny_llama_dir, targets="auto")
    batch = _batch(tokenizer, tiny_config)
    _assert_same(_loss_and_grads(model, batch, chunked_ce.answer_nll_chunked), _loss_and_grads(model, batch))


def test_chunked_loss_gives_the_head_its_gradient_when_it_trains(tiny_llama_dir, tiny_config, monkeypatch):
    monkeypatch.setattr(chunked_ce, "CHUNK_ROWS", 5)
    loaded = load_base_model(ModelConfig(name_or_path=str(tiny_llama_dir)))
    ensure_chat_template(loaded.tokenizer)
    model = loaded.model  # the whole model trains, the (tied) head too
    batch = _batch(loaded.tokenizer, tiny_config)
    _assert_same(_loss_and_grads(model, batch, chunked_ce.answer_nll_chunked), _loss_and_grads(model, batch))


def test_chunked_loss_under_bf16_autocast_matches_the_fast_path(tiny_llama_dir, tiny_config):
    model, tokenizer = _lora_model(tiny_llama_dir, targets="auto")
    batch = _batch(tokenizer, tiny_config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = _loss_and_grads(model, batch, chunked_ce.answer_nll_chunked)
        fast = _loss_and_grads(model, batch)
    _assert_same(chunked, fast, rtol=2e-2, atol=2e-3)


def test_attention_is_chosen_per_compute_dtype():
    cpu = torch.device("cpu")
    assert resolve_attention("auto", cpu, torch.bfloat16) == "eager"
    assert resolve_attention("auto", cpu, None) == "sdpa"
    assert resolve_attention("auto", torch.device("cuda"), torch.bfloat16) == "sdpa"
    assert resolve_attention("eager", cpu, None) == "eager"
    with pytest.raises(LoralabError, match="train.attention='flash'"):
        resolve_attention("flash", cpu, None)


def test_the_chunked_loss_is_chosen_where_training_computes_in_bf16():
    from loralab.config import TrainConfig
    from loralab.training.recipe import _answer_nll

    assert _answer_nll(TrainConfig(), torch.bfloat16) is chunked_ce.answer_nll_chunked
    assert _answer_nll(TrainConfig(), None) is answer_nll_fast
    assert _answer_nll(TrainConfig(answer_loss="chunked"), None) is chunked_ce.answer_nll_chunked
    assert _answer_nll(TrainConfig(answer_loss="whole"), torch.bfloat16) is answer_nll_fast


def test_eager_and_sdpa_attention_give_the_same_loss(tiny_llama_dir, tiny_config):
    model, tokenizer = _lora_model(tiny_llama_dir, targets="auto")
    batch = _batch(tokenizer, tiny_config)
    use_attention(model, "sdpa")
    sdpa = _loss_and_grads(model, batch)
    use_attention(model, "eager")
    assert model.get_base_model().config._attn_implementation == "eager"
    _assert_same(_loss_and_grads(model, batch), sdpa)


@pytest.mark.parametrize("overrides", [
    {"fused_lora": False, "answer_loss": "whole", "attention": "sdpa"},
    {"answer_loss": "whole"}, {"answer_loss": "chunked"},  # one of the two is not the default on any CPU
    {"checkpoint": 2},
])
def test_each_speed_path_trains_the_same_first_step(overrides, tiny_config):
    """The default step against the step with the paths switched off (dropout 0: the masks cannot differ)."""
    tiny_config.lora.dropout = 0.0
    tiny_config.train.eval_every = tiny_config.train.save_every = 0

    def first_step(cfg):
        state = setup(cfg, quiet=True)
        loss, _ = train_step(state, 1)
        return loss, [p.detach().clone() for p in state.trainable_params]

    loss_default, params_default = first_step(tiny_config)
    other = copy.deepcopy(tiny_config)
    if "checkpoint" in overrides:
        other.model.gradient_checkpointing, other.model.checkpoint_every_n_layers = True, overrides["checkpoint"]
    else:
        for key, value in overrides.items():
            setattr(other.train, key, value)
    loss_other, params_other = first_step(other)
    assert loss_default == pytest.approx(loss_other, rel=1e-5)
    for a, b in zip(params_default, params_other):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_checkpointing_every_zero_layers_is_refused_at_load():
    from loralab.config import load_config

    with pytest.raises(LoralabError, match="model.checkpoint_every_n_layers"):
        load_config(overrides=["model.checkpoint_every_n_layers=0"])
