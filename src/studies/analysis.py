"""`loralab analysis`: experiments/optimization_analysis.md, regenerated from the committed results,
and the findings on their own (experiments/method_findings.md, experiments/domain_findings.md) for
the docs to link to.

Every table is read from a JSON file that a named command wrote; this module computes nothing new
and measures nothing, so the write-up can be rebuilt in a second and can never drift from the
results. A result file that is missing gives a line saying which command produces it. It writes
only under experiments/.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from loralab.adapters.registry import get_method
from loralab.util import atomic_io
from loralab.util.cpu import CPU_CLASSES
from loralab.util.resources import machine_summary

SOURCES = {
    "throughput": ("benchmarks/results/train_throughput_<cpu class>.json", "python benchmarks/train_throughput.py"),
    "memory": ("benchmarks/results/memory_breakdown.json", "python benchmarks/memory_breakdown.py"),
    "sensitivity": ("experiments/sensitivity.json", "loralab sweep --config experiments/best_config.yaml"),
    "tuning": ("experiments/metrics_comparison.json", "loralab tune"),
    "methods": ("experiments/method_comparison.json", "loralab compare"),
    "domains": ("experiments/domain_transfer.json", "loralab domains"),
    "pruning": ("experiments/pruning_study.json", "loralab prune --study"),
}

# Two-sided 95 % critical values of Student's t by degrees of freedom (2 x seeds - 2 for two methods).
T_CRITICAL = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 8: 2.306, 10: 2.228}


def _load(root: Path, name: str) -> dict | None:
    path = root / SOURCES[name][0]
    return json.loads(path.read_text()) if path.is_file() else None


def _missing(name: str) -> list[str]:
    path, command = SOURCES[name]
    return [f"_Not measured yet: `{command}` writes `{path}`._", ""]


def _throughput(root: Path) -> list[str]:
    """One table per CPU class measured: the benchmark writes one result file per class."""
    lines = ["## Training throughput: loralab against the strongest baseline, per CPU class", ""]
    files = sorted((root / "benchmarks/results").glob("train_throughput_*.json"))
    if not files:
        return lines + _missing("throughput")
    classes = []
    for path in files:
        data = json.loads(path.read_text())
        cpu, peak = data["cpu"], data["matmul_peak_gflops"]
        classes.append(cpu["class"])
        kind = " (ablation)" if path.stem.endswith("_ablation") else ""
        stale = [f"**Stale**: {data['stale']}.", ""] if data.get("stale") else []
        lines += [
            f"### CPU class {cpu['class']}{kind}: {cpu['cpu']}, {cpu['cores']} cores", "", *stale,
            f"Command: `{data['command']}`; raw results: `{path.relative_to(root)}`. Matmul peak measured in the same "
            f"run: {peak['float32']:.0f} GFLOP/s fp32, {peak['bfloat16']:.0f} bf16; MFU is over the peak of the dtype "
            "each path computes in. Ratios are to the best baseline.", "",
            data["header"], "", *data["table"], "", data["targets"], "",
        ]
    others = [name for name in CPU_CLASSES if name != "baseline" and name not in classes]
    return lines + ([f"Not measured with this benchmark: CPU class {', '.join(others)}.", ""] if others else [])


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
              f"{data['trial_examples']} training examples per point. Best and worst point of each factor by eval "
              "perplexity:", "",
              "| factor | best value | eval ppl | domain acc. % | worst value | eval ppl | domain acc. % |",
              "|---|---|---:|---:|---|---:|---:|"]
    for factor in dict.fromkeys(p["factor"] for p in data["points"]):
        points = sorted((p for p in data["points"] if p["factor"] == factor), key=lambda p: p["eval_perplexity"])
        best, worst = points[0], points[-1]
        lines.append(f"| `{factor}` | {_value(best['resolved'])} | {best['eval_perplexity']:.2f} | "
                     f"{best['domain_accuracy']:.1f} ± "
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


def separated(a: dict, b: dict, key: str, seeds: int) -> bool:
    """Whether two methods' means of `key` differ beyond seed noise: |difference| above the 95 % t critical
    value times the standard error of the difference (each mean over `seeds` runs)."""
    se = math.sqrt((a[key + "_sd"] ** 2 + b[key + "_sd"] ** 2) / seeds)
    return abs(a[key] - b[key]) > T_CRITICAL.get(2 * seeds - 2, 2.0) * se


@dataclass
class _Ranking:
    """The comparison ranked by mean eval-split loss over the reported seeds (the choice is made on the eval
    split; the test split only reports it), and the group of methods tied with the best."""

    methods: dict
    seeds: int
    missing: list[str]  # planned entries not measured yet
    ranked: list[str]
    tied: list[str]  # not separable from the best at 95 %

    @classmethod
    def of(cls, data: dict) -> _Ranking:
        methods, seeds = data["methods"], len(data["seeds"])
        ranked = sorted(methods, key=lambda m: methods[m]["eval_loss"])
        tied = [m for m in ranked[1:] if not separated(methods[ranked[0]], methods[m], "eval_loss", seeds)]
        return cls(methods, seeds, [m for m in data.get("methods_planned", []) if m not in methods], ranked, tied)

    @property
    def best(self) -> str:
        return self.ranked[0]

    @property
    def group(self) -> list[str]:
        return [self.best, *self.tied]

    def fmt(self, m: str) -> str:
        m_ = self.methods[m]
        return (f"{m} (eval loss {m_['eval_loss']:.3f} ± {m_['eval_loss_sd']:.3f}; test perplexity "
                f"{m_['test_perplexity']:.2f} ± {m_['test_perplexity_sd']:.2f})")


def method_findings(data: dict, sensitivity: dict | None = None) -> list[str]:
    """Recommendations computed from the comparison: which method wins on what, and what is noise."""
    if not data["methods"]:
        return []
    r = _Ranking.of(data)
    return [*_partial(data, r), *_quality(r), *_accuracy(r), *_best_group_costs(r), *_best_adapter(r),
            *_cheapest_outside_the_group(r), *_quantized_bases(r), *_full_against_best(r), *_edge_caveat(r),
            *_rank_advice(sensitivity)]


def _partial(data: dict, r: _Ranking) -> list[str]:
    if not r.missing:
        return []
    return [f"- **Partial comparison:** {len(r.methods)} of {len(data['methods_planned'])} planned entries are measured; "
            f"not yet: {', '.join(r.missing)} (`loralab compare` continues from the committed run records)."]


def _quality(r: _Ranking) -> list[str]:
    out = [f"- **Quality, chosen on the eval split** (mean eval-split answer loss over the seeds; the test perplexity "
           f"only reports the choice): best is {r.fmt(r.best)}"
           + (" among those measured" if r.missing else "") + ". "
           + (f"Not separable from it at 95 % over {r.seeds} seeds: {', '.join(r.fmt(m) for m in r.tied)}." if r.tied
              else f"Every other method is worse beyond seed noise (95 %, {r.seeds} seeds).")]
    worse = [m for m in r.ranked if m not in r.group]
    if worse:
        out.append(f"- Worse than the best beyond seed noise: {', '.join(r.fmt(m) for m in worse)}.")
    return out


def _accuracy(r: _Ranking) -> list[str]:
    methods = r.methods
    acc = sorted(methods, key=lambda m: -methods[m]["domain_accuracy"])
    acc_tied = [m for m in acc[1:] if not separated(methods[acc[0]], methods[m], "domain_accuracy", r.seeds)]
    return [f"- **Domain score:** highest is {acc[0]} ({methods[acc[0]]['domain_accuracy']:.1f} ± "
            f"{methods[acc[0]]['domain_accuracy_sd']:.1f} points); {len(acc_tied)} of the other {len(acc) - 1} are "
            "within seed noise of it, so the domain score on this many test questions does not rank the methods."]


def _best_group_costs(r: _Ranking) -> list[str]:
    if not r.tied:  # choosing inside a group of one says nothing
        return []
    methods = r.methods
    cheapest = min(r.group, key=lambda m: methods[m]["trainable_parameters"])
    lightest = min(r.group, key=lambda m: methods[m]["peak_rss_mb"])
    fastest = min(r.group, key=lambda m: methods[m]["wall_seconds"])
    return [f"- **Among the best-quality group**, fewest trainable parameters: {cheapest} "
            f"({methods[cheapest]['trainable_parameters']:,}, {methods[cheapest]['adapter_mb']:.2f} MB on disk); lowest peak "
            f"memory: {lightest} ({methods[lightest]['peak_rss_mb']:.0f} MB); shortest training: {fastest} "
            f"({methods[fastest]['wall_seconds']:.0f} s)."]


def _trains_whole_model(entry: str) -> bool:
    """A compare entry ("full", "lora@nf4", ...) whose method trains every weight rather than an adapter."""
    return get_method(entry.partition("@")[0]).whole_model


def _best_adapter(r: _Ranking) -> list[str]:
    """When full fine-tuning wins, the question users ask: what does an adapter cost?"""
    adapters = [m for m in r.ranked if not _trains_whole_model(m)]
    if not _trains_whole_model(r.best) or not adapters:
        return []
    a, f = r.methods[adapters[0]], r.methods[r.best]
    adapter_tied = [m for m in adapters[1:] if not separated(a, r.methods[m], "eval_loss", r.seeds)]
    return [f"- **Best adapter:** {r.fmt(adapters[0])}, {_ratio(a, f, 'test_perplexity')} full fine-tuning's perplexity "
            f"with {f['trainable_parameters'] / a['trainable_parameters']:.0f}x fewer trainable parameters, "
            f"{a['adapter_mb']:.1f} MB against {f['adapter_mb']:.0f} MB on disk, {_ratio(a, f, 'peak_rss_mb')} the peak "
            f"memory and {_ratio(a, f, 'wall_seconds')} the training time. "
            + (f"Not separable from it: {', '.join(r.fmt(m) for m in adapter_tied)}. " if adapter_tied
               else "Every other adapter is worse beyond seed noise. ")
            + "Full fine-tuning is worth it when one model serves one domain and memory allows; an adapter when "
            "several domains share a base or memory is tight."]


def _cheapest_outside_the_group(r: _Ranking) -> list[str]:
    methods, best, out = r.methods, r.methods[r.best], []
    overall_light = min(methods, key=lambda m: methods[m]["peak_rss_mb"])
    if overall_light not in r.group:
        out.append(f"- **Lowest memory overall:** {overall_light} ({methods[overall_light]['peak_rss_mb']:.0f} MB, "
                   f"{_ratio(methods[overall_light], best, 'test_perplexity')} the best perplexity).")
    smallest = min(methods, key=lambda m: methods[m]["adapter_mb"])
    if smallest not in r.group:  # the choice when many adapters are stored or served side by side
        out.append(f"- **Smallest adapter:** {smallest} ({methods[smallest]['trainable_parameters']:,} parameters, "
                   f"{methods[smallest]['adapter_mb']:.2f} MB on disk, "
                   f"{_ratio(methods[smallest], best, 'test_perplexity')} the best perplexity).")
    return out


def _quantized_bases(r: _Ranking) -> list[str]:
    out = []
    for entry, m in r.methods.items():
        plain = entry.partition("@")[0]
        if "@" in entry and plain in r.methods:
            p = r.methods[plain]
            noise = "within seed noise" if not separated(m, p, "eval_loss", r.seeds) else "beyond seed noise"
            out.append(f"- **{entry} against {plain}:** peak memory {m['peak_rss_mb']:.0f} vs {p['peak_rss_mb']:.0f} MB "
                       f"({m['peak_rss_mb'] / p['peak_rss_mb']:.2f}x), "
                       f"training time {m['wall_seconds'] / p['wall_seconds']:.2f}x, "
                       f"eval loss {m['eval_loss']:.3f} vs {p['eval_loss']:.3f} ({noise}; test perplexity "
                       f"{m['test_perplexity']:.2f} vs {p['test_perplexity']:.2f}).")
    return out


def _full_against_best(r: _Ranking) -> list[str]:
    whole = [m for m in r.ranked if _trains_whole_model(m)]
    if not whole or _trains_whole_model(r.best):
        return []
    f, b = r.methods[whole[0]], r.methods[r.best]
    return [f"- **Full fine-tuning** ({f['trainable_parameters']:,} parameters, {f['adapter_mb']:.0f} MB saved) against "
            f"{r.best}: perplexity {f['test_perplexity']:.2f} vs {b['test_perplexity']:.2f}, peak memory "
            f"{f['peak_rss_mb'] / b['peak_rss_mb']:.2f}x, training time {f['wall_seconds'] / b['wall_seconds']:.2f}x."]


def _edge_caveat(r: _Ranking) -> list[str]:
    edge = [e for e, m in r.methods.items() if m["learning_rate"] in (min(s["learning_rate"] for s in m["lr_search"]),
                                                                      max(s["learning_rate"] for s in m["lr_search"]))]
    if not edge:
        return []
    return [f"- Caveat: the chosen learning rate is still at the edge of the searched range for {', '.join(edge)} "
            "(after the automatic extensions), so those methods may be slightly under-tuned."]


def _rank_advice(sensitivity: dict | None) -> list[str]:
    ranks = sorted((p for p in (sensitivity or {}).get("points", []) if p["factor"] == "lora.r"), key=lambda p: p["resolved"])
    if not ranks:
        return []
    top = min(p["eval_perplexity"] for p in ranks)
    enough = next(p for p in ranks if p["eval_perplexity"] <= 1.02 * top)
    return [f"- **Rank** (`loralab sweep`): the smallest rank within 2 % of the best eval perplexity is "
            f"{enough['resolved']} (perplexity {enough['eval_perplexity']:.2f} vs best {top:.2f} over ranks "
            f"{', '.join(str(p['resolved']) for p in ranks)}); a larger rank buys adapter size, not quality, at this data size."]


def _ratio(a: dict, b: dict, key: str) -> str:
    return f"{a[key] / b[key]:.2f}x"


def method_table(data: dict) -> list[str]:
    lines = ["| method | lr | test ppl | domain acc. % | trainable params | adapter MB | peak RSS MB | tokens/s | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in sorted(data["methods"].items(), key=lambda kv: kv[1]["eval_loss"]):
        lines.append(f"| {name} | {m['learning_rate']:g} | {m['test_perplexity']:.2f} ± {m['test_perplexity_sd']:.2f} | "
                     f"{m['domain_accuracy']:.1f} ± {m['domain_accuracy_sd']:.1f} | {m['trainable_parameters']:,} | "
                     f"{m['adapter_mb']:.2f} | {m['peak_rss_mb']:.0f} | {m['tokens_per_s']:.0f} | {m['wall_seconds']:.0f} |")
    return lines


def _methods(data: dict | None, sensitivity: dict | None, md_dir: Path, root: Path) -> list[str]:
    lines = ["## Methods: LoRA variants, quantized bases and full fine-tuning", ""]
    if data is None:
        return lines + _missing("methods")
    plot = os.path.relpath(root / "experiments/plots/compare/quality_tradeoffs.png", md_dir)
    lines += [f"Command: `{SOURCES['methods'][1]}` ({data['train_examples']} training examples per run, each method at its own "
              f"learning rate chosen on the eval split, then seeds {', '.join(map(str, data['seeds']))}; test split). "
              "Every row and the learning-rate search are in `experiments/method_comparison.md`."
              + (f" Measured on {' and '.join(data['machines'])}." if data.get("machines") else ""), "",
              *method_table(data)]
    lines += ["", "Findings and recommendations (computed from the table by `loralab analysis`):", ""]
    return lines + method_findings(data, sensitivity) + ["", f"![methods]({plot})", ""]


def domain_findings(data: dict) -> list[str]:
    matrix, domains = data["matrix"], list(data["domains"])
    out = []
    for d in domains:
        home = matrix[d][d]["perplexity"] / matrix["base"][d]["perplexity"]
        others = {o: matrix[d][o]["perplexity"] / matrix["base"][o]["perplexity"] for o in domains if o != d}
        out.append(f"- **{d} adapter:** its own test perplexity is {home:.2f}x the base's; on the other domains "
                   + ", ".join(f"{o} {r:.2f}x" for o, r in others.items()) + ".")
    mix = {d: matrix["mixture"][d]["perplexity"] / matrix[d][d]["perplexity"] for d in domains}
    steps = data.get("training", {})
    more = (f"; it takes {steps['mixture']['steps'] / steps[domains[0]]['steps']:.0f}x a specialist's optimizer steps over the "
            "same examples" if "mixture" in steps and domains[0] in steps else "")
    out.append("- **Mixture against specialists** (mixture perplexity / specialist's, on the specialist's domain): "
               + ", ".join(f"{d} {r:.2f}x" for d, r in mix.items()) + more + ".")
    base_g = matrix["base"]["general"]
    out.append("- **Forgetting** (general-knowledge text perplexity against the base's "
               f"{base_g['text_perplexity']:.2f}): " + ", ".join(
                   f"{m} {100 * (matrix[m]['general']['text_perplexity'] / base_g['text_perplexity'] - 1):+.1f} %"
                   for m in matrix if m != "base") + "; multiple-choice accuracy " + ", ".join(
                   f"{m} {matrix[m]['general']['mc_accuracy']:.1f}" for m in matrix)
               + f" % (± about {base_g['mc_accuracy_se']:.0f}).")
    return out


def _domains(data: dict | None, md_dir: Path, root: Path) -> list[str]:
    lines = ["## Multi-domain adaptation: specialists, a mixture, forgetting", ""]
    if data is None:
        return lines + _missing("domains")
    plot = os.path.relpath(root / "experiments/plots/domains/cross_evaluation.png", md_dir)
    domains = list(data["domains"])
    lines += [f"Command: `{SOURCES['domains'][1]}`; full tables in `experiments/domain_transfer.md`. "
              f"{data['train_examples_per_domain']} examples per specialist, the mixture on their union"
              + (f", on {machine_summary(data['machine'])}" if "machine" in data else "") + ". Test answer perplexity:", "",
              "| model | " + " | ".join(domains) + " | general text |", "|---|" + "---:|" * (len(domains) + 1)]
    for m, row in data["matrix"].items():
        lines.append(f"| {m} | " + " | ".join(f"{row[d]['perplexity']:.2f}" for d in domains)
                     + f" | {row['general']['text_perplexity']:.2f} |")
    return lines + ["", *domain_findings(data), "", f"![domains]({plot})", ""]


def _pruning(data: dict | None, md_dir: Path, root: Path) -> list[str]:
    """The study writes its own findings (src/prune/study.py); quoted here beside the other trade-offs."""
    lines = ["## Pruning: quality against size and speed", ""]
    if data is None:
        return lines + _missing("pruning")
    plot = os.path.relpath(root / "experiments/plots/pruning/quality_vs_cost.png", md_dir)
    return lines + [f"Command: `{SOURCES['pruning'][1]}` on {machine_summary(data['machine'])}; every table in "
                    "`experiments/pruning_study.md`. Source: " + data["source"] + ".", "",
                    *data["findings"], "", f"![pruning]({plot})", ""]


def _findings_documents(methods: dict | None, sensitivity: dict | None, domains: dict | None) -> dict[str, list[str]]:
    """The findings as documents of their own under experiments/, for the hand-written docs to link to
    (library code never edits README.md or submission.md)."""
    documents = {}
    if methods is not None:
        documents["method_findings.md"] = [
            "# Methods: table and findings", "",
            f"Generated by `loralab analysis` from `{SOURCES['methods'][0]}` (written by `{SOURCES['methods'][1]}`).", "",
            *method_table(methods), "", *method_findings(methods, sensitivity), ""]
    if domains is not None:
        documents["domain_findings.md"] = [
            "# Domains: findings", "",
            f"Generated by `loralab analysis` from `{SOURCES['domains'][0]}` (written by `{SOURCES['domains'][1]}`).", "",
            *domain_findings(domains), ""]
    return documents


def write_analysis(root: str | Path = ".", out: str | Path = "experiments/optimization_analysis.md") -> Path:
    root, out = Path(root), Path(root) / out
    md_dir = out.parent
    lines = [
        "# Optimization analysis",
        "",
        "Generated by `loralab analysis` from the committed results; each section names the command that measured it. "
        "All timings are from 2-core CPUs (the throughput section names its CPU class; the others ran on the earlier "
        "avx512-bf16 machine unless they say otherwise); compare ratios within one run.",
        "",
    ]
    lines += _throughput(root)
    lines += _memory(_load(root, "memory"), md_dir, root)
    lines += _tuning(_load(root, "tuning"))
    sensitivity, methods, domains = (_load(root, name) for name in ("sensitivity", "methods", "domains"))
    lines += _sensitivity(sensitivity, md_dir, root)
    lines += _methods(methods, sensitivity, md_dir, root)
    lines += _domains(domains, md_dir, root)
    lines += _pruning(_load(root, "pruning"), md_dir, root)
    atomic_io.write_text(out, "\n".join(lines))
    for name, document in _findings_documents(methods, sensitivity, domains).items():
        atomic_io.write_text(md_dir / name, "\n".join(document))
    return out
