"""Training throughput: the plain PEFT-docs recipe versus loralab's training path, in one run.

    python benchmarks/train_throughput.py [--examples 64] [--batch-size 8]

(a) plain: transformers.Trainer + PEFT LoRA, fp32, batches padded to their longest sequence,
    logits for every position (the model's own loss), the Trainer's random batch order;
(b) loralab: `loralab.fine_tune_lora.train` with the default config (bf16 autocast where the CPU
    has it, length-bucketed batches, the output head only at answer positions).
Same bundled model, same first N training examples of data/train_split.json, same LoRA config
(r=8, alpha=16, dropout 0.05, q/k/v/o), learning rate, schedule and seed. Each path runs in its
own subprocess so peak RSS is its own. Printed per path: effective tokens/s (non-padding prompt and
answer tokens / training wall time), peak RSS, and eval loss on the first 64 eval examples (fp32,
same function for both); then the ratios b/a. Run `loralab prepare` first (make run does).
Timings on a shared 2-core CPU are noisy: compare the ratios printed by one run.
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


def _common(examples: int):
    """The default config and the rows both paths train and evaluate on."""
    import torch

    from loralab.config import Config
    from loralab.data_preparation import load_split

    cfg = Config()
    torch.manual_seed(cfg.train.seed)
    rows = load_split(REPO / cfg.data.out_dir, "train")[:examples]
    eval_rows = load_split(REPO / cfg.data.out_dir, "eval")[:64]
    return cfg, rows, eval_rows


def run_plain(examples: int, batch_size: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from loralab.fine_tune_lora import encode_rows, mean_answer_loss
    from loralab.formatting import EncodedExample, collate
    from loralab.model_utils import load_base_model

    cfg, rows, eval_rows = _common(examples)
    loaded = load_base_model(cfg.model, torch.device("cpu"))
    train_examples = encode_rows(loaded.tokenizer, rows, cfg.train.max_length)
    eval_examples = encode_rows(loaded.tokenizer, eval_rows, cfg.train.max_length)
    model = get_peft_model(loaded.model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))
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
    eval_loss = mean_answer_loss(model, eval_examples, loaded.tokenizer.pad_token_id, 16, torch.device("cpu"), None)
    return {"tokens": sum(len(e.input_ids) for e in train_examples), "wall_s": wall, "eval_loss": eval_loss}


def run_loralab(examples: int, batch_size: int) -> dict:
    import tempfile

    import torch

    from loralab.fine_tune_lora import encode_rows, mean_answer_loss, train
    from loralab.model_utils import load_adapter, load_base_model

    cfg, rows, eval_rows = _common(examples)
    tmp = Path(tempfile.mkdtemp(prefix="bench_loralab_"))
    (tmp / "data").mkdir()
    (tmp / "data" / "train_split.json").write_text(json.dumps(rows))
    (tmp / "data" / "eval_split.json").write_text(json.dumps(eval_rows))
    cfg.data.out_dir = str(tmp / "data")
    cfg.train.batch_size = batch_size
    cfg.train.eval_every = 0
    cfg.train.save_every = 0
    cfg.train.run_dir, cfg.train.output_dir = str(tmp / "run"), str(tmp / "lora")
    cfg.train.log_file, cfg.train.loss_plot = str(tmp / "log.txt"), ""
    train(cfg, quiet=True)
    args = json.loads((tmp / "lora" / "training_args.json").read_text())
    loaded = load_base_model(cfg.model, torch.device("cpu"))
    model = load_adapter(loaded.model, tmp / "lora")
    eval_examples = encode_rows(loaded.tokenizer, eval_rows, cfg.train.max_length)
    eval_loss = mean_answer_loss(model, eval_examples, loaded.tokenizer.pad_token_id, 16, torch.device("cpu"), None)
    train_examples = encode_rows(loaded.tokenizer, rows, cfg.train.max_length)
    return {"tokens": sum(len(e.input_ids) for e in train_examples), "wall_s": args["train_wall_seconds_this_process"], "eval_loss": eval_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--path", choices=("plain", "loralab"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.path:
        result = (run_plain if args.path == "plain" else run_loralab)(args.examples, args.batch_size)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(result), flush=True)
        return
    results = {}
    for path in ("plain", "loralab"):
        print(f"running {path} ...", flush=True)
        out = subprocess.run([sys.executable, __file__, "--path", path, "--examples", str(args.examples), "--batch-size", str(args.batch_size)],
                             capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if out.returncode != 0 or line is None:
            sys.exit(f"{path} failed:\n{out.stderr[-3000:]}")
        results[path] = json.loads(line[len("RESULT "):])
        results[path]["tokens_per_s"] = results[path]["tokens"] / results[path]["wall_s"]
    a, b = results["plain"], results["loralab"]
    print(f"\n{args.examples} examples, batch {args.batch_size}, {a['tokens']} non-padding tokens")
    print(f"{'path':<10}{'tokens/s':>12}{'peak RSS MB':>14}{'eval loss':>12}")
    for name, r in results.items():
        print(f"{name:<10}{r['tokens_per_s']:>12.1f}{r['peak_rss_mb']:>14.0f}{r['eval_loss']:>12.4f}")
    print(f"ratio b/a: tokens/s {b['tokens_per_s'] / a['tokens_per_s']:.2f}x, peak RSS {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x, "
          f"eval loss {b['eval_loss'] / a['eval_loss']:.3f}x")


if __name__ == "__main__":
    main()
