"""`loralab prune --study`: every `prune.study_points` point (method@sparsity) of the fine-tuned model,
measured on the test split beside the unpruned model; LoRA recovery for `prune.recovery_points`,
Q8_0 and Q4_1 GGUF for `prune.gguf_points`.

Resumable at every stage: each point keeps one record in `prune.records_dir` (committed), updated
after each stage (pruned, recovered, gguf), so a killed study loses at most the stage it was in and a
fresh clone regenerates the tables and plots without re-measuring. Pruned models live under
`prune.runs_dir` (rebuilt, deterministically, when a later stage needs one that is gone).
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import torch

from loralab.config import Config, parse_prune_point
from loralab.prune.measure import SPEED_REPEATS, measure_directory, measure_gguf, measure_speeds, recover
from loralab.prune.prune import check_adapter, load_source, prune_to_directory, save_pruned
from loralab.studies.runner import in_fresh_process
from loralab.studies.writer import write_results
from loralab.util import atomic_io, provenance
from loralab.util.errors import LoralabError
from loralab.util.resources import machine_description, machine_summary

REFERENCE = "none"  # the unpruned model
GGUF_TYPES = ("q8_0", "q4_1")  # loralab export's 8-bit and 4-bit defaults
PLOT = "quality_vs_cost.png"


def slug(point: str) -> str:
    return point.replace("@", "-").replace(":", "")


def _prune_to(cfg: Config, adapter_dir: str, point: str, out: Path) -> dict:
    """In its own process: load the source, prune it to `point`, write the directory."""
    if point != REFERENCE:
        return prune_to_directory(cfg, adapter_dir, *parse_prune_point(point), out, {})
    model, tokenizer, source = load_source(cfg, adapter_dir)  # saved like the others: size and load measured alike
    report = {"source": source, "method": REFERENCE, "parameters_after": sum(p.numel() for p in model.parameters())}
    save_pruned(model, tokenizer, out, report)
    return report


def _gguf_path(model_dir: Path, qtype: str) -> Path:
    return model_dir.parent / f"model.{qtype.upper()}.gguf"


def _adapted_modules(cfg: Config, adapter_dir: str) -> set[str]:
    """The module names the adapter changed: 4-bit files keep them at Q8_0, as `loralab export` does."""
    if cfg.prune.source == "base":
        return set()
    targets = json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("target_modules") or []
    return {t.rsplit(".", 1)[-1] for t in ([targets] if isinstance(targets, str) else targets)}


def _write_gguf(model_dir: Path, qtype: str, adapted: set[str]) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loralab.deploy.gguf import write_gguf

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return write_gguf(model, AutoTokenizer.from_pretrained(model_dir), _gguf_path(model_dir, qtype), qtype,
                      model_dir.parent.name, adapted=adapted)


def _run_point(cfg: Config, adapter_dir: str, point: str, record: dict, save) -> dict:
    """The stages still missing from `record`, each saved as soon as it is measured."""
    p = cfg.prune
    model_dir = Path(p.runs_dir) / slug(point) / "model"

    def ensure_model() -> None:
        if not (model_dir / "config.json").is_file():
            record["prune"] = in_fresh_process(_prune_to, cfg, adapter_dir, point, model_dir)

    if "quality" not in record:
        ensure_model()
        record["quality"] = measure_directory(cfg, model_dir)
        save(record)
    if point in p.recovery_points and "recovered" not in record:
        ensure_model()
        run = recover(cfg, model_dir, model_dir.parent / "recovery")
        record["recovered"] = {**measure_directory(cfg, model_dir, model_dir.parent / "recovery" / "adapter"),
                               "train_examples": run.trial_examples, "train_seconds": run.wall_seconds}
        save(record)
    for qtype in GGUF_TYPES if point in p.gguf_points else ():
        if f"gguf_{qtype}" not in record:
            ensure_model()
            gguf_path = in_fresh_process(_write_gguf, model_dir, qtype, _adapted_modules(cfg, adapter_dir))
            record[f"gguf_{qtype}"] = measure_gguf(cfg, gguf_path)
            save(record)
    return record


def _measure_speeds(cfg: Config, records: dict[str, dict], savers: dict) -> None:
    """The speed of every variant that has none yet, in one interleaved measurement (measure.measure_speeds).
    Recorded speeds are kept, so a fresh clone needs no models; a point added later is measured in rounds of
    its own (delete the records' "speed" keys to measure them all together again)."""
    variants = {}
    for point, record in records.items():
        model_dir = Path(cfg.prune.runs_dir) / slug(point) / "model"
        wanted = {"quality": {"model_dir": model_dir},
                  "recovered": {"model_dir": model_dir, "adapter_dir": model_dir.parent / "recovery" / "adapter"},
                  **{f"gguf_{q}": {"gguf": _gguf_path(model_dir, q)} for q in GGUF_TYPES}}
        for key, where in wanted.items():
            if key in record and key not in record.get("speed", {}):
                if not all(Path(v).exists() for v in where.values()):
                    raise LoralabError(f"prune study: {point} needs {[str(v) for v in where.values()]} to measure its "
                                       f"speed; delete {cfg.prune.records_dir}/{slug(point)}.json to run that point again")
                variants[f"{point}|{key}"] = {k: str(v) for k, v in where.items()}
    if not variants:
        return
    print(f"prune study: speed of {len(variants)} models, {SPEED_REPEATS} interleaved rounds", flush=True)
    for name, speed in measure_speeds(cfg, variants).items():
        point, key = name.split("|")
        records[point]["speed"] = {**records[point].get("speed", {}), key: speed}
    for point, record in records.items():
        savers[point](record)


def _save(record: dict, path: Path, cfg: Config) -> None:
    """A point's record, saying which code measured it (the points of one study may come from several
    sessions); in place, so the summary holds what the file holds."""
    record["provenance"] = provenance.record(cfg.to_dict())
    atomic_io.write_json(path, record)


def prune_study(cfg: Config, adapter_dir: str | Path | None = None) -> dict:
    p = cfg.prune
    adapter_dir = str(adapter_dir or cfg.train.output_dir)
    check_adapter(cfg, adapter_dir)
    points = [REFERENCE, *p.study_points]
    records, savers = {}, {}
    for number, point in enumerate(points, 1):
        path = Path(p.records_dir) / f"{slug(point)}.json"
        record = json.loads(path.read_text()) if path.is_file() else {"point": point, "machine": machine_description()}
        savers[point] = lambda r, path=path: _save(r, path, cfg)
        print(f"prune study: point {number}/{len(points)}: {point}", flush=True)
        records[point] = _run_point(cfg, adapter_dir, point, record, savers[point])
    # Speeds last, all models in interleaved rounds: only ratios measured together compare on a shared machine.
    _measure_speeds(cfg, records, savers)
    summary = summarize(cfg, records, adapter_dir)
    write_results(p.results_json, summary, p.summary_md, markdown, lambda s: plot(s, p.plots_dir), config=cfg.to_dict())
    return summary


def summarize(cfg: Config, records: dict[str, dict], adapter_dir: str) -> dict:
    return {
        "source": f"{cfg.model.name_or_path} + {adapter_dir}" if cfg.prune.source == "merged" else cfg.model.name_or_path,
        "command": "loralab prune --study",
        "calibration_examples": cfg.prune.calibration_examples,
        "recovery_examples": cfg.prune.recovery_examples,
        "generation_per_task": cfg.prune.generation_per_task,
        "machine": records[REFERENCE]["machine"],
        "points": records,
        "findings": findings(records),
        "plot": os.path.relpath(Path(cfg.prune.plots_dir) / PLOT, Path(cfg.prune.summary_md).parent),
    }


# --- findings, table and plot: generated from the records, never written by hand ----------------------

VARIANTS = (("quality", "pruned"), ("recovered", "pruned + LoRA recovery"),
            *((f"gguf_{q}", f"pruned, {q.upper()} GGUF") for q in GGUF_TYPES))


def _measured(record: dict, key: str) -> dict:
    """A variant's measurements, with tokens/s from the speed stage (a median) where it has run."""
    return {**record[key], **record.get("speed", {}).get(key, {})}


def _rows(records: dict[str, dict]) -> list[tuple[str, str, dict]]:
    return [(point, label, _measured(record, key)) for point, record in records.items()
            for key, label in VARIANTS if key in record]


def speed_ratio(q: dict, ref: dict) -> float:
    """Tokens/s against the unpruned model: the median over rounds of the ratio within each round (the rounds
    interleave every model, so a slow minute of the machine slows both sides of a ratio), where both have runs."""
    if len(q.get("runs", [])) == len(ref.get("runs", [])) > 0:
        return statistics.median(a / b for a, b in zip(q["runs"], ref["runs"]))
    return q["tokens_per_s_batch1"] / ref["tokens_per_s_batch1"]


def _vs(q: dict, ref: dict) -> str:
    return (f"perplexity {q['test_perplexity']:.2f} ({q['test_perplexity'] / ref['test_perplexity']:.2f}x), "
            f"accuracy {q['domain_accuracy']:.1f} ± {q['domain_accuracy_se']:.1f} %, {q['size_mb']:.0f} MB "
            f"({q['size_mb'] / ref['size_mb']:.2f}x), {q['tokens_per_s_batch1']:.1f} tokens/s "
            f"({speed_ratio(q, ref):.2f}x)")


def findings(records: dict[str, dict]) -> list[str]:
    ref = _measured(records[REFERENCE], "quality")
    pruned = {p: r for p, r in records.items() if p != REFERENCE}
    out = [f"- Unpruned (fine-tuned, merged, fp32): {_vs(ref, ref)}."]
    unstructured = [p for p in pruned if parse_prune_point(p)[0] in ("magnitude", "wanda", "wanda-2:4")]
    if unstructured:
        worst = max(speed_ratio(_measured(pruned[p], "quality"), ref) for p in unstructured)
        out.append(f"- Zeroed weights do not pay on this CPU by themselves: the {len(unstructured)} unstructured and 2:4 "
                   f"points keep the same file size (a dense safetensors file stores the zeros) and run at most "
                   f"{worst:.2f}x the unpruned speed (dense matmul kernels do the same work).")
    for method in ("magnitude", "wanda"):
        for point in [p for p in unstructured if parse_prune_point(p)[0] == method]:
            out.append(f"- {point}: {_vs(_measured(pruned[point], 'quality'), ref)}.")
    for point in [p for p in pruned if p not in unstructured]:
        out.append(f"- {point} (structured): {_vs(_measured(pruned[point], 'quality'), ref)}.")
    for point, record in pruned.items():
        if "recovered" in record:
            before, after = record["quality"], record["recovered"]  # quality only: speeds are below
            out.append(f"- LoRA recovery of {point} ({after['train_examples']} examples, {after['train_seconds']:.0f} s): "
                       f"perplexity {before['test_perplexity']:.2f} -> {after['test_perplexity']:.2f}, accuracy "
                       f"{before['domain_accuracy']:.1f} -> {after['domain_accuracy']:.1f} % "
                       f"(unpruned {ref['test_perplexity']:.2f}, {ref['domain_accuracy']:.1f} %).")
        for qtype in GGUF_TYPES:
            if f"gguf_{qtype}" in record:
                out.append(f"- {point} then {qtype.upper()} GGUF: {_vs(_measured(record, f'gguf_{qtype}'), ref)}.")
    out.append(_best_small(records, ref))
    return out


def _best_small(records: dict[str, dict], ref: dict) -> str:
    """The smallest or fastest variant that keeps perplexity within 10 % of the unpruned model."""
    close = [(p, label, q) for p, label, q in _rows(records)
             if p != REFERENCE and q["test_perplexity"] <= 1.1 * ref["test_perplexity"]]
    faster = [(p, label, q) for p, label, q in close if speed_ratio(q, ref) >= 1.05]
    smaller = [(p, label, q) for p, label, q in close if q["size_mb"] <= 0.95 * ref["size_mb"]]
    if not close:
        return "- No pruned variant kept test perplexity within 10 % of the unpruned model."
    parts = []
    if smaller:
        p, label, q = min(smaller, key=lambda row: row[2]["size_mb"])
        parts.append(f"smallest: {p} ({label}), {q['size_mb']:.0f} MB")
    if faster:
        p, label, q = max(faster, key=lambda row: speed_ratio(row[2], ref))
        parts.append(f"fastest: {p} ({label}), {speed_ratio(q, ref):.2f}x the unpruned tokens/s")
    return ("- Within 10 % of the unpruned perplexity: " + ("; ".join(parts) if parts else
            "no variant is smaller or faster than the unpruned model") + ".")


def markdown(summary: dict) -> str:
    ref = _measured(summary["points"][REFERENCE], "quality")
    lines = ["# Pruning study", "",
             f"Generated by `{summary['command']}` on {machine_summary(summary['machine'])}; source: {summary['source']}. "
             f"Test split: answer perplexity over every question, domain score over {summary['generation_per_task']} "
             f"questions per task (± one standard error); tokens/s: greedy, batch 1, fp32, the median of {SPEED_REPEATS} "
             "runs of 64 tokens, every model loaded in one process and measured in interleaved rounds (adapters "
             "merged); peak RSS: the "
             f"process that measured quality. Calibration: the first {summary['calibration_examples']} training examples; "
             "recovery: a LoRA "
             f"adapter trained on the pruned model with {summary['recovery_examples']} examples.", "",
             "| point | variant | parameters (M) | file MB | test ppl | domain acc % | tokens/s | vs unpruned | peak RSS MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for point, label, q in _rows(summary["points"]):
        lines.append(f"| {point} | {'unpruned' if point == REFERENCE else label} | {q['parameters'] / 1e6:.1f} | "
                     f"{q['size_mb']:.0f} | {q['test_perplexity']:.2f} | {q['domain_accuracy']:.1f} ± "
                     f"{q['domain_accuracy_se']:.1f} | {q['tokens_per_s_batch1']:.1f} | {speed_ratio(q, ref):.2f}x | "
                     f"{q['peak_rss_mb']:.0f} |")
    lines += ["", f"Unpruned reference: perplexity {ref['test_perplexity']:.2f}.", "", "## Findings", "",
              *summary["findings"], "", f"![quality against size and speed]({summary['plot']})", ""]
    return "\n".join(lines)


def plot(summary: dict, plots_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    markers = dict(zip((label for _, label in VARIANTS), "o^sD"))
    for ax, key, xlabel in ((axes[0], "size_mb", "file size (MB)"), (axes[1], "tokens_per_s_batch1", "greedy tokens/s, batch 1")):
        for label, marker in markers.items():
            rows = [(p, q) for p, lab, q in _rows(summary["points"]) if lab == label and p != REFERENCE]
            ax.scatter([q[key] for _, q in rows], [q["test_perplexity"] for _, q in rows], marker=marker, label=label)
            for p, q in rows:
                ax.annotate(p, (q[key], q["test_perplexity"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ref = _measured(summary["points"][REFERENCE], "quality")
        ax.scatter([ref[key]], [ref["test_perplexity"]], marker="*", s=160, color="black", label="unpruned")
        ax.set_xlabel(xlabel)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test answer perplexity (log)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Pruning: quality against size and speed (lower-left / lower-right is better)")
    fig.tight_layout()
    atomic_io.save_figure(fig, os.path.join(plots_dir, PLOT))
    plt.close(fig)
