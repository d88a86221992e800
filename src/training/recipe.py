"""`loralab train`: LoRA fine-tuning in one readable loop (nanoGPT-style).

Why not transformers.Trainer: loralab needs four things Trainer does not give together on a small
CPU: logits only at answer positions (losses.py), length-bucketed batches that waste little on
padding, a batch plan that is a pure function of the seed (so `--resume` reproduces an
uninterrupted run exactly), and artifacts swapped in atomically. PEFT still builds and saves the
adapter; transformers still provides the model and the LR schedules.

Outputs: the adapter in `train.output_dir` (lora/), `training_args.json` beside it,
`train.log_file` (experiments/training_logs.txt), a loss-curve PNG, and checkpoints under
`train.run_dir/checkpoints/` from which `--resume` continues a killed run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import random
import resource
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from loralab.util import atomic_io

from loralab.adapters import methods as peft_methods
from loralab.config import Config
from loralab.data.prepare import load_split
from loralab.training.distributed import DataParallel
from loralab.training.distributed import setup as setup_data_parallel
from loralab.util.errors import LoralabError
from loralab.data.chat import EncodedExample, collate, encode_chat, ensure_chat_template
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

BUCKET_FACTOR = 32  # micro-batches per length-sorted pool: low padding, still well shuffled


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def encode_rows(tokenizer, rows: list[dict], max_length: int, warn: bool = True) -> list[EncodedExample]:
    encoded = [encode_chat(tokenizer, row["messages"], max_length) for row in rows]
    dropped = sum(e is None for e in encoded)
    if dropped and warn:
        print(f"warning: {dropped} of {len(rows)} examples do not fit in train.max_length={max_length} with their "
              f"whole final answer and were left out (raise train.max_length to keep them)", file=sys.stderr)
    return [e for e in encoded if e is not None]


def plan_batches(
    lengths: list[int], batch_size: int, accumulation: int, total_steps: int, seed: int, bucket_factor: int = BUCKET_FACTOR
) -> list[list[list[int]]]:
    """Optimizer steps -> micro-batches -> example indices; a pure function of its arguments.

    Each epoch is a seeded permutation cut into pools of `bucket_factor` micro-batches; a pool is
    sorted by length and cut into micro-batches whose order is then shuffled, so examples of
    similar length share a batch (little padding) without a length-ordered curriculum.
    bucket_factor=1 gives plain random batches.
    """
    steps: list[list[list[int]]] = []
    epoch = 0
    while len(steps) < total_steps:
        rng = random.Random(seed * 100_003 + epoch)
        order = list(range(len(lengths)))
        rng.shuffle(order)
        micro: list[list[int]] = []
        pool = batch_size * bucket_factor
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
            micro += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(micro)
        if len(micro) < accumulation:
            raise LoralabError(
                f"{len(lengths)} training examples make {len(micro)} micro-batches of {batch_size}, fewer than "
                f"train.gradient_accumulation={accumulation}: lower one of them"
            )
        for start in range(0, len(micro) - accumulation + 1, accumulation):
            steps.append(micro[start : start + accumulation])
        epoch += 1
    return steps[:total_steps]


def steps_per_epoch(n_examples: int, batch_size: int, accumulation: int) -> int:
    return max(1, math.ceil(n_examples / batch_size) // accumulation)


@dataclass
class TrainResult:
    adapter_dir: Path | None
    steps_done: int
    total_steps: int
    final_train_loss: float | None
    final_eval_loss: float | None
    interrupted: bool


class TrainLog:
    """Human-readable table (experiments/training_logs.txt) plus JSONL for plots; flushed per line
    so a killed run keeps every finished step."""

    COLUMNS = ("step", "epoch", "loss", "eval_loss", "lr", "tokens_per_s", "peak_rss_mb", "elapsed_s")

    def __init__(self, text_path: Path, jsonl_path: Path, resume_from: int):
        self.text_path, self.jsonl_path = text_path, jsonl_path
        text_path.parent.mkdir(parents=True, exist_ok=True)
        jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from and jsonl_path.exists():  # keep what the checkpoint covers, drop the rest
            kept = [l for l in jsonl_path.read_text().splitlines() if l and json.loads(l)["step"] <= resume_from]
            atomic_io.write_text(jsonl_path, "".join(l + "\n" for l in kept))
            self._append(self.text_path, f"# resumed from checkpoint at step {resume_from}\n")
        else:
            atomic_io.write_text(jsonl_path, "")
            header = "\t".join(f"{c:>12}" for c in self.COLUMNS)
            atomic_io.write_text(text_path, f"# loralab training log, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n{header}\n")

    @staticmethod
    def _append(path: Path, line: str) -> None:
        with path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()

    def write(self, entry: dict) -> None:
        self._append(self.jsonl_path, json.dumps(entry) + "\n")
        cells = []
        for column in self.COLUMNS:
            value = entry.get(column)
            cells.append(f"{'-':>12}" if value is None else f"{value:>12.6g}" if isinstance(value, float) else f"{value:>12}")
        self._append(self.text_path, "\t".join(cells) + "\n")

    def entries(self) -> list[dict]:
        return [json.loads(l) for l in self.jsonl_path.read_text().splitlines() if l]


def plot_losses(entries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(e["step"], e["loss"]) for e in entries if e.get("loss") is not None]
    evals = [(e["step"], e["eval_loss"]) for e in entries if e.get("eval_loss") is not None]
    if train:
        ax.plot(*zip(*train), label="train loss (answer tokens)", alpha=0.6)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss (answer tokens)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("LoRA fine-tuning loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_io.save_figure(fig, path)
    plt.close(fig)


@torch.no_grad()
def answer_loss_sums(model, examples: list[EncodedExample], pad_id: int, batch_size: int, device, amp_dtype) -> tuple[float, int]:
    """(summed answer-token NLL, answer tokens): sums, so data-parallel ranks can add theirs."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start : start + batch_size]], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, amp_dtype):
            nll, n = answer_nll_fast(model, batch)
        total += float(nll)
        count += n
    model.train(was_training)
    return total, count


