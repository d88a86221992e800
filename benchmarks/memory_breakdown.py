"""Where training memory goes: weights, saved activations, gradients, optimizer state, the rest.

    python benchmarks/memory_breakdown.py      # ~4 minutes; writes the JSON and the plot below

One training step (forward, backward, AdamW step) of the bundled SmolLM2 as loralab's own `setup()`
(training/recipe.py) builds it, in a fresh process per point so each peak RSS is the point's own. Around loralab's default
(batch 8, length 256, LoRA r=8 on attention, bf16 frozen weights with bf16 autocast, no gradient
checkpointing), one factor at a time: batch size, sequence length, rank, gradient checkpointing,
frozen-weight dtype. Synthetic batches of exactly the given length, the last half of every
sequence labelled as the answer.

Measured per point, exactly, from the tensors themselves:
  weights         bytes of every parameter (frozen base + adapter)
  activations     bytes of the storages autograd saved for backward during the forward
                  (saved_tensors_hooks, each storage counted once, parameters excluded)
  gradients       bytes of the adapter's .grad after backward
  optimizer       bytes of AdamW's state after the step
and the process's peak RSS (ru_maxrss); "other" = peak RSS - the four, i.e. the Python/torch
runtime, libraries and transient buffers (e.g. logits, attention temporaries). Caveats: with fp32
frozen weights, autocast's bf16 copies of the weights are saved for backward and so counted under
activations (about 255 MB here); gradients and optimizer state exist only after the activations are
freed, so "other" is slightly understated (by their size, 10 MB at r=8).
Results: benchmarks/results/memory_breakdown.json, plot experiments/plots/memory_breakdown.png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "memory_breakdown.json"
PLOT = REPO / "experiments" / "plots" / "memory_breakdown.png"

DEFAULT = {"batch_size": 8, "seq_len": 256, "rank": 8, "checkpointing": False, "frozen_dtype": "bf16"}
FACTORS = {
    "batch_size": [1, 2, 4, 8, 16],
    "seq_len": [64, 128, 256, 512],
    "rank": [1, 8, 64],
    "checkpointing": [False, True],
    "frozen_dtype": ["fp32", "bf16"],
}
MB = 1024 * 1024


def measure(point: dict) -> dict:
    import tempfile

    import torch

    from loralab.model_utils import autocast
    from loralab.training.recipe import setup

    with tempfile.TemporaryDirectory(prefix="memory_breakdown_") as scratch:
        state = setup(_config(point, Path(scratch)), quiet=True)  # loralab's own model, numerics and optimizer
    model, optimizer, trainable = state.model, state.optimizer, state.trainable_params
    vocab_size = model.config.vocab_size

    b, t = point["batch_size"], point["seq_len"]
    torch.manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (b, t))
    labels = input_ids.clone()
    labels[:, : t // 2] = -100
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}

    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with autocast(state.device, state.amp_dtype):
            nll, n = state.answer_nll(model, batch)
    (nll / n).backward()
    optimizer.step()
    moments = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    parts = {
        "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
        "activations": sum(saved.values()),
        "gradients": sum(p.grad.numel() * p.grad.element_size() for p in trainable),
        "optimizer": sum(v.numel() * v.element_size() for v in moments),
    }
    out = {k: round(v / MB, 1) for k, v in parts.items()}
    out["peak_rss"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["other"] = round(out["peak_rss"] - sum(out[k] for k in parts), 1)
    out["trainable_params"] = sum(p.numel() for p in trainable)
    return out


def _config(point: dict, scratch: Path):
    """loralab's default config at this point, every output under `scratch`. The batches are synthetic,
    so the data split there is a few rows: enough for setup() to plan one step, nothing to hold in memory."""
    from loralab.config import Config

    cfg = Config()
    cfg.model.device, cfg.model.precision = "cpu", "bf16"
    cfg.model.frozen_dtype = point["frozen_dtype"]
    cfg.model.gradient_checkpointing = point["checkpointing"]
    cfg.lora.r, cfg.lora.alpha = point["rank"], 2 * point["rank"]
    cfg.train.learning_rate, cfg.train.weight_decay, cfg.train.max_steps = 1e-4, 0.0, 1
    cfg.data.out_dir = str(scratch / "data")
    cfg.train.run_dir, cfg.train.output_dir = str(scratch / "run"), str(scratch / "lora")
    cfg.train.results_dir, cfg.train.plot_loss = str(scratch / "results"), False
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
            for i in range(cfg.train.batch_size * cfg.train.gradient_accumulation)]
    (scratch / "data").mkdir(parents=True)
    for split in ("train", "eval"):
        (scratch / "data" / f"{split}_split.json").write_text(json.dumps(rows))
    return cfg


def points() -> list[tuple[str, dict]]:
    return [(factor, {**DEFAULT, factor: value}) for factor, values in FACTORS.items() for value in values]


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from loralab.util import atomic_io

    parts = ["weights", "activations", "gradients", "optimizer", "other"]
    colors = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#BBBBBB"]
    fig, axes = plt.subplots(1, len(FACTORS), figsize=(4 * len(FACTORS), 4.2), sharey=True)
    for ax, factor in zip(axes, FACTORS):
        chosen = [r for r in rows if r["factor"] == factor]
        labels = [str(r["point"][factor]) for r in chosen]
        bottom = [0.0] * len(chosen)
        for part, color in zip(parts, colors):
            values = [max(r["measured"][part], 0.0) for r in chosen]
            ax.bar(labels, values, bottom=bottom, color=color, label=part)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_title(factor.replace("_", " "))
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("MB at peak (one training step)")
    axes[-1].legend(loc="upper left", fontsize=8)
    fig.suptitle("Training memory of SmolLM2-135M + LoRA, one factor at a time around batch 8, length 256, r 8, bf16 weights")
    fig.tight_layout()
    atomic_io.save_figure(fig, PLOT)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--point", help=argparse.SUPPRESS)  # child process: one measurement
    args = parser.parse_args()
    if args.point:
        print("RESULT " + json.dumps(measure(json.loads(args.point))), flush=True)
        return
    rows, cache = [], {}
    for factor, point in points():
        key = json.dumps(point, sort_keys=True)
        if key not in cache:
            print(f"measuring {point} ...", flush=True)
            out = subprocess.run([sys.executable, __file__, "--point", key], capture_output=True, text=True,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1"})
            line = next((text for text in out.stdout.splitlines() if text.startswith("RESULT ")), None)
            if out.returncode != 0 or line is None:
                sys.exit(f"{point} failed:\n{out.stderr[-3000:]}")
            cache[key] = json.loads(line[len("RESULT "):])
        rows.append({"factor": factor, "point": point, "measured": cache[key]})
    print(f"\n{'factor':<15}{'value':>7}{'weights':>9}{'activ.':>9}{'grads':>8}{'optim.':>8}{'other':>8}{'peak RSS':>10}  (MB)")
    for r in rows:
        m = r["measured"]
        print(f"{r['factor']:<15}{str(r['point'][r['factor']]):>7}{m['weights']:>9.1f}{m['activations']:>9.1f}{m['gradients']:>8.1f}"
              f"{m['optimizer']:>8.1f}{m['other']:>8.1f}{m['peak_rss']:>10.1f}")
    from loralab.util import provenance

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/memory_breakdown.py"
    RESULTS.write_text(json.dumps({"command": command, "default": DEFAULT, "rows": rows,
                                   "provenance": provenance.record(None, command)}, indent=2) + "\n")
    plot(rows)
    print(f"wrote {RESULTS.relative_to(REPO)} and {PLOT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
