"""`loralab inject`: can an adapter learn the facts it is shown, and what does it cost?

The knowledge-injection study. Its adapters train on a small set of facts alone: the first
`inject.facts_per_task` training questions of each task that have a second phrasing. Then each
adapter is asked those same facts, word for word as in training and in the second phrasing that
training never saw, and scored like `loralab evaluate` (each task's primary metric above chance, so
a constant answer scores 0). Forgetting is measured beside it on the general-knowledge probe
(metrics/general_knowledge.py: MMLU text perplexity and multiple-choice accuracy).

Runs: the config's own settings for each of `inject.epochs` passes over the facts (the default
configuration is the 1-epoch point), and every `inject.variants` setting (rank, target modules,
learning rate) at the most epochs. Each training goes through the study runner (a fresh process,
a record, a directory named by its run identity) and each measurement is stored as it finishes, so
a killed study continues where it stopped. Results: `inject.results_json`, a Markdown summary that
says where the default sits and what makes an adapter remember, and one plot.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from loralab.config import Config
from loralab.data.builtin_domains import general_knowledge_questions
from loralab.data.chat import ensure_chat_template
from loralab.data.prepare import load_split
from loralab.metrics.evaluate import recall_answers, recall_rows, score_answers
from loralab.metrics.general_knowledge import score_general_knowledge
from loralab.model_utils import load_adapter, load_base_model, resolve_autocast_dtype, resolve_device
from loralab.studies.cells import Cells
from loralab.studies.records import RecordStore, RunRecord
from loralab.studies.runner import recorded_run, run_root
from loralab.studies.space import Budget, trial_overrides
from loralab.studies.writer import write_results
from loralab.util import atomic_io
from loralab.util.errors import LoralabError
from loralab.util.resources import machine_description

DEFAULT = "default"


@dataclasses.dataclass(frozen=True)
class Point:
    name: str  # "default" or a variant's name
    epochs: int
    params: dict[str, Any]  # the settings it changes ("section.key": value)

    @property
    def label(self) -> str:
        return f"{self.name}, {self.epochs} epoch{'s' * (self.epochs != 1)}"


def study_points(cfg: Config) -> list[Point]:
    ic = cfg.inject
    most = max(ic.epochs)
    points = [Point(DEFAULT, e, {}) for e in sorted(set(ic.epochs))]
    return points + [Point(name, most, dict(params)) for name, params in ic.variants.items()]


def facts_dir(cfg: Config) -> Path:
    """The facts the adapters train on (and are asked), and the eval rows for their eval loss."""
    ic = cfg.inject
    facts = recall_rows(load_split(cfg.data.out_dir, "train"), ic.facts_per_task)
    if not facts:
        raise LoralabError(f"{cfg.data.out_dir}/train_split.json has no row with a second phrasing "
                           f"(data.paraphrase_field={cfg.data.paraphrase_field!r}): the study asks facts in new words")
    out = Path(ic.runs_dir) / "facts"
    eval_rows = load_split(cfg.data.out_dir, "eval")[: ic.eval_examples]
    atomic_io.write_json_set({out / "train_split.json": facts, out / "eval_split.json": eval_rows,
                              out / "test_split.json": []})
    return out


def _train(cfg: Config, data_dir: Path, point: Point) -> tuple[RunRecord, str]:
    """One adapter, `point.epochs` passes over the facts (done once: studies/runner.py)."""
    on_facts = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, out_dir=str(data_dir)))
    n_facts = len(load_split(data_dir, "train"))
    budget = Budget(n_facts * point.epochs, len(load_split(data_dir, "eval")))
    root = run_root(Path(cfg.inject.runs_dir) / "adapters", on_facts, point.params, budget)
    record = recorded_run(on_facts, point.params, root, budget, RecordStore(), needs_adapter=True)
    return record, str(root / "adapter")


def _recall(model, tokenizer, cfg: Config, facts: list[dict], device, amp_dtype) -> dict:
    """Scores of the answers to the facts asked as in training and in new words: per metric above chance
    (points), per task, and how many answers are exactly the reference."""
    answers = recall_answers(model, tokenizer, facts, cfg.eval.batch_size, cfg.eval.max_new_tokens, device, amp_dtype)
    measured = {}
    for phrasing, given in answers.items():
        scores = score_answers(facts, given)
        measured[phrasing] = {
            "by_metric": {metric: group["score"] for metric, group in scores["by_metric"].items()},
            "per_task": {task: 100 * row["primary"] for task, row in scores["per_task"].items()},
            "exact": sum(round(row["exact_match"] * row["n"]) for row in scores["per_task"].values()),
        }
    return measured


def _measure(cfg: Config, adapters: dict[str, str | None], facts: list[dict]) -> dict[str, dict]:
    """The base (None) and every adapter: recall of the facts, and the forgetting probe; each stored once."""
    ic = cfg.inject
    cells = Cells(Path(ic.runs_dir) / "cells.json")
    device = resolve_device(cfg.model.device)
    amp_dtype = resolve_autocast_dtype(cfg.model.precision, device)
    questions = general_knowledge_questions(ic.general_questions, cfg.data.seed)
    measured = {}
    for number, (label, adapter_dir) in enumerate(adapters.items(), 1):
        key = json.dumps([adapter_dir or f"base:{cfg.model.name_or_path}", [f["id"] for f in facts], ic.general_questions,
                          cfg.data.seed, cfg.eval.max_new_tokens])
        if cells.get(key) is None:
            print(f"[{number}/{len(adapters)}] measuring {label}", flush=True)
            loaded = load_base_model(cfg.model, device)
            ensure_chat_template(loaded.tokenizer)
            model = load_adapter(loaded.model, adapter_dir) if adapter_dir else loaded.model
            cells.put(key, {**_recall(model, loaded.tokenizer, cfg, facts, device, amp_dtype),
                            "general": score_general_knowledge(model, loaded.tokenizer, questions, cfg.eval.batch_size,
                                                               device, amp_dtype)})
        measured[label] = cells.get(key)
    return measured


def run_inject(cfg: Config) -> dict:
    cfg.validate()
    points = study_points(cfg)
    for point in points:  # a misspelt variant fails now, in one line, not after an hour of training
        try:
            trial_overrides(cfg, point.params)
        except LoralabError as error:
            raise LoralabError(f"inject.variants[{point.name!r}]: {error}") from None
    data_dir = facts_dir(cfg)
    facts = load_split(data_dir, "train")
    records, adapters = {}, {"base": None}
    for number, point in enumerate(points, 1):
        print(f"[{number}/{len(points)}] training {point.label} on {len(facts)} facts", flush=True)
        records[point.label], adapters[point.label] = _train(cfg, data_dir, point)
    measured = _measure(cfg, adapters, facts)
    summary = _summary(cfg, points, facts, records, measured)
    ic = cfg.inject
    write_results(ic.results_json, summary, ic.summary_md, _markdown, lambda data: _plot(data, Path(ic.plot)),
                  config=cfg.to_dict())
    return summary


def _summary(cfg: Config, points: list[Point], facts: list[dict], records: dict[str, RunRecord],
             measured: dict[str, dict]) -> dict:
    base = measured["base"]
    rows = [{"label": "base", "name": "base", "epochs": 0, "params": {}, **base}]
    for point in points:
        record = records[point.label]
        rows.append({"label": point.label, "name": point.name, "epochs": point.epochs, "params": point.params,
                     "steps": record.steps, "train_seconds": record.wall_seconds, "eval_loss": record.eval_loss,
                     "final_train_loss": record.final_train_loss, **measured[point.label]})
    return {"facts": len(facts), "facts_per_task": cfg.inject.facts_per_task, "tasks": sorted({f["task"] for f in facts}),
            "settings": {"learning_rate": cfg.train.learning_rate, "lora_r": cfg.lora.r, "lora_alpha": cfg.lora.alpha,
                         "target_modules": cfg.lora.target_modules, "method": cfg.lora.method},
            "general_questions": cfg.inject.general_questions, "machine": machine_description(), "runs": rows}


def _metrics(summary: dict) -> list[str]:
    return sorted({m for row in summary["runs"] for m in row["as_trained"]["by_metric"]})


def _change(new: float, old: float) -> str:
    return f"{100 * (new / old - 1):+.1f} %"


def _markdown(summary: dict) -> str:
    metrics, runs = _metrics(summary), summary["runs"]
    base = runs[0]
    s = summary["settings"]
    lines = [
        "# Knowledge injection: can an adapter learn the facts it is shown?",
        "",
        f"Written by `loralab inject`. Each adapter trains on {summary['facts']} facts alone (the first "
        f"{summary['facts_per_task']} training questions of each of {len(summary['tasks'])} tasks), then is asked the "
        "same facts word for word as in training and in a second phrasing that training never saw. Scores: each task's "
        "primary metric above chance (points; 0 for any answer that ignores its question), averaged over the tasks of "
        "that metric; `exact` counts answers identical to the reference. Forgetting: the base model's MMLU text "
        f"perplexity and multiple-choice accuracy on {summary['general_questions']} general questions. The config: "
        f"lr {s['learning_rate']:g}, r={s['lora_r']}, alpha={s['lora_alpha']}, target modules {s['target_modules']}.",
        "",
        "| run | epochs | train s | " + " | ".join(f"{m} as trained | {m} new words" for m in metrics)
        + " | exact as trained | exact new words | MMLU text ppl | MMLU accuracy % |",
        "|---|---:|---:|" + "---:|---:|" * len(metrics) + "---:|---:|---:|---:|",
    ]
    for row in runs:
        seconds = f"{row['train_seconds']:.0f}" if "train_seconds" in row else "—"
        scores = " | ".join(f"{row['as_trained']['by_metric'][m]:.1f} | {row['paraphrased']['by_metric'][m]:.1f}"
                            for m in metrics)
        g = row["general"]
        ppl = f"{g['text_perplexity']:.2f}" + (f" ({_change(g['text_perplexity'], base['general']['text_perplexity'])})"
                                                if row is not base else "")
        lines.append(f"| {row['label']} | {row['epochs']} | {seconds} | {scores} | {row['as_trained']['exact']} / "
                     f"{summary['facts']} | {row['paraphrased']['exact']} / {summary['facts']} | {ppl} | "
                     f"{g['mc_accuracy']:.1f} ± {g['mc_accuracy_se']:.1f} |")
    lines += ["", *_findings(summary, metrics), "", "![knowledge injection](plots/knowledge_injection.png)", ""]
    return "\n".join(lines)


def _findings(summary: dict, metrics: list[str]) -> list[str]:
    """Where the default configuration sits, and which run remembers best in new words, at what cost."""
    runs = summary["runs"]
    base, default = runs[0], next(r for r in runs if r["name"] == DEFAULT and r["epochs"] == min(
        x["epochs"] for x in runs if x["name"] == DEFAULT))

    def recall(row: dict, phrasing: str) -> float:
        return sum(row[phrasing]["by_metric"].values()) / len(metrics)

    best = max(runs[1:], key=lambda r: recall(r, "paraphrased"))
    changes = ", ".join(f"{k}={v}" for k, v in best["params"].items()) or "the config's settings"
    return [
        "Findings (mean over the metrics above, points above chance):",
        "",
        f"- The base model: {recall(base, 'as_trained'):.1f} as trained, {recall(base, 'paraphrased'):.1f} in new words.",
        f"- The default configuration ({default['label']}): {recall(default, 'as_trained'):.1f} as trained, "
        f"{recall(default, 'paraphrased'):.1f} in new words; {default['as_trained']['exact']} of {summary['facts']} "
        "answers exact as trained.",
        f"- Remembers best in new words: {best['label']} ({changes}): "
        f"{recall(best, 'as_trained'):.1f} as trained, {recall(best, 'paraphrased'):.1f} in new words, "
        f"{best['as_trained']['exact']} and {best['paraphrased']['exact']} of {summary['facts']} exact; MMLU text "
        f"perplexity {_change(best['general']['text_perplexity'], base['general']['text_perplexity'])} against the base, "
        f"accuracy {best['general']['mc_accuracy'] - base['general']['mc_accuracy']:+.1f} points.",
    ]


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics, runs = _metrics(summary), summary["runs"]
    base = runs[0]
    default = [r for r in runs if r["name"] == DEFAULT]
    variants = [r for r in runs if r["name"] not in (DEFAULT, "base")]
    fig, (recall_ax, forget_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    epochs = [r["epochs"] for r in default]
    colors = dict(zip(metrics, ("#2f6fdf", "#d9822b", "#3a9a5b")))  # one per metric: lines and variants alike
    for metric, color in colors.items():
        for phrasing, style in (("as_trained", "-"), ("paraphrased", "--")):
            recall_ax.plot(epochs, [r[phrasing]["by_metric"][metric] for r in default], style, marker="o", color=color,
                           label=f"{metric}, {phrasing.replace('_', ' ').replace('paraphrased', 'new words')}")
            recall_ax.axhline(base[phrasing]["by_metric"][metric], color=color, alpha=0.25, linestyle=style)
    markers = iter("s^Dv*P")
    for row in variants:
        marker = next(markers, "o")
        for metric in metrics:
            recall_ax.scatter([row["epochs"]], [row["paraphrased"]["by_metric"][metric]], marker=marker, s=60,
                              color=colors[metric], edgecolors="black",
                              label=f"{row['name']} (new words; colour: metric)" if metric == metrics[0] else None)
        forget_ax.scatter([row["epochs"]], [100 * (row["general"]["text_perplexity"] / base["general"]["text_perplexity"] - 1)],
                          marker=marker, s=60, color="black", label=row["name"])
    recall_ax.set_xscale("log", base=2)
    recall_ax.set_xticks(epochs, [str(e) for e in epochs])
    recall_ax.set_xlabel("epochs over the facts")
    recall_ax.set_ylabel("recall, points above chance")
    recall_ax.set_title("Recall of trained facts (faint lines: base model)")
    recall_ax.legend(fontsize=7)
    forget_ax.plot(epochs, [100 * (r["general"]["text_perplexity"] / base["general"]["text_perplexity"] - 1) for r in default],
                   marker="o", color="#c0392b", label="default: MMLU text perplexity")
    twin = forget_ax.twinx()
    twin.plot(epochs, [r["general"]["mc_accuracy"] - base["general"]["mc_accuracy"] for r in default], marker="o",
              linestyle="--", color="#7f8c8d", label="default: MMLU accuracy (right)")
    twin.set_ylabel("MMLU accuracy change, points")
    forget_ax.axhline(0, color="black", linewidth=0.5)
    forget_ax.set_xscale("log", base=2)
    forget_ax.set_xticks(epochs, [str(e) for e in epochs])
    forget_ax.set_xlabel("epochs over the facts")
    forget_ax.set_ylabel("MMLU text perplexity change vs base, %")
    forget_ax.set_title("Forgetting")
    handles = forget_ax.get_legend_handles_labels()
    extra = twin.get_legend_handles_labels()
    forget_ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=7)
    fig.tight_layout()
    atomic_io.save_figure(fig, path)
    plt.close(fig)
