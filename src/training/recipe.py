"""`loralab train`: LoRA fine-tuning as setup -> loop -> finish (nanoGPT's loop, torchtune's recipe shape).

Why not transformers.Trainer: loralab needs four things Trainer does not give together on a small
CPU: logits only at answer positions (metrics/losses.py), length-bucketed batches that waste little
on padding, a batch plan that is a pure function of the seed (so `--resume` reproduces an
uninterrupted run exactly), and artifacts swapped in atomically. PEFT still builds and saves the
adapter; transformers still provides the model and the LR schedules.

`setup(cfg)` builds a `TrainState` (model, data, batch plan, optimizer, resumed step, log) that
benchmarks and tests can use on their own; `loop(state)` runs the optimizer steps; `finish(state,
outcome)` saves. `train(cfg)` is the three in a row.

Outputs: the adapter in `train.output_dir` (lora/), `training_args.json` beside it, under
`train.results_dir` (experiments/) training_logs.txt and plots/loss_curve.png, and checkpoints under
`train.run_dir/checkpoints/` from which `--resume` continues a killed run.
"""

from __future__ import annotations

import math
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from loralab.adapters import methods as peft_methods
from loralab.adapters.methods import Method, get_method
from loralab.config import Config, TrainConfig
from loralab.data.chat import EncodedExample, collate, ensure_chat_template
from loralab.data.prepare import load_split
from loralab.metrics.losses import answer_nll_fast, answer_nll_plain
from loralab.model_utils import (
    attach_lora,
    autocast,
    count_parameters,
    load_base_model,
    resolve_autocast_dtype,
    resolve_device,
    save_adapter,
    save_full_model,
)
from loralab.training.attention import resolve_attention, use_attention
from loralab.training.batching import (
    BUCKET_FACTOR,
    BatchPlan,
    encode_rows,
    padding_fraction,
    plan_batches,
    steps_per_epoch,
)
from loralab.training.checkpoint import (
    list_checkpoints,
    load_latest_checkpoint,
    restore_checkpoint,
    resume_fingerprint,
    save_checkpoint,
)
from loralab.training.chunked_ce import answer_nll_chunked
from loralab.training.distributed import DataParallel
from loralab.training.distributed import setup as setup_data_parallel
from loralab.training.eval_loss import answer_loss_sums, mean_answer_loss
from loralab.training.fused_lora import fuse_lora_layers
from loralab.training.log import TrainLog, peak_rss_mb, plot_losses
from loralab.training.numerics import hold_frozen_weights_in, resolve_frozen_dtype
from loralab.training.stop import StopRequest
from loralab.training.tracking import Tracker, TrackingContext, open_run, require_trackers
from loralab.util import atomic_io, provenance
from loralab.util.allocator import allocator_in_use
from loralab.util.errors import LoralabError

# Re-exported while callers move to the modules above (training/batching, log, checkpoint, numerics, eval_loss, stop).
__all__ = [
    "BUCKET_FACTOR", "StopRequest", "TrainLog", "TrainResult", "TrainState", "LoopOutcome", "answer_loss_sums",
    "encode_rows", "finish", "hold_frozen_weights_in", "load_latest_checkpoint", "loop", "mean_answer_loss",
    "peak_rss_mb", "plan_batches", "plot_losses", "resolve_frozen_dtype", "resume_fingerprint", "save_checkpoint",
    "setup", "steps_per_epoch", "train",
]


@dataclass
class TrainResult:
    adapter_dir: Path | None
    steps_done: int
    total_steps: int
    final_train_loss: float | None
    final_eval_loss: float | None
    interrupted: bool


