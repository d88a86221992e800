"""`loralab analysis`: experiments/optimization_analysis.md, regenerated from the committed results.

Every table is read from a JSON file that a named command wrote; this module computes nothing new
and measures nothing, so the write-up can be rebuilt in a second and can never drift from the
results. A result file that is missing gives a line saying which command produces it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import atomic_io

SOURCES = {
    "throughput": ("benchmarks/results/train_throughput.json", "python benchmarks/train_throughput.py --ablation"),
    "memory": ("benchmarks/results/memory_breakdown.json", "python benchmarks/memory_breakdown.py"),
    "sensitivity": ("experiments/sensitivity.json", "loralab sweep --config experiments/best_config.yaml"),
    "tuning": ("experiments/metrics_comparison.json", "loralab tune"),
}


def _load(root: Path, name: str) -> dict | None:
    path = root / SOURCES[name][0]
    return json.loads(path.read_text()) if path.is_file() else None


def _missing(name: str) -> list[str]:
    path, command = SOURCES[name]
    return [f"_Not measured yet: `{command}` writes `{path}`._", ""]


def _throughput(data: dict | None) -> list[str]:
    lines = ["## Training throughput: plain PEFT recipe versus loralab", ""]
    if data is None:
        return lines + _missing("throughput")
    peak = data["matmul_peak_gflops"]
    lines += [
        f"Command: `{data['command']}` ({data['examples']} training examples, batch {data['batch_size']}, "
        f"{data['cpu_count']} CPU cores, each path in its own process). Raw results: `{SOURCES['throughput'][0]}`.",
        f"Matmul peak measured in the same run, on this model's projection shapes: {peak['float32']:.0f} GFLOP/s fp32, "
        f"{peak['bfloat16']:.0f} GFLOP/s bf16. MFU is model FLOPs (formula in the script's docstring) per second over "
        "the bf16 peak. Tokens/s count non-padding tokens over training wall time; peak RSS is the training process's.",
        "",
        "| path | tokens/s | x plain | steady tokens/s | peak RSS MB | x plain | eval loss | x plain | GFLOP/s | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in data["results"].items():
        steady = f"{r['steady_tokens_per_s_median']:.0f}" if "steady_tokens_per_s_median" in r else "-"
        lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f} | {steady} | {r['peak_rss_mb']:.0f} | "
                     f"{r['rss_ratio']:.2f} | {r['eval_loss']:.4f} | {r['eval_loss_ratio']:.3f} | {r['gflops']:.1f} | "
                     f"{100 * r['mfu_vs_bf16_peak']:.0f} % |")
    default = next((r for name, r in data["results"].items() if name.startswith("loralab default")), None)
    if default:
        checks = [
            ("tokens/s at least 2.0x the plain recipe", default["speedup"] >= 2.0, f"{default['speedup']:.2f}x"),
            ("peak memory at most 0.6x", default["rss_ratio"] <= 0.6, f"{default['rss_ratio']:.2f}x"),
            ("eval loss within 1 % of the plain recipe", abs(default["eval_loss_ratio"] - 1) <= 0.01,
             f"{100 * (default['eval_loss_ratio'] - 1):+.2f} %"),
            ("MFU at least 60 % of the bf16 matmul peak", default["mfu_vs_bf16_peak"] >= 0.6, f"{100 * default['mfu_vs_bf16_peak']:.0f} %"),
        ]
        lines += ["", "Targets for the default path:", ""]
        lines += [f"- {text}: **{'met' if ok else 'missed'}** ({value})" for text, ok, value in checks]
    return lines + [""]


def _memory(data: dict | None, md_dir: Path, root: Path) -> list[str]:
    lines = ["## Training memory: where it goes", ""]
    if data is None:
        return lines + _missing("memory")
    plot = os.path.relpath(root / "experiments/plots/memory_breakdown.png", md_dir)
    lines += [
        f"Command: `{data['command']}`. One training step per point, each in a fresh process, one factor at a time "
        f"around {data['default']}. Weights, activations (storages autograd saved for backward), gradients and "
        "optimizer state are exact tensor sizes; peak RSS is the process's; other = peak RSS minus those four "
        "(Python and torch runtime, libraries, transient buffers). With fp32 frozen weights, autocast's bf16 weight "
        "copies are saved for backward and counted as activations.",
        "",
        "| factor | value | weights MB | activations MB | gradients MB | optimizer MB | other MB | peak RSS MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in data["rows"]:
        m = row["measured"]
        lines.append(f"| {row['factor']} | {row['point'][row['factor']]} | {m['weights']:.0f} | {m['activations']:.0f} | "
                     f"{m['gradients']:.1f} | {m['optimizer']:.1f} | {m['other']:.0f} | {m['peak_rss']:.0f} |")
    return lines + ["", f"![memory breakdown]({plot})", ""]


def _sensitivity(data: dict | None, md_dir: Path, root: Path) -> list[str]:
    lines = ["## Sensitivity around the tuned configuration", ""]
    if data is None:
        return lines + _missing("sensitivity")
    plot = os.path.relpath(root / "experiments/plots/sensitivity.png", md_dir)
    lines += [f"Command: `{SOURCES['sensitivity'][1]}`; every point is in `experiments/sensitivity.md`. Eval split, "
              f"{data['trial_examples']} training examples per point. Best and worst point of each factor by eval perplexity:", "",
              "| factor | best value | eval ppl | domain acc. % | worst value | eval ppl | domain acc. % |", "|---|---|---:|---:|---|---:|---:|"]
    for factor in dict.fromkeys(p["factor"] for p in data["points"]):
        points = sorted((p for p in data["points"] if p["factor"] == factor), key=lambda p: p["eval_perplexity"])
        best, worst = points[0], points[-1]
        lines.append(f"| `{factor}` | {_value(best['resolved'])} | {best['eval_perplexity']:.2f} | {best['domain_accuracy']:.1f} ± "
                     f"{best['domain_accuracy_se']:.1f} | {_value(worst['resolved'])} | {worst['eval_perplexity']:.2f} | "
                     f"{worst['domain_accuracy']:.1f} ± {worst['domain_accuracy_se']:.1f} |")
    return lines + ["", f"![sensitivity]({plot})", ""]


def _value(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _tuning(data: dict | None) -> list[str]:
    lines = ["## Hyperparameter search", ""]
    if data is None:
        return lines + _missing("tuning")
    best = data["best"]
    importances = ", ".join(f"`{k}` {v:.2f}" for k, v in (data.get("param_importances") or {}).items())
    params = ", ".join(f"`{k}`={v:.3g}" if isinstance(v, float) else f"`{k}`={v}" for k, v in best["params"].items())
    counts = ", ".join(f"{n} {state.lower()}" for state, n in data["counts"].items())
    return lines + [
        f"Command: `{SOURCES['tuning'][1]}` ({data['sampler']} sampler, {data['pruner']} pruner; trials: {counts}); "
        "the full table is `experiments/tuning_summary.md`.",
        f"Best trial {best['number']}: eval loss {best['eval_loss']:.4f} with {params}.",
        f"Parameter importances: {importances}.", "",
    ]


def write_analysis(root: str | Path = ".", out: str | Path = "experiments/optimization_analysis.md") -> Path:
    root, out = Path(root), Path(root) / out
    md_dir = out.parent
    lines = [
        "# Optimization analysis",
        "",
        "Generated by `loralab analysis` from the committed results; each section names the command that measured it. "
        "All timings are from this project's 2-core CPU; compare ratios within one run.",
        "",
    ]
    lines += _throughput(_load(root, "throughput"))
    lines += _memory(_load(root, "memory"), md_dir, root)
    lines += _tuning(_load(root, "tuning"))
    lines += _sensitivity(_load(root, "sensitivity"), md_dir, root)
    atomic_io.write_text(out, "\n".join(lines))
    return out