def mean_answer_loss(model, examples: list[EncodedExample], pad_id: int, batch_size: int, device, amp_dtype) -> float:
    total, count = answer_loss_sums(model, examples, pad_id, batch_size, device, amp_dtype)
    return total / max(count, 1)


def hold_frozen_weights_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store the frozen base weights in `dtype` (bf16 halves their memory, and autocast no longer
    re-casts every fp32 weight on every forward); the trainable adapter stays fp32."""
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point():
            param.data = param.data.to(dtype)


def resolve_frozen_dtype(setting: str, amp_dtype: torch.dtype | None) -> torch.dtype:
    if setting == "auto":
        return amp_dtype if amp_dtype == torch.bfloat16 else torch.float32
    if setting == "bf16" and amp_dtype != torch.bfloat16:  # fp32 activations cannot meet bf16 weights
        raise LoralabError("model.frozen_dtype=bf16 needs bf16 autocast: set model.precision=bf16 (or auto on a bf16 CPU/GPU)")
    if setting in ("bf16", "fp32"):
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[setting]
    raise LoralabError(f"model.frozen_dtype={setting!r}: expected auto, bf16 or fp32")


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def _checkpoints(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("step-*[0-9]"))


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, keep: int, fingerprint: dict, dp: DataParallel,
                    settings) -> None:
    """Saved between steps: the torch RNG of every rank is then exactly as step `step + 1` will find
    it, so LoRA dropout after a resume draws the masks an uninterrupted run would have drawn.
    Called on every rank (they exchange RNG states); only the main rank writes."""
    rng_per_rank = dp.gather(torch.get_rng_state())
    cuda_rng_per_rank = dp.gather(torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    if not dp.is_main:
        return
    with atomic_io.staged_dir(run_dir / "checkpoints" / f"step-{step:07d}") as staged:
        torch.save(
            {
                "step": step,
                "adapter": peft_methods.trainable_state(model, settings),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng_per_rank": rng_per_rank,
                "fingerprint": fingerprint,
                "cuda_rng_per_rank": cuda_rng_per_rank,
            },
            staged / "state.pt",
        )
    for old in _checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_latest_checkpoint(run_dir: Path) -> dict | None:
    for path in reversed(_checkpoints(run_dir)):
        try:
            return torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - an unreadable checkpoint: fall back to the one before
            print(f"warning: skipping unreadable checkpoint {path}", file=sys.stderr)
    return None


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

class StopRequest:
    """Ctrl-C or SIGTERM asks the loop to stop at the next step boundary, where it checkpoints
    exactly the state after the last finished step (an optimizer step cut in half could not be
    resumed faithfully). A second Ctrl-C stops at once; the last periodic checkpoint remains."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to stop now) ...", file=sys.stderr)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def resume_fingerprint(cfg: Config, world_size: int) -> dict:
    """The settings a checkpoint is only valid for: resuming with others would be silently wrong."""
    t = cfg.train
    return {
        "world_size": world_size,  # batch_size is per process: another world size is another batch plan
        "length_bucketing": t.length_bucketing,
        "model": cfg.model.name_or_path,
        "numerics": {k: getattr(cfg.model, k) for k in ("precision", "frozen_dtype", "quantize_base")},
        "lora": dataclasses.asdict(cfg.lora),
        "train": {k: getattr(t, k) for k in ("learning_rate", "lr_scheduler", "warmup_ratio", "weight_decay", "batch_size",
                                              "gradient_accumulation", "epochs", "max_steps", "max_length", "seed")},
        "data": cfg.data.out_dir,
    }