@dataclass
class TrainState:
    """Everything the loop needs, built once by `setup()`; the loop changes only the model,
    optimizer and scheduler inside it (and appends to the log)."""

    cfg: Config
    method: Method
    dp: DataParallel
    amp_dtype: torch.dtype | None  # autocast dtype; None: fp32
    frozen_dtype: torch.dtype  # what the frozen base weights are held in
    model: torch.nn.Module  # the PEFT-wrapped model (or the plain model for whole-model methods)
    tokenizer: object
    base_name: str  # the base model's name as written into adapter configs
    base_local_dir: Path
    train_examples: list[EncodedExample]
    eval_examples: list[EncodedExample]
    plan: BatchPlan  # step -> micro-batches (all ranks') -> indices into train_examples
    total_steps: int
    steps_per_epoch: int
    answer_nll: Callable  # (model, batch) -> (summed answer NLL, answer tokens)
    trainable_params: list[torch.nn.Parameter]
    n_trainable: int
    n_total: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    run_dir: Path
    initial_adapter: Path | None  # PiSSA/OLoRA's adapter as initialised (needed to convert it on save)
    start_step: int  # optimizer steps already in the weights (from a checkpoint)
    fingerprint: dict  # what a checkpoint of this run is valid for
    log: TrainLog | None  # the main rank's log; None on the others
    quiet: bool
    tracker: Tracker = field(default_factory=Tracker)  # train.report_to's run (main rank); a no-op otherwise

    @property
    def device(self) -> torch.device:
        return self.dp.device


@dataclass
class LoopOutcome:
    completed: int  # optimizer steps whose update is in the weights
    last_loss: float | None
    last_eval: float | None
    wall_seconds: float


def train(
    cfg: Config,
    resume: bool = False,
    stop_at_step: int | None = None,
    quiet: bool = False,
    on_eval: Callable[[int, int, float], None] | None = None,
    tracking: TrackingContext | None = None,
) -> TrainResult:
    """Fine-tune and save the adapter. `stop_at_step` simulates an interruption (used by tests).

    `on_eval(step, total_steps, eval_loss)` is called after every intermediate evaluation; the
    hyperparameter search uses it to prune a bad trial by raising (the exception propagates).
    `tracking`: a study's place for this run in train.report_to's trackers (training/tracking.py).
    """
    state = setup(cfg, resume=resume, quiet=quiet, tracking=tracking)
    with state.tracker.closed_on_error():  # a run that raises is not left RUNNING in the tracker
        outcome = loop(state, stop_at_step=stop_at_step, on_eval=state.tracker.watch(on_eval))
        return finish(state, outcome)


# --------------------------------------------------------------------------------------------
# setup
# --------------------------------------------------------------------------------------------

