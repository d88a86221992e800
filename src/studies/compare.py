"""`loralab compare`: every fine-tuning method on the same data and example budget, each with its own
learning rate, several seeds, measured once on the test split.

1. Learning rate, per method: one run per candidate in `compare.learning_rates` (seed `lr_seed(cfg)`,
   one below the smallest reported seed, so never a reported one), scored by eval-split loss. When the best
   candidate is the grid's largest or smallest, the grid is extended past it by the grid's own ratio
   (up to `compare.lr_extensions` times), so that no method is judged at a learning rate that was
   simply too timid. The test split plays no part in this choice.
2. Seeds: the chosen learning rate with every seed in `compare.seeds`; each adapter is measured on
   the test split (answer perplexity, domain score per task), with its trainable parameters, size
   on disk, training tokens/s, peak RSS and wall time. Its eval-split loss is kept too: the findings
   (studies/analysis.py) choose the best method by it, and the test split only reports the choice.
Every run goes through the study runner (studies/runner.py): in a fresh process (its peak memory is its
own), recorded as soon as it ends, in a directory named by its run identity. A killed compare skips
finished runs when started again, also from a fresh clone: each run's record is also kept in
`compare.records_dir`, which is committed with the results. Results: `compare.results_json`, a
Markdown table and plots of quality against trainable parameters, memory and time.
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

from loralab.adapters.methods import METHODS, get_method, run_overrides, validate
from loralab.config import Config
from loralab.data.prepare import prepare_dataset
from loralab.model_utils import quantization_config
from loralab.studies.records import RecordStore, RunRecord
from loralab.studies.runner import recorded_run, run_root
from loralab.studies.space import Budget, trial_config
from loralab.studies.writer import write_results
from loralab.training.tracking import StudyRun, study_run
from loralab.util import atomic_io
from loralab.util.errors import LoralabError
from loralab.util.resources import machine_summary


def lr_seed(cfg: Config) -> int:
    """The seed of the learning-rate search: one below the smallest reported seed (41 for 42, 43, 44), so that no
    reported run is the run that chose its learning rate (a seed that happened to suit one rate would flatter it)."""
    return min(cfg.compare.seeds) - 1


def budget(cfg: Config) -> Budget:
    return Budget(cfg.compare.train_examples, cfg.compare.eval_examples)


def check(cfg: Config) -> None:
    """Every bad method name or option fails here, before any training."""
    cfg.validate()
    cc = cfg.compare
    for entry in cc.methods:
        method, quantized = split_entry(entry)
        trial = trial_config(cfg, _params(cfg, entry, 1e-3, lr_seed(cfg)), Path("."), 1, budget(cfg))  # what will run
        try:
            validate(trial.lora, quantized)
            quantization_config(quantized)  # an unknown kind, or bitsandbytes missing: before any training
        except LoralabError as exc:
            raise LoralabError(f"compare.methods: {entry}: {exc}") from None
        min_steps = get_method(method).min_steps  # a known method: validate passed
        if trial.train.max_steps < min_steps:
            raise LoralabError(f"compare.methods: {method} needs at least {min_steps} steps; compare.train_examples="
                               f"{cc.train_examples} at batch {trial.train.batch_size} gives {trial.train.max_steps}")
        rates = cc.learning_rates.get(entry, cc.learning_rates.get(method))
        if not rates or not all(isinstance(r, (int, float)) and r > 0 for r in rates):
            raise LoralabError(f"compare.learning_rates.{method}: give a non-empty list of positive learning rates")


def split_entry(entry: str) -> tuple[str, str]:
    """A compare entry is a method, optionally on a quantized base: "lora", "lora@nf4", "dora@int8"."""
    method, _, quantized = entry.partition("@")
    return method, quantized or "none"


def _params(cfg: Config, entry: str, lr: float, seed: int) -> dict:
    method, quantized = split_entry(entry)
    params = {"lora.method": method, "train.learning_rate": lr, "train.seed": seed}
    # Options of one method stay with it: a config's loraplus_lr_ratio must not reach the other methods.
    cleared, fixed = run_overrides(method, cfg.lora)  # fixed: e.g. ia3 takes only target_modules=auto
    params.update(cleared)
    if quantized != "none":
        params["model.quantize_base"] = quantized
    params.update(fixed)
    return params


class _Progress:
    """The `[done/total]` counter of the printed progress; the total grows when a grid is extended."""

    def __init__(self, total: int):
        self.done, self.total = 0, total

    def say(self, text: str, count: bool = True) -> None:
        self.done += count
        print(f"[{self.done}/{self.total}] {text}", flush=True)


def compare(cfg: Config) -> dict:
    check(cfg)  # before the tracked parent run opens: a bad config leaves no failed run behind
    cc = cfg.compare
    with study_run(cfg, "compare", Path(cc.runs_dir).name) as tracked:  # each run a nested run of this one
        summary = _compare(cfg, tracked)
        tracked.log_artifact(cc.summary_md)
        tracked.log_artifact(cc.results_json)
    return summary


def _compare(cfg: Config, tracked: StudyRun) -> dict:
    cc = cfg.compare
    card = prepare_dataset(cfg.data)
    if not card["splits"]["eval"] or not card["splits"]["test"]:
        raise LoralabError("compare needs non-empty eval and test splits: raise data.eval_fraction / data.test_fraction")
    store = RecordStore(cc.records_dir)
    rates = {e: cc.learning_rates.get(e, cc.learning_rates.get(split_entry(e)[0])) for e in cc.methods}
    progress = _Progress(sum(len(rates[e]) + len(cc.seeds) for e in cc.methods))
    summary: dict = {"train_examples": cc.train_examples, "seeds": cc.seeds, "lr_seed": lr_seed(cfg), "split": "test",
                     "choices": "learning rate per method: eval-split loss of seed lr_seed; best method: mean "
                                "eval-split loss of the reported seeds; the test split reports them",
                     "machines": [],
                     "methods_planned": list(cc.methods),
                     "generation_per_task": cc.generation_per_task, "methods": {}}
    for entry in cc.methods:  # a method, or method@quantized-base
        search = _lr_search(cfg, entry, rates[entry], store, progress, summary, tracked)
        finite = [s for s in search if math.isfinite(s["eval_loss"])]  # a diverged candidate (NaN) never wins
        if not finite:
            raise LoralabError(f"{entry}: every learning rate in compare.learning_rates diverged (NaN eval loss)")
        best_lr = min(finite, key=lambda s: s["eval_loss"])["learning_rate"]
        seeds = []
        for seed in cc.seeds:
            progress.say(f"{entry}: lr {best_lr:g}, seed {seed} (test split)")
            record, _ = _run(cfg, entry, best_lr, seed, store, cc.generation_per_task, tracked)
            _note_machine(summary, record)
            seeds.append({"seed": seed, **record.to_json()})
        summary["methods"][entry] = _aggregate(entry, best_lr, search, seeds)
        _write(cfg, summary)  # after every method: a killed compare keeps what it measured
    return summary


def _run(cfg: Config, entry: str, lr: float, seed: int, store: RecordStore,
         test_generation: int, tracked: StudyRun | None = None) -> tuple[RunRecord, Path]:
    """One run of the comparison, done once (studies/runner.py), and its run directory."""
    params = _params(cfg, entry, lr, seed)
    root = run_root(cfg.compare.runs_dir, cfg, params, budget(cfg))
    tracking = tracked.child(f"{entry} lr={lr:g} seed={seed}") if tracked else None
    return recorded_run(cfg, params, root, budget(cfg), store, test_generation, tracking=tracking), root


def _lr_search(cfg: Config, entry: str, grid: list[float], store: RecordStore, progress: _Progress,
               summary: dict, tracked: StudyRun | None = None) -> list[dict]:
    """Eval loss of each learning rate of the grid (seed lr_seed(cfg)), extended past its edge while the edge wins."""
    cc = cfg.compare
    search: list[dict] = []
    pending = list(grid)
    while pending:
        lr = pending.pop(0)
        progress.say(f"{entry}: lr {lr:g}, seed {lr_seed(cfg)} (learning-rate search)")
        record, root = _run(cfg, entry, lr, lr_seed(cfg), store, 0, tracked)
        _note_machine(summary, record)
        search.append({"learning_rate": lr, "eval_loss": record.eval_loss, "run_dir": str(root)})
        if not pending:
            beyond = lr_beyond_edge(search, grid, cc.lr_extensions)
            if beyond is not None:
                pending.append(beyond)
                progress.total += 1
                print(f"{entry}: the best learning rate is at the edge of the grid; trying {beyond:g}", flush=True)
    return search


def _note_machine(summary: dict, record: RunRecord) -> None:
    """The CPUs the summary's runs trained on (a comparison continued elsewhere spans several)."""
    if record.machine is not None and (name := machine_summary(record.machine)) not in summary["machines"]:
        summary["machines"].append(name)


