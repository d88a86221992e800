"""Training throughput: the plain PEFT-docs recipe versus loralab's training path, in one run.

    python benchmarks/train_throughput.py              # plain vs loralab default, ~7 minutes
    python benchmarks/train_throughput.py --ablation   # + each technique alone and combined, ~25 minutes

(a) plain: transformers.Trainer + PEFT LoRA, fp32, batches padded to their longest sequence, logits
    for every position (the model's own loss), the Trainer's random batch order;
(b) loralab: `loralab.training.recipe.train` with the default config: bf16 autocast where the CPU has
    it, frozen base weights held in bf16, length-bucketed batches, the output head only at answer
    positions. The ablation adds loralab's loop with every technique off, each technique alone on
    top of that, and the default plus torch.compile.
Same bundled model, same first N training examples of data/train_split.json, same LoRA config
(r=8, alpha=16, dropout 0.05, q/k/v/o), learning rate, schedule and seed. Each path runs in its own
subprocess, so peak RSS (the process's peak up to the end of training) is its own.
Printed per path: effective tokens/s (non-padding prompt and
answer tokens / training wall time, model load excluded), peak RSS, eval loss on the first 64 eval
examples (fp32 base + the trained adapter, the same function for every path), model FLOP
utilisation; then the ratios to (a). Run `loralab prepare` first (make run does).

Matmul peak: measured in the same run, fp32 and bf16, on this model's projection shapes
(1024 tokens x 576 -> 576 / 192 / 1536 and 1536 -> 576); the best GFLOP/s over the shapes.

Model FLOPs (what the LoRA step must compute, whatever a path wastes), per example of T tokens with
A answer tokens, for a decoder with L layers, width d, vocabulary V, N frozen parameters outside the
embedding and head, and N_lora adapter parameters:
    4 N T          frozen linears: forward 2NT + input gradients 2NT (no weight gradients)
  + 6 N_lora T     adapter: forward 2, input and weight gradients 4
  + 6 L d T^2      attention scores and values, causal half: forward 2 L d T^2, backward twice that
  + 4 V d A        output head at the answer positions only: forward + input gradient
MFU = model FLOPs / training wall time / measured bf16 matmul peak.
Timings on a shared 2-core CPU are noisy: compare the ratios printed by one run, with nothing else
running. Results go to benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "train_throughput.json"

ALL_OFF = {
    "model.precision": "fp32",
    "model.frozen_dtype": "fp32",
    "train.length_bucketing": False,
    "train.answer_only_logits": False,
}
# name -> config overrides of loralab's default config
VARIANTS = {
    "loralab, every technique off": ALL_OFF,
    "+ length bucketing alone": {**ALL_OFF, "train.length_bucketing": True},
    "+ answer-only logits alone": {**ALL_OFF, "train.answer_only_logits": True},
    "+ bf16 autocast alone": {**ALL_OFF, "model.precision": "bf16"},
    "+ bf16 autocast and bf16 frozen weights": {**ALL_OFF, "model.precision": "bf16", "model.frozen_dtype": "bf16"},
    "loralab default (all combined)": {},
    "default + torch.compile": {"train.compile": True},
}
DEFAULT = "loralab default (all combined)"


def _common(examples: int, overrides: dict):
    import torch

    from loralab.config import load_config
    from loralab.data.prepare import load_split

    cfg = load_config(overrides=[f"{k}={v}" for k, v in overrides.items()])
    torch.manual_seed(cfg.train.seed)
    rows = load_split(REPO / cfg.data.out_dir, "train")[:examples]
    eval_rows = load_split(REPO / cfg.data.out_dir, "eval")[:64]
    return cfg, rows, eval_rows


def _eval_loss(cfg, model_with_adapter, tokenizer, eval_rows) -> float:
    import torch

    from loralab.training.batching import encode_rows
    from loralab.training.eval_loss import mean_answer_loss

    examples = encode_rows(tokenizer, eval_rows, cfg.train.max_length)
    return mean_answer_loss(model_with_adapter.float(), examples, tokenizer.pad_token_id, 16, torch.device("cpu"), None)


def run_plain(examples: int, batch_size: int, overrides: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from loralab.data.chat import EncodedExample, collate
    from loralab.model_utils import load_base_model
    from loralab.training.batching import encode_rows

    cfg, rows, eval_rows = _common(examples, overrides)
    loaded = load_base_model(cfg.model, torch.device("cpu"))
    train_examples = encode_rows(loaded.tokenizer, rows, cfg.train.max_length)
    model = get_peft_model(
        loaded.model,
        LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"
        ),
    )
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in train_examples]

    class Examples:  # what the Trainer's collator receives: pad to the longest in the batch
        def __call__(self, features):
            return collate([EncodedExample(f["input_ids"], f["labels"]) for f in features], loaded.tokenizer.pad_token_id)

    args = TrainingArguments(
        output_dir=str(REPO / "runs" / "bench_plain"), per_device_train_batch_size=batch_size, num_train_epochs=1,
        learning_rate=cfg.train.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=round(cfg.train.warmup_ratio * -(-len(dataset) // batch_size)),
        max_grad_norm=1.0, logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True, seed=cfg.train.seed,
        remove_unused_columns=False, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=Examples())
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    return {
        "wall_s": wall,
        "peak_rss_mb": _peak_rss_mb(),
        "eval_loss": _eval_loss(cfg, model, loaded.tokenizer, eval_rows),
        **_workload(cfg, loaded, train_examples, model),
    }


def run_loralab(examples: int, batch_size: int, overrides: dict) -> dict:
    import tempfile

    import torch

    from loralab.model_utils import load_adapter, load_base_model
    from loralab.training.batching import encode_rows
    from loralab.training.recipe import train

    cfg, rows, eval_rows = _common(examples, overrides)
    tmp = Path(tempfile.mkdtemp(prefix="bench_loralab_"))
    (tmp / "data").mkdir()
    (tmp / "data" / "train_split.json").write_text(json.dumps(rows))
    (tmp / "data" / "eval_split.json").write_text(json.dumps(eval_rows))
    cfg.data.out_dir = str(tmp / "data")
    cfg.train.batch_size = batch_size
    cfg.train.eval_every = 0
    cfg.train.save_every = 0
    cfg.train.run_dir, cfg.train.output_dir = str(tmp / "run"), str(tmp / "lora")
    cfg.train.results_dir, cfg.train.plot_loss = str(tmp / "results"), False
    train(cfg, quiet=True)
    peak_rss = _peak_rss_mb()  # before the evaluation below loads a second copy of the model
    args = json.loads((tmp / "lora" / "training_args.json").read_text())
    steps = [json.loads(line) for line in (tmp / "run" / "log.jsonl").read_text().splitlines()]
    loaded = load_base_model(cfg.model, torch.device("cpu"))
    model = load_adapter(loaded.model, tmp / "lora", trainable=True)  # trainable: _workload counts the adapter's parameters
    train_examples = encode_rows(loaded.tokenizer, rows, cfg.train.max_length)
    # tokens/s of the steps after the first three (torch.compile compiles during the first ones)
    steady = sorted(s["tokens_per_s"] for s in steps[3:]) or [0.0]
    return {
        "wall_s": args["train_wall_seconds_this_process"],
        "peak_rss_mb": peak_rss,
        "eval_loss": _eval_loss(cfg, model, loaded.tokenizer, eval_rows),
        "steady_tokens_per_s_median": steady[len(steady) // 2],
        **_workload(cfg, loaded, train_examples, model),
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _workload(cfg, loaded, examples, peft_model) -> dict:
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
            "model_flops": flops, "frozen_params_outside_embedding": frozen, "lora_params": n_lora}


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


def _child(args) -> None:
    overrides = json.loads(args.overrides)
    result = (run_plain if args.path == "plain" else run_loralab)(args.examples, args.batch_size, overrides)
    print("RESULT " + json.dumps(result), flush=True)


def _run(path: str, overrides: dict, args) -> dict:
    command = [sys.executable, __file__, "--path", path, "--overrides", json.dumps(overrides),
               "--examples", str(args.examples), "--batch-size", str(args.batch_size)]
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = next((text for text in out.stdout.splitlines() if text.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        if path == "plain" or not overrides:  # the two paths the ratios need
            sys.exit(f"{path} {overrides} failed:\n{out.stderr[-3000:]}")
        print(f"  failed (recorded, the others go on): {out.stderr.strip().splitlines()[-1:]}", flush=True)
        return {"error": out.stderr[-2000:]}
    result = json.loads(line[len("RESULT "):])
    result["tokens_per_s"] = result["tokens"] / result["wall_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ablation", action="store_true", help="also each technique alone, and torch.compile")
    parser.add_argument("--path", choices=("plain", "loralab"), help=argparse.SUPPRESS)  # child process
    parser.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.path:
        return _child(args)

    print("measuring the matmul peak ...", flush=True)
    peak = matmul_peak_gflops()
    print(f"matmul peak: {peak['float32']} GFLOP/s fp32, {peak['bfloat16']} GFLOP/s bf16", flush=True)
    names = ["plain"] + (list(VARIANTS) if args.ablation else [DEFAULT])
    results = {}
    for name in names:
        print(f"running {name} ...", flush=True)
        results[name] = _run("plain", {}, args) if name == "plain" else _run("loralab", VARIANTS[name], args)
        r = results[name]
        if "error" in r:
            continue
        r["gflops"] = r["model_flops"] / r["wall_s"] / 1e9
        r["mfu_vs_bf16_peak"] = r["gflops"] / peak["bfloat16"]
    failed = {name: results.pop(name) for name in [n for n, r in results.items() if "error" in r]}
    plain = results["plain"]
    for r in results.values():
        r["speedup"] = r["tokens_per_s"] / plain["tokens_per_s"]
        r["rss_ratio"] = r["peak_rss_mb"] / plain["peak_rss_mb"]
        r["eval_loss_ratio"] = r["eval_loss"] / plain["eval_loss"]

    print(f"\n{args.examples} examples, batch {args.batch_size}, {plain['tokens']} non-padding tokens "
          f"({plain['answer_tokens']} answer tokens); matmul peak {peak['float32']} fp32 / {peak['bfloat16']} bf16 GFLOP/s")
    print(
        f"{'path':<42}{'tokens/s':>10}{'x plain':>9}{'peak RSS MB':>13}{'x plain':>9}"
        f"{'eval loss':>11}{'x plain':>9}{'GFLOP/s':>9}{'MFU':>7}"
    )
    for name, r in results.items():
        print(f"{name:<42}{r['tokens_per_s']:>10.1f}{r['speedup']:>9.2f}{r['peak_rss_mb']:>13.0f}{r['rss_ratio']:>9.2f}"
              f"{r['eval_loss']:>11.4f}{r['eval_loss_ratio']:>9.3f}{r['gflops']:>9.1f}{100 * r['mfu_vs_bf16_peak']:>6.0f}%")
    d = results[DEFAULT]
    print(
        f"\ntargets (loralab default vs plain): tokens/s >= 2.0x: {d['speedup']:.2f}x; peak RSS <= 0.6x: {d['rss_ratio']:.2f}x; "
        f"eval loss within 1 %: {100 * (d['eval_loss_ratio'] - 1):+.2f} %; "
        f"MFU >= 60 % of bf16 peak: {100 * d['mfu_vs_bf16_peak']:.0f} %"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "command": "python benchmarks/train_throughput.py" + (" --ablation" if args.ablation else ""),
                "examples": args.examples,
                "batch_size": args.batch_size,
                "cpu_count": os.cpu_count(),
                "matmul_peak_gflops": peak,
                "variants": {k: VARIANTS.get(k, "Trainer + PEFT, fp32") for k in results},
                "results": results,
                "failed": failed,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