def setup(cfg: Config, resume: bool = False, quiet: bool = False, tracking: TrackingContext | None = None) -> TrainState:
    """Validate, load the model and data, plan the batches, build the optimizer and, with `resume`,
    restore the latest checkpoint. The order of the seeded steps is what makes resume exact."""
    t = cfg.train
    _check_train_settings(t)
    require_trackers(t.report_to)  # a missing tracker package fails before the model loads
    peft_methods.validate(cfg.lora, cfg.model.quantize_base)
    method = get_method(cfg.lora.method)
    train_rows = load_split(cfg.data.out_dir, "train")
    eval_rows = load_split(cfg.data.out_dir, "eval")

    dp = setup_data_parallel(resolve_device(cfg.model.device))
    amp_dtype = resolve_autocast_dtype(cfg.model.precision, dp.device)
    frozen_dtype = resolve_frozen_dtype(cfg.model.frozen_dtype, amp_dtype)
    with dp.main_first():  # the first load may convert the bundled GGUF into the shared cache
        loaded = load_base_model(cfg.model, dp.device)
    ensure_chat_template(loaded.tokenizer)
    train_examples = encode_rows(loaded.tokenizer, train_rows, t.max_length, warn=dp.is_main)
    eval_examples = encode_rows(loaded.tokenizer, eval_rows[: t.eval_examples or None], t.max_length, warn=dp.is_main)
    if not train_examples:
        raise LoralabError(f"no training example fits in train.max_length={t.max_length}")

    global_batch = t.batch_size * dp.world_size  # examples per micro-batch, all ranks together
    per_epoch = steps_per_epoch(len(train_examples), global_batch, t.gradient_accumulation)
    total_steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.epochs * per_epoch))
    use_attention(loaded.model, resolve_attention(t.attention, dp.device, amp_dtype))
    model = _prepare_model(loaded.model, cfg, dp, total_steps, frozen_dtype)
    plan = plan_batches([len(e.input_ids) for e in train_examples], global_batch, t.gradient_accumulation, total_steps,
                        t.seed, bucket_factor=BUCKET_FACTOR if t.length_bucketing else 1)
    optimizer, scheduler = _make_optimizer(model, cfg, total_steps)

    run_dir = Path(t.run_dir)
    # PiSSA/OLoRA: the adapter as initialised, before any checkpoint overwrites it (the conversion on save needs it).
    initial_adapter = (peft_methods.save_initial_adapter(model, cfg.lora, run_dir / "initial_adapter")
                       if dp.is_main else None)
    start_step = _resume_or_start_fresh(cfg, method, dp, model, optimizer, scheduler, resume)
    n_trainable, n_total = count_parameters(model)
    if dp.is_main:  # what `loralab ui` reads to show a run while it trains, before training_args.json exists
        atomic_io.write_json(run_dir / "config.json", cfg.to_dict())
    state = TrainState(
        cfg=cfg, method=method, dp=dp, amp_dtype=amp_dtype, frozen_dtype=frozen_dtype, model=model,
        tokenizer=loaded.tokenizer, base_name=loaded.base_name, base_local_dir=loaded.local_dir,
        train_examples=train_examples, eval_examples=eval_examples, plan=plan, total_steps=total_steps,
        steps_per_epoch=per_epoch, answer_nll=_answer_nll(t, amp_dtype),
        trainable_params=[p for p in model.parameters() if p.requires_grad], n_trainable=n_trainable, n_total=n_total,
        optimizer=optimizer, scheduler=scheduler, run_dir=run_dir, initial_adapter=initial_adapter,
        start_step=start_step, fingerprint=resume_fingerprint(cfg, dp.world_size),
        log=TrainLog(Path(t.log_file), run_dir / "log.jsonl", start_step) if dp.is_main else None,
        quiet=quiet or not dp.is_main,
        tracker=open_run(cfg, run_dir, start_step, tracking) if dp.is_main else Tracker(),
    )
    if not state.quiet:
        print(_describe(state), flush=True)
    return state


def _answer_nll(t: TrainConfig, amp_dtype: torch.dtype | None) -> Callable:
    if not t.answer_only_logits:
        return answer_nll_plain
    chunked = t.answer_loss == "chunked" or (t.answer_loss == "auto" and amp_dtype == torch.bfloat16)
    return answer_nll_chunked if chunked else answer_nll_fast


def _check_train_settings(t: TrainConfig) -> None:
    if t.batch_size < 1 or t.gradient_accumulation < 1:
        raise LoralabError("train.batch_size and train.gradient_accumulation must be at least 1")
    if t.learning_rate <= 0:
        raise LoralabError(f"train.learning_rate={t.learning_rate}: must be positive")


def _prepare_model(base: torch.nn.Module, cfg: Config, dp: DataParallel, total_steps: int,
                   frozen_dtype: torch.dtype) -> torch.nn.Module:
    """Attach the method's trainable weights and set the model up for training."""
    torch.manual_seed(cfg.train.seed)  # the same adapter initialisation on every rank
    model = attach_lora(base, cfg.lora, total_steps)
    hold_frozen_weights_in(model, frozen_dtype)
    if cfg.train.fused_lora:
        fuse_lora_layers(model)
    if dp.active:  # from here on the RNG only draws dropout masks: different on each rank, as across examples
        torch.manual_seed(cfg.train.seed * 1_000_003 + dp.rank)
    # Whole-model methods (lora.method=full) have no PEFT wrapper.
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if cfg.model.gradient_checkpointing:
        lm.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=cfg.model.checkpoint_every_n_layers)
    if cfg.train.compile:
        getattr(lm, lm.base_model_prefix).compile(dynamic=True)
    model.train()
    return model