def lr_beyond_edge(search: list[dict], grid: list[float], max_extensions: int) -> float | None:
    """The next learning rate past the grid's edge when the best finite eval loss so far sits on that edge.

    The step is the grid's mean ratio (sqrt(10) for 1e-3, 3e-3, 1e-2), rounded to two significant
    digits: the extension searches as finely as the grid did. None when the best is inside, every
    candidate diverged, the grid has one point, or max_extensions candidates were already added.
    """
    finite = [s for s in search if math.isfinite(s["eval_loss"])]
    if not finite or len(grid) < 2 or len(search) - len(grid) >= max_extensions:
        return None
    tried = sorted(s["learning_rate"] for s in search)
    best = min(finite, key=lambda s: s["eval_loss"])["learning_rate"]
    ordered = sorted(grid)
    step = (ordered[-1] / ordered[0]) ** (1 / (len(ordered) - 1))
    if best == tried[-1]:
        return float(f"{best * step:.2g}")
    if best == tried[0]:
        return float(f"{best / step:.2g}")
    return None


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _aggregate(entry: str, lr: float, search: list[dict], seeds: list[dict]) -> dict:
    method, quantized = split_entry(entry)
    description = METHODS[method] + ("" if quantized == "none" else f", base held in {quantized} (bitsandbytes)")
    out = {"description": description, "learning_rate": lr, "lr_search": search, "runs": seeds}
    for key, getter in {
        "test_perplexity": lambda r: r["test"]["perplexity"],
        "domain_accuracy": lambda r: r["test"]["domain_accuracy"],
        "eval_loss": lambda r: r["eval_loss"],
        "tokens_per_s": lambda r: r["tokens_per_s"],
        "peak_rss_mb": lambda r: r["peak_rss_mb"],
        "wall_seconds": lambda r: r["wall_seconds"],
    }.items():
        out[key], out[key + "_sd"] = _mean_sd([getter(r) for r in seeds])
    tasks = seeds[0]["test"]["per_task"]
    out["per_task"] = {t: statistics.fmean(r["test"]["per_task"][t] for r in seeds) for t in tasks}
    out["trainable_parameters"] = seeds[0]["trainable_parameters"]
    out["adapter_mb"] = seeds[0]["adapter_mb"]
    return out


