"""Training throughput: loralab against the recipes its users would otherwise run, in one run.

    python benchmarks/train_throughput.py               # 2 baselines + 2 loralab paths, 3 seeds: ~20 min (2-core AVX2)
    python benchmarks/train_throughput.py --seeds 42    # one seed: about a third of that
    python benchmarks/train_throughput.py --ablation    # + each loralab technique alone and combined

The baselines, each in its best documented CPU configuration for the CPU at hand:
(a) Trainer + PEFT: transformers.Trainer, PEFT LoRA, `bf16=True` where the CPU has native bf16 and
    fp32 where it does not (bf16 is emulated there, and slower), length-grouped sampling
    (`train_sampling_strategy="group_by_length"`), transformers' DataCollatorForSeq2Seq, the model's
    own loss;
(b) TRL SFTTrainer: completion-only loss and padding-free batches (each batch flattened into one
    row, position ids restarting per example; with `use_cache=False`, as TRL sets it, transformers
    builds a block-diagonal mask for sdpa, so no example sees another), TRL's loss without the full
    logits, bf16 as in (a);
(c) loralab default: `loralab.training.recipe.train` with the default config, i.e. the committed
    training path (bf16 autocast and bf16 frozen weights only with native bf16, length-bucketed
    batches, the output head only at answer positions and its loss chunk by chunk, LoRA layers that
    read one input sharing its dropout mask and A matmul, eager attention where it computes in bf16);
(d) loralab previous default: (c) without the last three (issue 14's paths), as the default was
    before them, so that their gain is visible.
Same bundled model, same first N training examples of data/train_split.json tokenized once by
loralab's chat encoding (so every path sees the same tokens), same LoRA config (r=8, alpha=16,
dropout 0.05, q/k/v/o), learning rate, cosine schedule with the same warmup, weight decay, gradient
clipping, batch size, seed and number of optimizer steps (one epoch). Each path and seed runs in its
own subprocess, so peak RSS is its own; the paths alternate within each seed, so drift of a shared
machine hits them alike.

Printed per path: effective tokens/s (non-padding prompt and answer tokens / training wall time,
model load excluded; total over the seeds), peak RSS (max over the seeds), eval loss on the first 64
eval examples (fp32 base + the trained adapter, the same function for every path; mean over the
seeds, so the order of examples does not decide it), model FLOP utilisation; then the ratios to the
best baseline (the faster of (a) and (b)). Run `loralab prepare` first (make run does).

MFU is against the matmul peak of the dtype the path computes in on this CPU (bf16 only where it
runs bf16, fp32 otherwise), measured in the same run on this model's projection shapes (1024 tokens x
576 -> 576 / 192 / 1536 and 1536 -> 576; the best GFLOP/s over the shapes), so it cannot exceed 100 %
unless a path does less work than the model FLOPs below.

Model FLOPs (what the LoRA step must compute, whatever a path wastes), per example of T tokens with
A answer tokens, for a decoder with L layers, width d, vocabulary V, N frozen parameters outside the
embedding and head, and N_lora adapter parameters:
    4 N T          frozen linears: forward 2NT + input gradients 2NT (no weight gradients)
  + 6 N_lora T     adapter: forward 2, input and weight gradients 4
  + 6 L d T^2      attention scores and values, causal half: forward 2 L d T^2, backward twice that
  + 4 V d A        output head at the answer positions only: forward + input gradient

Timings on a shared 2-core CPU are noisy: compare the ratios printed by one run, with nothing else
running. Results go to benchmarks/results/train_throughput_<cpu class>.json and .md (with --ablation:
train_throughput_<cpu class>_ablation.json and .md); the JSON
records the CPU model and its AVX2 / AVX-512 / bf16 / AMX flags.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}

TRAINER, TRL, PREVIOUS, DEFAULT = "Trainer + PEFT", "TRL SFTTrainer", "loralab previous default", "loralab default"
BASELINES = (TRAINER, TRL)
ALLOCATOR = "allocator"  # not a config key: "system" runs a loralab path without the jemalloc `loralab` preloads
# The speed paths added for issue 14, each switched off: what the default trained with before them.
NEW_PATHS_OFF = {"train.fused_lora": False, "train.answer_loss": "whole", "train.attention": "sdpa"}
ALL_OFF = {
    "model.precision": "fp32",
    "model.frozen_dtype": "fp32",
    "train.length_bucketing": False,
    "train.answer_only_logits": False,
    **NEW_PATHS_OFF,
}
# loralab's ablation: name -> config overrides of loralab's default config
ABLATION = {
    "loralab, every technique off": ALL_OFF,
    "+ length bucketing alone": {**ALL_OFF, "train.length_bucketing": True},
    "+ answer-only logits alone": {**ALL_OFF, "train.answer_only_logits": True},
    "+ answer-only logits, chunked loss": {**ALL_OFF, "train.answer_only_logits": True, "train.answer_loss": "chunked"},
    "+ fused LoRA inputs alone": {**ALL_OFF, "train.fused_lora": True},
    "+ bf16 autocast alone": {**ALL_OFF, "model.precision": "bf16"},
    "+ bf16 autocast and bf16 frozen weights": {**ALL_OFF, "model.precision": "bf16", "model.frozen_dtype": "bf16"},
    "+ bf16 autocast, bf16 weights, eager attention": {**ALL_OFF, "model.precision": "bf16", "model.frozen_dtype": "bf16",
                                                      "train.attention": "eager"},
    "default, sdpa attention": {"train.attention": "sdpa"},
    "default, eager attention": {"train.attention": "eager"},
    "default + checkpointing every 2nd layer": {"model.gradient_checkpointing": True,
                                                "model.checkpoint_every_n_layers": 2},
    "default + checkpointing every layer": {"model.gradient_checkpointing": True},
    "default + torch.compile": {"train.compile": True},
    "default, glibc malloc": {ALLOCATOR: "system"},
}


# ---------------------------------------------------------------------------------------------
# The paths, each run in a child process
# ---------------------------------------------------------------------------------------------

def _common(examples: int, seed: int, overrides: dict):
    from loralab.config import load_config
    from loralab.data.prepare import load_split
    from loralab.model_utils import cpu_supports_bf16

    cfg = load_config(overrides=[f"{k}={v}" for k, v in {**overrides, "train.seed": seed}.items()])
    rows = load_split(REPO / cfg.data.out_dir, "train")[:examples]
    eval_rows = load_split(REPO / cfg.data.out_dir, "eval")[:64]
    return cfg, rows, eval_rows, cpu_supports_bf16()


def _eval_loss(cfg, model_with_adapter, tokenizer, eval_rows) -> float:
    import torch

    from loralab.training.batching import encode_rows
    from loralab.training.eval_loss import mean_answer_loss

    examples = encode_rows(tokenizer, eval_rows, cfg.train.max_length)
    return mean_answer_loss(model_with_adapter.float(), examples, tokenizer.pad_token_id, 16, torch.device("cpu"), None)


def _hf_arguments(cfg, batch_size: int, n_examples: int, bf16: bool, seed: int) -> dict:
    """The TrainingArguments both baselines share: loralab's optimisation settings, nothing saved."""
    return dict(
        output_dir=tempfile.mkdtemp(prefix="bench_hf_"), per_device_train_batch_size=batch_size, num_train_epochs=1,
        learning_rate=cfg.train.learning_rate, lr_scheduler_type=cfg.train.lr_scheduler,
        warmup_steps=round(cfg.train.warmup_ratio * -(-n_examples // batch_size)), weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm, bf16=bf16, logging_steps=1000, save_strategy="no", report_to=[],
        use_cpu=True, seed=seed, data_seed=seed, disable_tqdm=True,
    )


def run_trainer(examples: int, batch_size: int, seed: int, overrides: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from loralab.model_utils import load_base_model
    from loralab.training.batching import encode_rows

    cfg, rows, eval_rows, bf16 = _common(examples, seed, overrides)
    loaded = load_base_model(cfg.model, torch.device("cpu"))
    encoded = encode_rows(loaded.tokenizer, rows, cfg.train.max_length)
    dataset = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in encoded])
    model = get_peft_model(loaded.model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    args = TrainingArguments(**_hf_arguments(cfg, batch_size, len(dataset), bf16, seed),
                             train_sampling_strategy="group_by_length", remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForSeq2Seq(loaded.tokenizer, padding=True))
    wall = _timed(trainer.train)
    return _result(cfg, loaded, encoded, model, eval_rows, wall, "bfloat16" if bf16 else "float32")


def run_trl(examples: int, batch_size: int, seed: int, overrides: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from loralab.data.chat import IGNORE_INDEX
    from loralab.model_utils import load_base_model
    from loralab.training.batching import encode_rows

    cfg, rows, eval_rows, bf16 = _common(examples, seed, overrides)
    loaded = load_base_model(cfg.model, torch.device("cpu"))
    encoded = encode_rows(loaded.tokenizer, rows, cfg.train.max_length)
    # Already tokenized and cut to train.max_length (TRL's documented form for that: input_ids and a
    # completion_mask), so TRL trains on exactly the tokens the other paths do.
    dataset = Dataset.from_list([{"input_ids": e.input_ids, "completion_mask": [int(t != IGNORE_INDEX) for t in e.labels]}
                                 for e in encoded])
    args = SFTConfig(**_hf_arguments(cfg, batch_size, len(dataset), bf16, seed),
                     completion_only_loss=True, padding_free=True, max_length=None)
    trainer = SFTTrainer(model=loaded.model, args=args, train_dataset=dataset, processing_class=loaded.tokenizer,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))
    wall = _timed(trainer.train)
    return _result(cfg, loaded, encoded, trainer.model, eval_rows, wall, "bfloat16" if bf16 else "float32")


def run_loralab(examples: int, batch_size: int, seed: int, overrides: dict) -> dict:
    import torch

    from loralab.model_utils import load_adapter, load_base_model, resolve_autocast_dtype
    from loralab.training.batching import encode_rows
    from loralab.training.recipe import train

    cfg, rows, eval_rows, _ = _common(examples, seed, overrides)
    tmp = Path(tempfile.mkdtemp(prefix="bench_loralab_"))
    (tmp / "data").mkdir()
    (tmp / "data" / "train_split.json").write_text(json.dumps(rows))
    (tmp / "data" / "eval_split.json").write_text(json.dumps(eval_rows))
    cfg.data.out_dir = str(tmp / "data")
    cfg.train.batch_size = batch_size
    cfg.train.eval_every = cfg.train.save_every = 0
    cfg.train.run_dir, cfg.train.output_dir = str(tmp / "run"), str(tmp / "lora")
    cfg.train.results_dir, cfg.train.plot_loss = str(tmp / "results"), False
    train(cfg, quiet=True)
    peak_rss = _peak_rss_mb()  # before the evaluation below loads a second copy of the model
    args = json.loads((tmp / "lora" / "training_args.json").read_text())
    loaded = load_base_model(cfg.model, torch.device("cpu"))
    model = load_adapter(loaded.model, tmp / "lora", trainable=True)  # trainable: _workload counts the adapter
    encoded = encode_rows(loaded.tokenizer, rows, cfg.train.max_length)
    dtype = resolve_autocast_dtype(cfg.model.precision, torch.device("cpu"))
    result = _result(cfg, loaded, encoded, model, eval_rows, args["train_wall_seconds_this_process"],
                     str(dtype or torch.float32).removeprefix("torch."))
    # padding_fraction: the share of computed token slots that were padding, the most packing could save
    return {**result, "peak_rss_mb": peak_rss, "padding_fraction": args["padding_fraction"]}


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _result(cfg, loaded, encoded, model, eval_rows, wall: float, compute_dtype: str) -> dict:
    from loralab.util.allocator import allocator_in_use

    return {"wall_s": wall, "peak_rss_mb": _peak_rss_mb(), "compute_dtype": compute_dtype, "allocator": allocator_in_use(),
            "eval_loss": _eval_loss(cfg, model, loaded.tokenizer, eval_rows), **_workload(loaded, encoded, model)}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _workload(loaded, examples, peft_model) -> dict:
    """Token counts and model FLOPs of the training run (formula in the module docstring)."""
    config = loaded.model.config
    embedding = loaded.model.get_input_embeddings().weight
    head = loaded.model.get_output_embeddings().weight
    frozen = sum(p.numel() for n, p in peft_model.named_parameters() if not p.requires_grad)
    frozen -= embedding.numel() + (0 if head.data_ptr() == embedding.data_ptr() else head.numel())
    n_lora = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    layers, width, vocab = config.num_hidden_layers, config.hidden_size, config.vocab_size
    flops = sum(4 * frozen * len(e.input_ids) + 6 * n_lora * len(e.input_ids) + 6 * layers * width * len(e.input_ids) ** 2
                + 4 * vocab * width * e.n_label_tokens for e in examples)
    return {"tokens": sum(len(e.input_ids) for e in examples), "answer_tokens": sum(e.n_label_tokens for e in examples),
            "model_flops": flops, "lora_params": n_lora}


RUNNERS = {TRAINER: run_trainer, TRL: run_trl}  # anything else is a loralab config


def _child(args) -> None:
    runner = RUNNERS.get(args.path, run_loralab)
    result = runner(args.examples, args.batch_size, args.seed, json.loads(args.overrides))
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# The parent: matmul peak, the runs, the table
# ---------------------------------------------------------------------------------------------

def matmul_peak_gflops(seconds_per_shape: float = 1.0) -> dict:
    import torch

    shapes = [(1024, 576, 576), (1024, 576, 192), (1024, 576, 1536), (1024, 1536, 576)]
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        best = 0.0
        for m, k, n in shapes:
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            for _ in range(3):
                a @ b
            count, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds_per_shape:
                a @ b
                count += 1
            best = max(best, 2 * m * k * n * count / (time.perf_counter() - started) / 1e9)
        out[str(dtype).removeprefix("torch.")] = round(best, 1)
    return out


def _child_env(path: str, overrides: dict) -> dict:
    """The baselines run as their users run them; loralab's paths as the `loralab` command runs them
    (jemalloc preloaded where installed, src/util/allocator.py) unless the path asks for glibc's malloc."""
    from loralab.util.allocator import ENV, jemalloc_library, preload_env

    env = {k: v for k, v in os.environ.items() if k != ENV} | {"HF_HUB_OFFLINE": "1"}
    if path in BASELINES or overrides.get(ALLOCATOR) == "system":
        return env
    return preload_env(env, jemalloc_library()) or env


def _run_child(path: str, overrides: dict, seed: int, args) -> dict:
    config_overrides = {k: v for k, v in overrides.items() if k != ALLOCATOR}
    command = [sys.executable, __file__, "--path", path, "--overrides", json.dumps(config_overrides), "--seed",
               str(seed), "--examples", str(args.examples), "--batch-size", str(args.batch_size)]
    out = subprocess.run(command, capture_output=True, text=True, env=_child_env(path, overrides))
    line = next((text for text in out.stdout.splitlines() if text.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        if path in (*BASELINES, PREVIOUS, DEFAULT):  # the paths the ratios need
            sys.exit(f"{path} (seed {seed}) failed:\n{out.stderr[-3000:]}")
        print(f"  failed (recorded, the others go on): {out.stderr.strip().splitlines()[-1:]}", flush=True)
        return {"error": out.stderr[-2000:]}
    return json.loads(line[len("RESULT "):])


def _summarise(runs: list[dict], peak: dict) -> dict:
    """One path over its seeds: tokens/s of all seeds together, worst peak RSS, mean eval loss."""
    wall, tokens = sum(r["wall_s"] for r in runs), sum(r["tokens"] for r in runs)
    losses = [r["eval_loss"] for r in runs]
    dtype = runs[0]["compute_dtype"]
    gflops = sum(r["model_flops"] for r in runs) / wall / 1e9
    return {
        "tokens_per_s": tokens / wall,
        "tokens_per_s_per_seed": [r["tokens"] / r["wall_s"] for r in runs],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "eval_loss": statistics.mean(losses),
        "eval_loss_sd": statistics.stdev(losses) if len(losses) > 1 else 0.0,
        "compute_dtype": dtype,
        "gflops": gflops,
        "mfu": gflops / peak[dtype],
        "runs": runs,
    }


def _with_ratios(results: dict) -> tuple[str, dict]:
    best = max(BASELINES, key=lambda name: results[name]["tokens_per_s"])
    ref = results[best]
    for r in results.values():
        r["speedup"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["rss_ratio"] = r["peak_rss_mb"] / ref["peak_rss_mb"]
        r["eval_loss_change"] = r["eval_loss"] / ref["eval_loss"] - 1
    return best, results


def _table(results: dict, best: str) -> list[str]:
    """The Markdown table the script prints and writes beside its JSON."""
    lines = [f"| path | computes in | tokens/s | x {best} | peak RSS MB | x | eval loss (mean ± sd) | change | MFU |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['compute_dtype']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['rss_ratio']:.2f} | {r['eval_loss']:.4f} ± {r['eval_loss_sd']:.4f} | "
                     f"{100 * r['eval_loss_change']:+.2f} % | {100 * r['mfu']:.0f} % |")
    return lines


def _targets(d: dict, best: str) -> str:
    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    return (f"targets, loralab default vs the best baseline ({best}): "
            f"tokens/s >= 2.0x: {d['speedup']:.2f}x ({verdict(d['speedup'] >= 2.0)}); "
            f"peak RSS <= 0.6x: {d['rss_ratio']:.2f}x ({verdict(d['rss_ratio'] <= 0.6)}); "
            f"eval loss within 1 %: {100 * d['eval_loss_change']:+.2f} % ({verdict(abs(d['eval_loss_change']) <= 0.01)}); "
            f"MFU >= 60 % of the {d['compute_dtype']} peak: {100 * d['mfu']:.0f} % ({verdict(d['mfu'] >= 0.6)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--ablation", action="store_true", help="also each loralab technique alone, and torch.compile")
    parser.add_argument("--path", help=argparse.SUPPRESS)  # child process
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.path:
        return _child(args)

    from loralab.util.cpu import cpu_profile

    cpu = cpu_profile()
    print(f"CPU: {cpu['cpu']}, {cpu['cores']} cores, class {cpu['class']}; measuring the matmul peak ...", flush=True)
    before = matmul_peak_gflops()
    print(f"matmul peak: {before['float32']} GFLOP/s fp32, {before['bfloat16']} GFLOP/s bf16", flush=True)
    paths = {TRAINER: {}, TRL: {}, PREVIOUS: NEW_PATHS_OFF, DEFAULT: {}, **(ABLATION if args.ablation else {})}
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    for seed in args.seeds:
        for name, overrides in paths.items():
            print(f"seed {seed}: {name} ...", flush=True)
            runs[name].append(_run_child(name, overrides, seed, args))
    # Measured again after the runs, and the higher of the two kept: one short measurement disturbed by the
    # machine (a noisy neighbour on a shared host) would otherwise understate the peak and overstate every MFU.
    after = matmul_peak_gflops()
    peak = {dtype: max(before[dtype], after[dtype]) for dtype in before}
    print(f"matmul peak after the runs: {after['float32']} fp32, {after['bfloat16']} bf16; kept {peak}", flush=True)
    failed = {name: r for name, r in runs.items() if any("error" in x for x in r)}
    best, results = _with_ratios({name: _summarise(r, peak) for name, r in runs.items() if name not in failed})

    first = results[DEFAULT]["runs"][0]
    header = (f"{args.examples} examples, batch {args.batch_size}, seeds {args.seeds}, {first['tokens']} non-padding "
              f"tokens per run ({first['answer_tokens']} answer tokens; loralab's length-bucketed batches pad "
              f"{100 * first['padding_fraction']:.1f} %, the most packing could save); CPU {cpu['cpu']} ({cpu['class']}, "
              f"{cpu['cores']} cores); matmul peak {peak['float32']} fp32 / {peak['bfloat16']} bf16 GFLOP/s")
    table, targets = _table(results, best), _targets(results[DEFAULT], best)
    targets += (f"; loralab default vs its previous default: "
                f"{results[DEFAULT]['tokens_per_s'] / results[PREVIOUS]['tokens_per_s']:.2f}x tokens/s, "
                f"{results[DEFAULT]['peak_rss_mb'] / results[PREVIOUS]['peak_rss_mb']:.2f}x peak RSS")
    print("\n" + header + "\n" + "\n".join(table) + "\n\n" + targets)
    _write(args, cpu, peak, best, results, failed, header, table, targets)


def _write(args, cpu: dict, peak: dict, best: str, results: dict, failed: dict, header: str, table: list[str],
           targets: str) -> None:
    from loralab.util import provenance

    command = ("python benchmarks/train_throughput.py" + (" --ablation" if args.ablation else "")
               + f" --examples {args.examples} --seeds {' '.join(map(str, args.seeds))}")
    stem = RESULTS_DIR / (f"train_throughput_{cpu['class']}" + ("_ablation" if args.ablation else ""))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "examples": args.examples, "batch_size": args.batch_size, "seeds": args.seeds,
              "cpu": cpu, "matmul_peak_gflops": peak, "best_baseline": best,
              "header": header, "table": table, "targets": targets,  # as printed; loralab analysis quotes them
              "overrides": {name: {PREVIOUS: NEW_PATHS_OFF, **ABLATION}.get(name, {}) for name in results
                            if name not in BASELINES},
              "results": results, "failed": failed, "provenance": provenance.record(None, command)}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    stem.with_suffix(".md").write_text(f"Written by `{command}`.\n\n{header}\n\n" + "\n".join(table)
                                       + f"\n\n{targets}\n")
    print(f"wrote {stem.relative_to(REPO)}.json and .md")


if __name__ == "__main__":
    main()