def _make_optimizer(model: torch.nn.Module, cfg: Config, total_steps: int):
    from transformers import get_scheduler

    t = cfg.train
    optimizer = peft_methods.make_optimizer(model, cfg.lora, t.learning_rate, t.weight_decay)
    try:
        scheduler = get_scheduler(
            t.lr_scheduler, optimizer, num_warmup_steps=round(t.warmup_ratio * total_steps),
            num_training_steps=total_steps,
        )
    except ValueError as exc:
        raise LoralabError(f"train.lr_scheduler={t.lr_scheduler!r}: {exc}") from None
    return optimizer, scheduler


def _resume_or_start_fresh(
    cfg: Config, method: Method, dp: DataParallel, model, optimizer, scheduler, resume: bool
) -> int:
    """The step to start from: a checkpoint's with `resume`, else 0 (and stale checkpoints go)."""
    run_dir = Path(cfg.train.run_dir)
    if resume and not method.exact_resume and list_checkpoints(run_dir):
        # e.g. AdaLoRA's rank allocator keeps running importance scores that PEFT cannot save, so a
        # resumed run would differ from an uninterrupted one: start again instead.
        if dp.is_main:
            print(f"lora.method={method.name} cannot resume exactly (PEFT cannot checkpoint all of its state): "
                  "training again from step 0", file=sys.stderr)
        resume = False
    start_step = 0
    if resume:
        # One reader, even across nodes: the main rank's disk holds the checkpoints.
        saved = dp.broadcast(load_latest_checkpoint(run_dir) if dp.is_main else None)
        if saved is None and run_dir.exists() and dp.is_main:
            print(f"no checkpoint under {run_dir}/checkpoints: starting from step 0", file=sys.stderr)
        elif saved is not None:
            if saved.get("fingerprint") != resume_fingerprint(cfg, dp.world_size):
                raise LoralabError(
                    f"the checkpoint in {run_dir}/checkpoints was made with other settings; resume with the same "
                    f"config, or train without --resume (or with another train.run_dir) to start fresh"
                )
            start_step = restore_checkpoint(saved, model, optimizer, scheduler, dp, cfg.lora)
    elif list_checkpoints(run_dir) and dp.is_main:
        shutil.rmtree(run_dir / "checkpoints")  # a fresh run must not resume stale state later
    dp.barrier()
    return start_step


def _describe(state: TrainState) -> str:
    dp = state.dp
    return (
        f"training {state.n_trainable:,} parameters with {state.method.description} "
        f"({100 * state.n_trainable / state.n_total:.2f}% of {state.n_total:,}) "
        f"on {len(state.train_examples)} examples, {state.total_steps} steps, device={state.device.type}, "
        f"autocast={state.amp_dtype or 'fp32'}, frozen weights {str(state.frozen_dtype).removeprefix('torch.')}"
        + (f", {dp.world_size} data-parallel processes" if dp.active else "")
        + (f", resuming at step {state.start_step}" if state.start_step else "")
    )


# --------------------------------------------------------------------------------------------
# loop
# --------------------------------------------------------------------------------------------