def _markdown(cfg: Config, summary: dict) -> str:
    cc = cfg.compare
    methods = summary["methods"]
    tasks = sorted({t for m in methods.values() for t in m["per_task"]})
    lines = [
        "# Method comparison",
        "",
        f"Generated by `loralab compare`. Every method trains on the same {cc.train_examples} examples of the bundled "
        f"training split with its own learning rate (chosen by eval-split loss among the listed candidates, seed "
        f"{lr_seed(cfg)}, which is not a reported seed), then runs with seeds {', '.join(map(str, cc.seeds))}. The best "
        "method is chosen by their mean eval-split loss (the column below); the test split only reports. Quality is "
        "on the test split: answer "
        f"perplexity over all test examples, domain score over {cc.generation_per_task} test questions per task. "
        "Values are mean ± standard deviation over seeds. Peak RSS is the training process's; tokens/s and wall time "
        f"are on {' and '.join(summary.get('machines')) or 'this machine'}.",
        "",
        *([f"**Partial:** {len(methods)} of {len(summary['methods_planned'])} entries measured so far; not yet: "
           f"{', '.join(m for m in summary['methods_planned'] if m not in methods)}. `loralab compare` continues.", ""]
          if set(summary.get("methods_planned", methods)) - set(methods) else []),
        "| method | lr | eval loss (chooses) | test ppl | domain score | trainable params | adapter MB | peak RSS MB "
        "| tokens/s | wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in sorted(methods.items(), key=lambda kv: kv[1]["eval_loss"]):
        lines.append(f"| {name} | {m['learning_rate']:g} | {m['eval_loss']:.4f} ± {m['eval_loss_sd']:.4f} "
                     f"| {m['test_perplexity']:.3f} ± {m['test_perplexity_sd']:.3f} | "
                     f"{m['domain_accuracy']:.1f} ± {m['domain_accuracy_sd']:.1f} | {m['trainable_parameters']:,} | "
                     f"{m['adapter_mb']:.2f} | {m['peak_rss_mb']:.0f} | {m['tokens_per_s']:.0f} | {m['wall_seconds']:.0f} |")
    lines += ["", "Domain score per task type (primary metric above chance, points, mean over seeds):", "",
              "| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for name, m in methods.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * m['per_task'].get(t, math.nan):.1f}" for t in tasks) + " |")
    lines += ["", f"Learning-rate search (eval-split loss, seed {lr_seed(cfg)}; candidates past the configured grid were added "
              "because the best sat on its edge):", ""]
    for name, m in methods.items():
        lines.append(f"- {name}: " + ", ".join(f"{s['learning_rate']:g} → {s['eval_loss']:.4f}" for s in m["lr_search"]))
    rel = os.path.relpath(Path(cc.plots_dir).resolve() / "quality_tradeoffs.png", Path(cc.summary_md).resolve().parent)
    return "\n".join(lines + ["", f"![quality trade-offs]({rel})", ""])