def train(
    cfg: Config,
    resume: bool = False,
    stop_at_step: int | None = None,
    quiet: bool = False,
    on_eval: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """Fine-tune and save the adapter. `stop_at_step` simulates an interruption (used by tests).

    `on_eval(step, total_steps, eval_loss)` is called after every intermediate evaluation; the
    hyperparameter search uses it to prune a bad trial by raising (the exception propagates).
    """
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    t = cfg.train
    if t.batch_size < 1 or t.gradient_accumulation < 1:
        raise LoralabError("train.batch_size and train.gradient_accumulation must be at least 1")
    if t.learning_rate <= 0:
        raise LoralabError(f"train.learning_rate={t.learning_rate}: must be positive")
    peft_methods.validate(cfg.lora, cfg.model.quantize_base)
    train_rows = load_split(cfg.data.out_dir, "train")
    eval_rows = load_split(cfg.data.out_dir, "eval")

    dp = setup_data_parallel(resolve_device(cfg.model.device))
    device = dp.device
    quiet = quiet or not dp.is_main
    amp_dtype = resolve_autocast_dtype(cfg.model.precision, device)
    frozen_dtype = resolve_frozen_dtype(cfg.model.frozen_dtype, amp_dtype)
    with dp.main_first():  # the first load may convert the bundled GGUF into the shared cache
        loaded = load_base_model(cfg.model, device)
    tokenizer = loaded.tokenizer
    ensure_chat_template(tokenizer)
    train_examples = encode_rows(tokenizer, train_rows, t.max_length, warn=dp.is_main)
    eval_examples = encode_rows(tokenizer, eval_rows[: t.eval_examples or None], t.max_length, warn=dp.is_main)
    if not train_examples:
        raise LoralabError(f"no training example fits in train.max_length={t.max_length}")

    global_batch = t.batch_size * dp.world_size  # examples per micro-batch, all ranks together
    per_epoch = steps_per_epoch(len(train_examples), global_batch, t.gradient_accumulation)
    total_steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.epochs * per_epoch))
    torch.manual_seed(t.seed)  # the same adapter initialisation on every rank
    model = attach_lora(loaded.model, cfg.lora, total_steps)
    hold_frozen_weights_in(model, frozen_dtype)
    if dp.active:  # from here on the RNG only draws dropout masks: different on each rank, as across examples
        torch.manual_seed(t.seed * 1_000_003 + dp.rank)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # lora.method=full has no wrapper
    if cfg.model.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if t.compile:
        getattr(lm, lm.base_model_prefix).compile(dynamic=True)
    answer_nll = answer_nll_fast if t.answer_only_logits else answer_nll_plain
    model.train()
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    trainable, total_params = count_parameters(model)

    plan = plan_batches([len(e.input_ids) for e in train_examples], global_batch, t.gradient_accumulation, total_steps,
                        t.seed, bucket_factor=BUCKET_FACTOR if t.length_bucketing else 1)
    optimizer = peft_methods.make_optimizer(model, cfg.lora, t.learning_rate, t.weight_decay)
    try:
        scheduler = get_scheduler(
            t.lr_scheduler, optimizer, num_warmup_steps=round(t.warmup_ratio * total_steps), num_training_steps=total_steps
        )
    except ValueError as exc:
        raise LoralabError(f"train.lr_scheduler={t.lr_scheduler!r}: {exc}") from None

    run_dir = Path(t.run_dir)
    # PiSSA/OLoRA: the adapter as initialised, before any checkpoint overwrites it (the conversion on save needs it).
    initial_adapter = peft_methods.save_initial_adapter(model, cfg.lora, run_dir / "initial_adapter") if dp.is_main else None
    start_step = 0
    if resume and cfg.lora.method == "adalora" and _checkpoints(run_dir):
        # AdaLoRA's rank allocator keeps running importance scores that PEFT cannot save, so a resumed
        # run would allocate ranks differently from an uninterrupted one: start again instead.
        if dp.is_main:
            print("lora.method=adalora cannot resume exactly (its rank allocator state is not checkpointed): "
                  "training again from step 0", file=sys.stderr)
        resume = False
    if resume:
        state = dp.broadcast(load_latest_checkpoint(run_dir) if dp.is_main else None)  # one reader, even across nodes
        if state is None and run_dir.exists() and dp.is_main:
            print(f"no checkpoint under {run_dir}/checkpoints: starting from step 0", file=sys.stderr)
        elif state is not None:
            if state.get("fingerprint") != resume_fingerprint(cfg, dp.world_size):
                raise LoralabError(
                    f"the checkpoint in {run_dir}/checkpoints was made with other settings; resume with the same "
                    f"config, or train without --resume (or with another train.run_dir) to start fresh"
                )
            peft_methods.load_trainable_state(model, cfg.lora, state["adapter"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng_per_rank"][dp.rank])
            if state["cuda_rng_per_rank"][dp.rank] is not None:
                torch.cuda.set_rng_state_all(state["cuda_rng_per_rank"][dp.rank])
            start_step = state["step"]
    elif _checkpoints(run_dir) and dp.is_main:
        shutil.rmtree(run_dir / "checkpoints")  # a fresh run must not resume stale state later
    dp.barrier()
    log = TrainLog(Path(t.log_file), run_dir / "log.jsonl", start_step) if dp.is_main else None

    pad_id = tokenizer.pad_token_id
    if not quiet:
        print(
            f"training {trainable:,} parameters with {peft_methods.METHODS[cfg.lora.method]} ({100 * trainable / total_params:.2f}% of {total_params:,}) "
            f"on {len(train_examples)} examples, {total_steps} steps, device={device.type}, "
            f"autocast={amp_dtype or 'fp32'}, frozen weights {str(frozen_dtype).removeprefix('torch.')}"
            + (f", {dp.world_size} data-parallel processes" if dp.active else "")
            + (f", resuming at step {start_step}" if start_step else ""),
            flush=True,
        )
    started = time.perf_counter()
    previous = [e for e in log.entries() if e["step"] <= start_step] if log else []
    last_loss = previous[-1]["loss"] if previous else None
    last_eval = next((e["eval_loss"] for e in reversed(previous) if e["eval_loss"] is not None), None)
    fingerprint = resume_fingerprint(cfg, dp.world_size)
    completed = start_step  # optimizer steps whose update is in the weights
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=quiet, dynamic_ncols=True)
    with StopRequest() as stop:
        for step in range(start_step + 1, total_steps + 1):
            if dp.any(stop.requested or (stop_at_step is not None and step > stop_at_step)):
                break
            step_started = time.perf_counter()
            micro_batches = [[train_examples[i] for i in mb] for mb in plan[step - 1]]  # all ranks' examples
            n_answer = sum(e.n_label_tokens for mb in micro_batches for e in mb)
            n_tokens = sum(len(e.input_ids) for mb in micro_batches for e in mb)
            loss_sum = 0.0
            for examples in map(dp.shard, micro_batches):
                if not examples:
                    continue
                batch = {k: v.to(device) for k, v in collate(examples, pad_id).items()}
                with autocast(device, amp_dtype):
                    nll, _ = answer_nll(model, batch)
                # Token-weighted over the whole optimizer step (all micro-batches, all ranks): summed
                # over ranks below, this is the gradient one process would get at the same global batch.
                (nll / n_answer).backward()
                loss_sum += nll.item()
            penalty = peft_methods.regularization(model, cfg.lora)
            if penalty is not None:  # once per optimizer step, as a 1/world_size share on each rank
                (penalty / dp.world_size).backward()
            dp.sum_gradients(trainable_params)
            (loss_sum,) = dp.sum_floats([loss_sum])
            if t.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable_params, t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            peft_methods.after_optimizer_step(model, cfg.lora, step)
            optimizer.zero_grad(set_to_none=True)
            completed = step

            last_loss = loss_sum / n_answer
            entry = {
                "step": step,
                "epoch": round(step / per_epoch, 3),
                "loss": round(last_loss, 5),
                "eval_loss": None,
                "lr": scheduler.get_last_lr()[0],
                "tokens_per_s": round(n_tokens / (time.perf_counter() - step_started), 1),
                "peak_rss_mb": round(peak_rss_mb(), 1),
                "elapsed_s": round(time.perf_counter() - started, 1),
            }
            if eval_examples and t.eval_every > 0 and (step % t.eval_every == 0 or step == total_steps):
                eval_sum, eval_count = dp.sum_floats(list(answer_loss_sums(model, dp.shard(eval_examples), pad_id, t.batch_size, device, amp_dtype)))
                last_eval = eval_sum / max(eval_count, 1)
                entry["eval_loss"] = round(last_eval, 5)
            if log:
                log.write(entry)
            if on_eval is not None and entry["eval_loss"] is not None:
                on_eval(step, total_steps, last_eval)
            bar.set_postfix(loss=f"{last_loss:.3f}", eval=f"{last_eval:.3f}" if last_eval else "-", tok_s=entry["tokens_per_s"])
            bar.update(1)
            if t.save_every > 0 and step % t.save_every == 0 and step < total_steps:
                save_checkpoint(run_dir, step, model, optimizer, scheduler, t.keep_checkpoints, fingerprint, dp, cfg.lora)
    if completed < total_steps:
        bar.close()
        if completed > start_step:
            save_checkpoint(run_dir, completed, model, optimizer, scheduler, t.keep_checkpoints, fingerprint, dp, cfg.lora)
        if dp.is_main:
            print(f"interrupted after step {completed}/{total_steps}; continue with --resume", file=sys.stderr)
        dp.barrier()
        return TrainResult(None, completed, total_steps, last_loss, last_eval, interrupted=True)
    bar.close()

    wall = time.perf_counter() - started
    if not dp.is_main:  # the main rank alone writes the adapter, once
        dp.barrier()
        return TrainResult(Path(t.output_dir), total_steps, total_steps, last_loss, last_eval, interrupted=False)
    entries = log.entries()
    training_args = {
        "config": cfg.to_dict(),
        "base_model": loaded.base_name,
        "base_model_local_dir": str(loaded.local_dir),
        "trainable_parameters": trainable,
        "total_parameters": total_params,
        "train_examples": len(train_examples),
        "eval_examples_for_loss": len(eval_examples),
        "total_steps": total_steps,
        "resumed_from_step": start_step or None,
        "final_train_loss": last_loss,
        "final_eval_loss": last_eval,
        "train_wall_seconds_this_process": round(wall, 1),
        "mean_tokens_per_s": round(sum(e["tokens_per_s"] for e in entries) / max(len(entries), 1), 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "device": device.type,
        "data_parallel_processes": dp.world_size,
        "autocast": str(amp_dtype) if amp_dtype else "fp32",
        "frozen_weights_dtype": str(frozen_dtype),
        "versions": _versions(),
    }
    if cfg.lora.method == "full":
        save_full_model(model, tokenizer, t.output_dir, extra_json={"training_args.json": training_args})
    else:
        save_adapter(model, t.output_dir, loaded.base_name, extra_json={"training_args.json": training_args},
                     initial_adapter=initial_adapter)
    if t.loss_plot:
        plot_losses(entries, Path(t.loss_plot))
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the adapter is safe; drop the scaffolding
    shutil.rmtree(run_dir / "initial_adapter", ignore_errors=True)
    dp.barrier()
    if not quiet:
        eval_text = f"{last_eval:.4f}" if last_eval is not None else "-"
        print(f"saved adapter to {t.output_dir}/ (train loss {last_loss:.4f}, eval loss {eval_text}) in {wall:.0f} s")
    return TrainResult(Path(t.output_dir), total_steps, total_steps, last_loss, last_eval, interrupted=False)


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}