def loop(
    state: TrainState, stop_at_step: int | None = None, on_eval: Callable[[int, int, float], None] | None = None
) -> LoopOutcome:
    """Optimizer steps from `state.start_step + 1` to the end, or until a stop is requested (Ctrl-C,
    SIGTERM, `stop_at_step`); logs every step, evaluates and checkpoints on schedule."""
    t, dp = state.cfg.train, state.dp
    previous = [e for e in state.log.entries() if e["step"] <= state.start_step] if state.log else []
    last_loss = previous[-1]["loss"] if previous else None
    last_eval = next((e["eval_loss"] for e in reversed(previous) if e["eval_loss"] is not None), None)
    completed = state.start_step
    started = time.perf_counter()
    bar = tqdm(total=state.total_steps, initial=state.start_step, desc="train", unit="step", disable=state.quiet,
               dynamic_ncols=True)
    with StopRequest() as stop:
        for step in range(state.start_step + 1, state.total_steps + 1):
            if dp.any(stop.requested or (stop_at_step is not None and step > stop_at_step)):
                break  # every rank stops at the same step
            step_started = time.perf_counter()
            last_loss, n_tokens = train_step(state, step)
            completed = step
            entry = {
                "step": step,
                "total_steps": state.total_steps,
                "epoch": round(step / state.steps_per_epoch, 3),
                "loss": round(last_loss, 5),
                "eval_loss": None,
                "lr": state.scheduler.get_last_lr()[0],
                "tokens_per_s": round(n_tokens / (time.perf_counter() - step_started), 1),
                "peak_rss_mb": round(peak_rss_mb(), 1),
                "elapsed_s": round(time.perf_counter() - started, 1),
            }
            if state.eval_examples and t.eval_every > 0 and (step % t.eval_every == 0 or step == state.total_steps):
                last_eval = eval_loss(state)
                entry["eval_loss"] = round(last_eval, 5)
            if state.log:
                state.log.write(entry)
            state.tracker.log_step(entry)  # the same numbers, to train.report_to's trackers
            if on_eval is not None and entry["eval_loss"] is not None:
                on_eval(step, state.total_steps, last_eval)
            bar.set_postfix(loss=f"{last_loss:.3f}", eval=f"{last_eval:.3f}" if last_eval else "-",
                            tok_s=entry["tokens_per_s"])
            bar.update(1)
            if t.save_every > 0 and step % t.save_every == 0 and step < state.total_steps:
                _checkpoint(state, step)
    bar.close()
    return LoopOutcome(completed, last_loss, last_eval, wall_seconds=time.perf_counter() - started)


def train_step(state: TrainState, step: int) -> tuple[float, int]:
    """One optimizer step (1-based) of the batch plan, on every rank: (mean answer-token loss, tokens)."""
    dp, model = state.dp, state.model
    micro_batches = [[state.train_examples[i] for i in mb] for mb in state.plan[step - 1]]  # all ranks' examples
    n_answer = sum(e.n_label_tokens for mb in micro_batches for e in mb)
    n_tokens = sum(len(e.input_ids) for mb in micro_batches for e in mb)
    loss_sum = 0.0
    for examples in map(dp.shard, micro_batches):
        if not examples:
            continue
        batch = {k: v.to(state.device) for k, v in collate(examples, state.tokenizer.pad_token_id).items()}
        with autocast(state.device, state.amp_dtype):
            nll, _ = state.answer_nll(model, batch)
        # Token-weighted over the whole optimizer step (all micro-batches, all ranks): summed
        # over ranks below, this is the gradient one process would get at the same global batch.
        (nll / n_answer).backward()
        loss_sum += nll.item()
    penalty = peft_methods.regularization(model, state.cfg.lora)
    if penalty is not None:  # once per optimizer step, as a 1/world_size share on each rank
        (penalty / dp.world_size).backward()
    dp.sum_gradients(state.trainable_params)
    (loss_sum,) = dp.sum_floats([loss_sum])
    if state.cfg.train.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(state.trainable_params, state.cfg.train.max_grad_norm)
    state.optimizer.step()
    state.scheduler.step()
    peft_methods.after_optimizer_step(model, state.cfg.lora, step)
    state.optimizer.zero_grad(set_to_none=True)
    return loss_sum / n_answer, n_tokens


def eval_loss(state: TrainState) -> float:
    """Mean answer-token loss on the eval examples, each rank taking its share."""
    sums = answer_loss_sums(state.model, state.dp.shard(state.eval_examples), state.tokenizer.pad_token_id,
                            state.cfg.train.batch_size, state.device, state.amp_dtype)
    total, count = state.dp.sum_floats(list(sums))
    return total / max(count, 1)


def _checkpoint(state: TrainState, step: int) -> None:
    t = state.cfg.train
    save_checkpoint(state.run_dir, step, state.model, state.optimizer, state.scheduler, t.keep_checkpoints,
                    state.fingerprint, state.dp, state.cfg.lora)