def _plot(cfg: Config, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = summary["methods"]
    panels = [("trainable_parameters", "trainable parameters", True), ("peak_rss_mb", "peak RSS while training (MB)", False),
              ("wall_seconds", "training wall time (s)", False)]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for row, (quality, label) in enumerate([("test_perplexity", "test answer perplexity (lower is better)"),
                                            ("domain_accuracy", "test domain score, points above chance (higher is better)")]):
        for col, (cost, cost_label, log) in enumerate(panels):
            ax = axes[row][col]
            for name, m in methods.items():
                ax.errorbar(m[cost], m[quality], yerr=m[quality + "_sd"], xerr=m.get(cost + "_sd", 0), fmt="o", capsize=3)
                ax.annotate(name, (m[cost], m[quality]), textcoords="offset points", xytext=(4, 4), fontsize=8)
            if log:
                ax.set_xscale("log")
            ax.set_xlabel(cost_label)
            ax.set_ylabel(label, fontsize=8)
            ax.grid(alpha=0.3)
    fig.suptitle(f"Methods on {summary['train_examples']} training examples, mean ± sd over seeds {summary['seeds']}")
    fig.tight_layout()
    atomic_io.save_figure(fig, Path(cfg.compare.plots_dir) / "quality_tradeoffs.png")
    plt.close(fig)


def _write(cfg: Config, summary: dict) -> None:
    cc = cfg.compare
    write_results(cc.results_json, summary, cc.summary_md, lambda data: _markdown(cfg, data), lambda data: _plot(cfg, data),
                  config=cfg.to_dict())
