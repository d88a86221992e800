"""Where training memory goes: weights, saved activations, gradients, optimizer state, the rest.

    python benchmarks/memory_breakdown.py      # ~4 minutes; writes the JSON and the plot below

One training step (forward, backward, AdamW step) of the bundled SmolLM2 with loralab's training
path, in a fresh process per point so each peak RSS is the point's own. Around loralab's default
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
    import torch

    from loralab.config import Config
    from loralab.training.recipe import hold_frozen_weights_in
    from loralab.metrics.losses import answer_nll_fast
    from loralab.model_utils import attach_lora, autocast, load_base_model

    torch.manual_seed(0)
    cfg = Config()
    cfg.lora.r, cfg.lora.alpha = point["rank"], 2 * point["rank"]
    device = torch.device("cpu")
    loaded = load_base_model(cfg.model, device)
    model = attach_lora(loaded.model, cfg.lora)
    hold_frozen_weights_in(model, torch.bfloat16 if point["frozen_dtype"] == "bf16" else torch.float32)
    if point["checkpointing"]:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    b, t = point["batch_size"], point["seq_len"]
    input_ids = torch.randint(0, loaded.model.config.vocab_size, (b, t))
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
        with autocast(device, torch.bfloat16):
            nll, n = answer_nll_fast(model, batch)
    (nll / n).backward()
    optimizer.step()
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    parts = {
        "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
        "activations": sum(saved.values()),
        "gradients": sum(p.grad.numel() * p.grad.element_size() for p in trainable),
        "optimizer": sum(v.numel() * v.element_size() for v in state),
    }
    out = {k: round(v / MB, 1) for k, v in parts.items()}
    out["peak_rss"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["other"] = round(out["peak_rss"] - sum(out[k] for k in parts), 1)
    out["trainable_params"] = sum(p.numel() for p in trainable)
    return out


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
            line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
            if out.returncode != 0 or line is None:
                sys.exit(f"{point} failed:\n{out.stderr[-3000:]}")
            cache[key] = json.loads(line[len("RESULT "):])
        rows.append({"factor": factor, "point": point, "measured": cache[key]})
    print(f"\n{'factor':<15}{'value':>7}{'weights':>9}{'activ.':>9}{'grads':>8}{'optim.':>8}{'other':>8}{'peak RSS':>10}  (MB)")
    for r in rows:
        m = r["measured"]
        print(f"{r['factor']:<15}{str(r['point'][r['factor']]):>7}{m['weights']:>9.1f}{m['activations']:>9.1f}{m['gradients']:>8.1f}"
              f"{m['optimizer']:>8.1f}{m['other']:>8.1f}{m['peak_rss']:>10.1f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"command": "python benchmarks/memory_breakdown.py", "default": DEFAULT, "rows": rows}, indent=2) + "\n")
    plot(rows)
    print(f"wrote {RESULTS.relative_to(REPO)} and {PLOT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
