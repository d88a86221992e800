"""The training loop on tiny random models: it learns, resumes exactly, and never half-writes."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loralab.config import LoraSettings, ModelConfig
from loralab.data.chat import collate, encode_chat
from loralab.data.prepare import load_split
from loralab.metrics.losses import answer_nll_fast, answer_nll_plain
from loralab.model_utils import attach_lora, load_base_model
from loralab.training.batching import padding_fraction, plan_batches
from loralab.training.recipe import setup, train
from loralab.util.errors import LoralabError


def _adapter(path) -> dict:
    return load_file(Path(path) / "adapter_model.safetensors")


def test_training_lowers_loss_and_writes_artifacts(tiny_config):
    tiny_config.train.max_steps = 30
    tiny_config.train.eval_every = 10
    result = train(tiny_config, quiet=True)
    out = Path(tiny_config.train.output_dir)
    assert not result.interrupted and result.steps_done == 30
    log = [json.loads(text) for text in (Path(tiny_config.train.run_dir) / "log.jsonl").read_text().splitlines()]
    evals = [e["eval_loss"] for e in log if e["eval_loss"] is not None]
    assert len(evals) == 3 and evals[-1] < evals[0] - 0.5, evals
    assert {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "training_args.json"} <= {
        p.name for p in out.iterdir()
    }
    args = json.loads((out / "training_args.json").read_text())
    assert args["total_steps"] == 30 and args["config"]["train"]["learning_rate"] == tiny_config.train.learning_rate
    assert 0 <= args["padding_fraction"] < 1
    assert "padding_fraction" not in log[0]  # once per run, in training_args.json; not recomputed every step
    text_log = Path(tiny_config.train.log_file).read_text().splitlines()
    assert "tokens_per_s" in text_log[1] and len(text_log) == 2 + 30
    assert Path(tiny_config.train.loss_plot).stat().st_size > 1000
    assert not (Path(tiny_config.train.run_dir) / "checkpoints").exists()


def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(tiny_config, tmp_path):
    straight = train(tiny_config, quiet=True)
    expected = _adapter(straight.adapter_dir)

    tiny_config.train.output_dir = str(tmp_path / "lora2")
    tiny_config.train.run_dir = str(tmp_path / "run2")
    first = train(tiny_config, stop_at_step=3, quiet=True)  # interrupted after step 3 (save_every=2)
    assert first.interrupted and first.steps_done == 3 and not Path(tiny_config.train.output_dir).exists()
    resumed = train(tiny_config, resume=True, quiet=True)
    assert resumed.steps_done == 6
    got = _adapter(resumed.adapter_dir)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_process_resumes_to_the_same_adapter(tiny_config, tmp_path, sig):
    """A real signal mid-run: SIGKILL (resume from the last periodic checkpoint) or SIGTERM (the
    loop stops at the next step boundary and checkpoints it), then --resume."""
    tiny_config.train.max_steps = 200  # long enough that the kill lands mid-run on any machine
    tiny_config.train.save_every = 1
    tiny_config.train.eval_every = 50
    expected = _adapter(train(tiny_config, quiet=True).adapter_dir)

    run_dir = tmp_path / "killed_run"
    overrides = [
        f"data.out_dir={tiny_config.data.out_dir}", f"model.name_or_path={tiny_config.model.name_or_path}",
        f"model.cache_dir={tiny_config.model.cache_dir}", "model.precision=fp32", "lora.dropout=0.1",
        "train.learning_rate=5e-3", "train.batch_size=4", "train.max_steps=200", "train.eval_every=50", "train.save_every=1",
        f"train.run_dir={run_dir}", f"train.output_dir={tmp_path / 'killed_lora'}",
        f"train.results_dir={tmp_path / 'killed_results'}", "train.plot_loss=false",
    ]
    command = [sys.executable, "-m", "loralab", "train", *[a for o in overrides for a in ("--set", o)]]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((run_dir / "checkpoints").glob("step-*[0-9]"))) == 0:
        time.sleep(0.1)
    process.send_signal(sig)
    assert process.wait() == (130 if sig == signal.SIGTERM else -signal.SIGKILL)
    assert not (tmp_path / "killed_lora").exists()
    assert subprocess.run(command + ["--resume"], capture_output=True).returncode == 0
    got = _adapter(tmp_path / "killed_lora")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_resume_refuses_a_checkpoint_made_with_other_settings(tiny_config):
    assert train(tiny_config, stop_at_step=2, quiet=True).interrupted
    tiny_config.lora.r = 16
    with pytest.raises(LoralabError, match="made with other settings"):
        train(tiny_config, resume=True, quiet=True)


def test_too_few_examples_for_the_accumulation_fail_clearly(tiny_config):
    tiny_config.train.batch_size = 32
    tiny_config.train.gradient_accumulation = 4
    with pytest.raises(LoralabError, match="fewer than train.gradient_accumulation=4"):
        train(tiny_config, quiet=True)


def test_interrupted_run_keeps_the_previous_adapter(tiny_config):
    train(tiny_config, quiet=True)
    before = _adapter(tiny_config.train.output_dir)
    tiny_config.train.learning_rate = 1e-2
    assert train(tiny_config, stop_at_step=2, quiet=True).interrupted
    after = _adapter(tiny_config.train.output_dir)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fast_loss_equals_plain_loss(arch, tiny_llama_dir, tiny_gpt2_dir, tiny_config):
    from loralab.data.chat import ensure_chat_template

    model_dir = tiny_llama_dir if arch == "llama" else tiny_gpt2_dir
    loaded = load_base_model(ModelConfig(name_or_path=str(model_dir)))
    ensure_chat_template(loaded.tokenizer)
    model = attach_lora(loaded.model, LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    rows = load_split(tiny_config.data.out_dir, "train")[:6]
    batch = collate([encode_chat(loaded.tokenizer, r["messages"], 128) for r in rows], loaded.tokenizer.pad_token_id)
    fast, n_fast = answer_nll_fast(model, batch)
    plain, n_plain = answer_nll_plain(model, batch)
    assert n_fast == n_plain > 0
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-4)
    fast.backward()
    grads_fast = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    plain.backward()
    for g_fast, p in zip(grads_fast, [p for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(g_fast, p.grad, rtol=1e-4, atol=1e-5)


def test_gpt2_trains_end_to_end(tiny_config, tiny_gpt2_dir):
    tiny_config.model.name_or_path = str(tiny_gpt2_dir)
    result = train(tiny_config, quiet=True)
    config = json.loads((Path(result.adapter_dir) / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and sorted(config["target_modules"]) == ["attn.c_attn", "attn.c_proj"]


def test_batch_plan_is_deterministic_and_bucketed():
    lengths = [(i * 37) % 101 + 5 for i in range(400)]
    plan = plan_batches(lengths, batch_size=4, accumulation=2, total_steps=120, seed=3)
    assert plan == plan_batches(lengths, 4, 2, 120, 3) and plan != plan_batches(lengths, 4, 2, 120, 4)
    assert len(plan) == 120 and all(len(step) == 2 for step in plan)
    first_epoch = [i for step in plan[:50] for mb in step for i in mb]
    assert sorted(first_epoch) == list(range(400))  # every example once per epoch
    spread = sum(max(lengths[i] for i in mb) - min(lengths[i] for i in mb) for step in plan for mb in step) / 240
    assert spread < 10  # random batches would spread ~50 tokens
    unbucketed = plan_batches(lengths, 4, 2, 120, 3, bucket_factor=1)  # train.length_bucketing=false
    spread = sum(max(lengths[i] for i in mb) - min(lengths[i] for i in mb) for step in unbucketed for mb in step) / 240
    assert spread > 30
    assert padding_fraction(plan, lengths) < padding_fraction(unbucketed, lengths)


def test_padding_fraction_counts_the_slots_each_micro_batch_pads():
    lengths = [2, 4, 3, 3]
    assert padding_fraction([[[0, 1]], [[2, 3]]], lengths) == 1 - 12 / 14  # 2 + 4 padded to 8; 3 + 3 to 6
    assert padding_fraction([[[2, 3]]], lengths) == 0.0


def test_switched_off_techniques_and_bf16_frozen_weights_still_train(tiny_config):
    """The ablation switches (benchmarks/train_throughput.py --ablation) give working runs; with bf16
    frozen weights the adapter is still trained and saved in fp32."""
    from loralab.training.numerics import hold_frozen_weights_in, resolve_frozen_dtype

    tiny_config.train.length_bucketing = False
    tiny_config.train.answer_only_logits = False
    tiny_config.model.precision = "bf16"
    tiny_config.model.frozen_dtype = "bf16"
    result = train(tiny_config, quiet=True)
    assert result.final_eval_loss is not None and math.isfinite(result.final_train_loss)
    adapter = _adapter(result.adapter_dir)
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)
    args = json.loads((Path(result.adapter_dir) / "training_args.json").read_text())
    assert args["frozen_weights_dtype"] == "torch.bfloat16" and args["data_parallel_processes"] == 1

    assert resolve_frozen_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_frozen_dtype("auto", None) == torch.float32
    with pytest.raises(LoralabError, match="frozen_dtype"):
        resolve_frozen_dtype("int8", None)
    with pytest.raises(LoralabError, match="needs bf16 autocast"):
        resolve_frozen_dtype("bf16", None)
    model = attach_lora(load_base_model(ModelConfig(name_or_path=tiny_config.model.name_or_path)).model, LoraSettings(r=2))
    hold_frozen_weights_in(model, torch.bfloat16)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_setup_gives_the_state_the_loop_runs_on(tiny_config):
    """setup() alone (as benchmarks/memory_breakdown.py uses it): the model, data, batch plan and
    optimizer of the run, nothing trained and nothing saved yet."""
    state = setup(tiny_config, quiet=True)
    assert state.start_step == 0 and state.total_steps == len(state.plan) == 6
    assert state.method.name == "lora" and not state.method.whole_model
    assert state.trainable_params and all(p.requires_grad and p.dtype == torch.float32 for p in state.trainable_params)
    assert state.n_trainable == sum(p.numel() for p in state.trainable_params) < state.n_total
    assert {id(p) for group in state.optimizer.param_groups for p in group["params"]} == {id(p) for p in state.trainable_params}
    assert state.train_examples and state.eval_examples and state.log is not None
    assert not Path(tiny_config.train.output_dir).exists()