# --------------------------------------------------------------------------------------------
# finish
# --------------------------------------------------------------------------------------------

def finish(state: TrainState, outcome: LoopOutcome) -> TrainResult:
    """An interrupted run leaves a checkpoint to resume from; a finished one saves the adapter (or
    the whole model), training_args.json and the loss plot, then drops its checkpoints."""
    t, dp = state.cfg.train, state.dp
    if outcome.completed < state.total_steps:
        if outcome.completed > state.start_step:
            _checkpoint(state, outcome.completed)
        if dp.is_main:
            print(f"interrupted after step {outcome.completed}/{state.total_steps}; continue with --resume",
                  file=sys.stderr)
        state.tracker.close("KILLED")  # --resume continues the same tracked run (training/tracking.py)
        dp.barrier()
        return TrainResult(None, outcome.completed, state.total_steps, outcome.last_loss, outcome.last_eval,
                           interrupted=True)
    result = TrainResult(Path(t.output_dir), state.total_steps, state.total_steps, outcome.last_loss, outcome.last_eval,
                         interrupted=False)
    if not dp.is_main:  # the main rank alone writes the adapter, once
        dp.barrier()
        return result
    entries = state.log.entries()
    extra_json = {"training_args.json": training_args(state, outcome, entries)}
    if state.method.whole_model:
        save_full_model(state.model, state.tokenizer, t.output_dir, extra_json=extra_json)
    else:
        save_adapter(state.model, t.output_dir, state.base_name, extra_json=extra_json,
                     initial_adapter=state.initial_adapter)
    if t.loss_plot:
        plot_losses(entries, Path(t.loss_plot))
    state.tracker.log_artifact(t.output_dir, "adapter")
    state.tracker.log_artifact(t.loss_plot, "plots")
    state.tracker.close()
    shutil.rmtree(state.run_dir / "checkpoints", ignore_errors=True)  # the adapter is safe; drop the scaffolding
    shutil.rmtree(state.run_dir / "initial_adapter", ignore_errors=True)
    dp.barrier()
    if not state.quiet:
        eval_text = f"{outcome.last_eval:.4f}" if outcome.last_eval is not None else "-"
        print(f"saved adapter to {t.output_dir}/ (train loss {outcome.last_loss:.4f}, eval loss {eval_text}) "
              f"in {outcome.wall_seconds:.0f} s")
    return result


def training_args(state: TrainState, outcome: LoopOutcome, entries: list[dict]) -> dict:
    """training_args.json: the config and what the run did, saved beside the adapter."""
    return {
        "config": state.cfg.to_dict(),
        "base_model": state.base_name,
        "base_model_local_dir": str(state.base_local_dir),
        "trainable_parameters": state.n_trainable,
        "total_parameters": state.n_total,
        "train_examples": len(state.train_examples),
        "eval_examples_for_loss": len(state.eval_examples),
        "total_steps": state.total_steps,
        # measured, not assumed: why loralab does not pack examples (docs/training.md, "Packing")
        "padding_fraction": round(padding_fraction(state.plan, [len(e.input_ids) for e in state.train_examples]), 4),
        "resumed_from_step": state.start_step or None,
        "final_train_loss": outcome.last_loss,
        "final_eval_loss": outcome.last_eval,
        "train_wall_seconds_this_process": round(outcome.wall_seconds, 1),
        "mean_tokens_per_s": round(sum(e["tokens_per_s"] for e in entries) / max(len(entries), 1), 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "device": state.device.type,
        "data_parallel_processes": state.dp.world_size,
        "autocast": str(state.amp_dtype) if state.amp_dtype else "fp32",
        "frozen_weights_dtype": str(state.frozen_dtype),
        "allocator": allocator_in_use(),  # jemalloc under the `loralab` command where installed (util/allocator.py)
        "versions": _versions(),
        "provenance": provenance.record(None),  # None: the resolved config is "config" above
    }


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}
