"""`loralab domains`: one adapter per domain, one on their mixture, a cross-evaluation matrix and forgetting.

1. Data: each domain of `domains.datasets` is prepared like `loralab prepare` (cleaned, deduplicated,
   group-aware train/eval/test split) under `<runs_dir>/prepared/<domain>`. Each specialist trains
   on the first `domains.train_examples` examples of its (shuffled) training split; the mixture
   adapter trains on the union of exactly those examples, shuffled: it sees what the specialists
   saw together, so the comparison is one adapter against three, at the same data.
2. Training: every adapter with the config's LoRA settings, learning rate and seed, one epoch.
3. Cross-evaluation: the base and every adapter on every domain's test split (answer perplexity;
   domain score on the first `domains.generation_per_task` test questions per task), and on the
   general-knowledge probe (general_knowledge.py) for forgetting.
Every training goes through the study runner (studies/runner.py: a fresh process, a record, a directory
named by its run identity); each finished training and each finished cell of the matrix is stored when
it ends, so a killed run continues where it stopped. Results: `domains.results_json`, a Markdown
summary and plots.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
from pathlib import Path

from loralab.config import MIXTURE, Config
from loralab.data.builtin_domains import general_knowledge_questions
from loralab.data.chat import ensure_chat_template
from loralab.data.prepare import load_split, prepare_dataset
from loralab.metrics.evaluate import measure_quality
from loralab.metrics.general_knowledge import score_general_knowledge
from loralab.model_utils import load_adapter, load_base_model, resolve_autocast_dtype, resolve_device
from loralab.studies.cells import Cells
from loralab.studies.records import RecordStore, RunRecord
from loralab.studies.runner import recorded_run, run_root
from loralab.studies.space import Budget
from loralab.studies.writer import write_results
from loralab.training.tracking import StudyRun, study_run
from loralab.util import atomic_io
from loralab.util.errors import LoralabError
from loralab.util.resources import machine_description


def _prepare(cfg: Config, name: str, dataset: str) -> Path:
    out = Path(cfg.domains.runs_dir) / "prepared" / name
    data_cfg = dataclasses.replace(cfg.data, dataset=dataset, out_dir=str(out))
    card_path = out / "dataset_card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else None
    if not card or card.get("dataset") != dataset or card.get("seed") != data_cfg.seed:
        card = prepare_dataset(data_cfg)
    if not card["splits"]["train"] or not card["splits"]["eval"] or not card["splits"]["test"]:
        raise LoralabError(f"domains.datasets.{name} ({dataset}): every split must be non-empty, got {card['splits']}")
    return out


def _write_subset(out: Path, train: list[dict], eval_rows: list[dict]) -> Path:
    atomic_io.write_json_set({out / "train_split.json": train, out / "eval_split.json": eval_rows, out / "test_split.json": []})
    return out


def _training_sets(cfg: Config, prepared: dict[str, Path]) -> dict[str, Path]:
    """Data directories of the specialists and of the mixture (union of the specialists' examples)."""
    dc = cfg.domains
    root = Path(dc.runs_dir) / "subsets"
    sets, mixture_train, mixture_eval = {}, [], []
    share = max(1, dc.eval_examples // len(prepared))
    for name, data_dir in prepared.items():
        train, eval_rows = load_split(data_dir, "train")[: dc.train_examples], load_split(data_dir, "eval")[: dc.eval_examples]
        if len(train) < dc.train_examples:
            print(f"warning: {name} has {len(train)} training examples, fewer than domains.train_examples={dc.train_examples}",
                  file=sys.stderr)
        sets[name] = _write_subset(root / name, train, eval_rows)
        mixture_train += train
        mixture_eval += eval_rows[:share]
    random.Random(cfg.train.seed).shuffle(mixture_train)
    sets[MIXTURE] = _write_subset(root / MIXTURE, mixture_train, mixture_eval)
    return sets


def _train(cfg: Config, data_dir: Path, tracked: StudyRun | None = None) -> tuple[RunRecord, str]:
    """One adapter, one epoch over `data_dir`'s training split (done once: studies/runner.py); its record
    and its adapter directory."""
    on_data = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, out_dir=str(data_dir)))
    budget = Budget(len(load_split(data_dir, "train")), len(load_split(data_dir, "eval")))
    root = run_root(Path(cfg.domains.runs_dir) / "adapters", on_data, {}, budget)
    record = recorded_run(on_data, {}, root, budget, RecordStore(), needs_adapter=True,
                          tracking=tracked.child(data_dir.name) if tracked else None)
    return record, str(root / "adapter")


def _evaluate(cfg: Config, adapters: dict[str, str | None], prepared: dict[str, Path]) -> dict:
    """Every model (None: the base) on every domain's test split and on the general-knowledge probe."""
    dc = cfg.domains
    cells = Cells(Path(dc.runs_dir) / "cells.json")  # the matrix's finished cells
    device = resolve_device(cfg.model.device)
    amp_dtype = resolve_autocast_dtype(cfg.model.precision, device)
    questions = general_knowledge_questions(dc.general_questions, cfg.data.seed)
    matrix: dict = {}
    for model_name, adapter_dir in adapters.items():
        identity = adapter_dir or f"base:{cfg.model.name_or_path}"
        model = tokenizer = None
        row = matrix[model_name] = {}
        for target in [*prepared, "general"]:
            key = json.dumps([identity, target, dc.generation_per_task if target != "general" else dc.general_questions,
                              cfg.data.seed, cfg.eval.max_new_tokens])
            if cells.get(key) is None:
                if model is None:  # loaded only when a cell of this model is missing
                    loaded = load_base_model(cfg.model, device)
                    tokenizer = loaded.tokenizer
                    ensure_chat_template(tokenizer)
                    model = load_adapter(loaded.model, adapter_dir) if adapter_dir else loaded.model
                print(f"evaluating {model_name} on {target}", flush=True)
                if target == "general":
                    value = score_general_knowledge(model, tokenizer, questions, cfg.eval.batch_size, device, amp_dtype)
                else:
                    rows = load_split(prepared[target], "test")
                    quality = measure_quality(cfg, model, tokenizer, rows, dc.generation_per_task, device, amp_dtype)
                    value = {k: quality[k] for k in ("perplexity", "domain_accuracy", "domain_accuracy_se", "examples_scored",
                                                     "generation_examples")}
                cells.put(key, value)
            row[target] = cells.get(key)
    return matrix


def run_domains(cfg: Config) -> dict:
    cfg.validate()  # domains.datasets names at least two domains, none of them reserved
    dc = cfg.domains
    prepared = {name: _prepare(cfg, name, dataset) for name, dataset in dc.datasets.items()}
    training_sets = _training_sets(cfg, prepared)
    records: dict[str, RunRecord] = {}
    adapters: dict[str, str | None] = {"base": None}
    with study_run(cfg, "domains", Path(dc.runs_dir).name) as tracked:  # each adapter a nested run of this one
        for number, (name, data_dir) in enumerate(training_sets.items(), 1):
            print(f"[{number}/{len(training_sets)}] training the {name} adapter on {data_dir}", flush=True)
            records[name], adapters[name] = _train(cfg, data_dir, tracked)
        matrix = _evaluate(cfg, adapters, prepared)
        summary = _summary(cfg, prepared, records, matrix)
        write_results(dc.results_json, summary, dc.summary_md, lambda data: _markdown(cfg, data),
                      lambda data: _plot(cfg, data), config=cfg.to_dict())
        tracked.log_metrics(matrix_metrics(matrix))  # the cross-evaluation, on the study's parent run
        for path in (dc.results_json, dc.summary_md, Path(dc.plots_dir) / "cross_evaluation.png"):
            tracked.log_artifact(path)
    return summary


def matrix_metrics(matrix: dict) -> dict[str, float]:
    """The cross-evaluation as `<model>/<test set>/<metric>` numbers (`medical/legal/perplexity`,
    `mixture/general/text_perplexity`), the way trackers store scalars."""
    return {f"{model}/{target}/{key}": value for model, row in matrix.items() for target, cell in row.items()
            for key, value in cell.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}


def _summary(cfg: Config, prepared: dict[str, Path], records: dict[str, RunRecord], matrix: dict) -> dict:
    dc = cfg.domains
    return {
        "machine": machine_description(),
        "train_examples_per_domain": dc.train_examples,
        "learning_rate": cfg.train.learning_rate,
        "lora": {"method": cfg.lora.method, "rank": cfg.lora.r, "alpha": cfg.lora.alpha},
        "domains": {name: {"dataset": dc.datasets[name],
                           "card": json.loads((prepared[name] / "dataset_card.json").read_text())["splits"]}
                    for name in prepared},
        "general_questions": dc.general_questions,
        "generation_per_task": dc.generation_per_task,
        "training": {name: {k: getattr(r, k) for k in ("steps", "eval_loss", "wall_seconds", "tokens_per_s", "peak_rss_mb",
                                                       "trainable_parameters", "adapter_mb")} for name, r in records.items()},
        "matrix": matrix,
    }


def _pct(new: float, old: float) -> str:
    return f"{100 * (new / old - 1):+.1f} %"


def _markdown(cfg: Config, summary: dict) -> str:
    dc = cfg.domains
    domains = list(summary["domains"])
    matrix = summary["matrix"]
    models = list(matrix)
    header = "| model | " + " | ".join(domains) + " |"
    rule = "|---|" + "---:|" * len(domains)
    lines = [
        "# Domains: specialists, a mixture, cross-evaluation and forgetting",
        "",
        f"Generated by `loralab domains`. Each specialist adapter trains for one epoch on {dc.train_examples} examples of "
        f"its domain's training split; the mixture adapter on the union of those {dc.train_examples * len(domains)} examples "
        f"(so it takes {len(domains)}x the optimizer steps, over the same examples). "
        f"Same LoRA settings ({summary['lora']['method']}, r={summary['lora']['rank']}, alpha={summary['lora']['alpha']}), "
        f"learning rate {summary['learning_rate']:g} and seed for all; one seed per adapter. Every model is measured on "
        "every domain's held-out test split.",
        "",
        "Domains: " + "; ".join(f"{name} = `{d['dataset']}` ({d['card']['train']} train / {d['card']['eval']} eval / "
                                  f"{d['card']['test']} test examples)" for name, d in summary["domains"].items()) + ".",
        "",
        "## Answer perplexity on each domain's test split (lower is better; the diagonal is each specialist at home)",
        "",
        header, rule,
    ]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(f"{matrix[m][d]['perplexity']:.2f}" for d in domains) + " |")
    lines += ["", f"## Domain score, points above chance (first {dc.generation_per_task} test questions per task, "
              "± standard error)", "",
              header, rule]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(f"{matrix[m][d]['domain_accuracy']:.1f} ± {matrix[m][d]['domain_accuracy_se']:.1f}"
                                             for d in domains) + " |")
    base_general = matrix["base"]["general"]
    lines += ["", f"## Forgetting: general knowledge ({summary['general_questions']} MMLU questions outside the three domains, "
              "plain text, no chat template)", "",
              "| model | text perplexity | change vs base | multiple-choice accuracy % | change vs base (points) |",
              "|---|---:|---:|---:|---:|"]
    for m in models:
        g = matrix[m]["general"]
        lines.append(f"| {m} | {g['text_perplexity']:.2f} | {_pct(g['text_perplexity'], base_general['text_perplexity'])} | "
                     f"{g['mc_accuracy']:.1f} ± {g['mc_accuracy_se']:.1f} | "
                     f"{g['mc_accuracy'] - base_general['mc_accuracy']:+.1f} |")
    lines += ["", "## The mixture against the specialists, on each specialist's own domain", "",
              "| domain | specialist ppl | mixture ppl | mixture vs specialist | specialist acc. % | mixture acc. % |",
              "|---|---:|---:|---:|---:|---:|"]
    for d in domains:
        s, mix = matrix[d][d], matrix[MIXTURE][d]
        lines.append(f"| {d} | {s['perplexity']:.2f} | {mix['perplexity']:.2f} | {_pct(mix['perplexity'], s['perplexity'])} | "
                     f"{s['domain_accuracy']:.1f} | {mix['domain_accuracy']:.1f} |")
    lines += ["", "## Training", "", "| adapter | steps | eval loss | wall s | tokens/s | peak RSS MB |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, t in summary["training"].items():
        lines.append(f"| {name} | {t['steps']} | {t['eval_loss']:.4f} | {t['wall_seconds']:.0f} | {t['tokens_per_s']:.0f} | "
                     f"{t['peak_rss_mb']:.0f} |")
    plot = os.path.relpath(Path(dc.plots_dir).resolve() / "cross_evaluation.png", Path(dc.summary_md).resolve().parent)
    return "\n".join(lines + ["", f"![cross-evaluation]({plot})", ""])


def _plot(cfg: Config, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    domains, matrix = list(summary["domains"]), summary["matrix"]
    models = list(matrix)
    ratio = np.array([[matrix[m][d]["perplexity"] / matrix["base"][d]["perplexity"] for d in domains] for m in models])
    accuracy = np.array([[matrix[m][d]["domain_accuracy"] for d in domains] for m in models])
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for ax, values, title, cmap, fmt in [
        (axes[0], ratio, "test answer perplexity / base's (lower is better)", "RdYlGn_r", "{:.2f}"),
        (axes[1], accuracy, "test domain score, points above chance (higher is better)", "RdYlGn", "{:.1f}"),
    ]:
        image = ax.imshow(values, cmap=cmap, aspect="auto")
        ax.set_xticks(range(len(domains)), [f"{d} test" for d in domains])
        ax.set_yticks(range(len(models)), models)
        for i in range(len(models)):
            for j in range(len(domains)):
                ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize=9)
        ax.set_title(title, fontsize=10)
        fig.colorbar(image, ax=ax, shrink=0.8)
    adapters = models[1:]
    base_general = matrix["base"]["general"]["text_perplexity"]
    change = [100 * (matrix[m]["general"]["text_perplexity"] / base_general - 1) for m in adapters]
    axes[2].bar(adapters, change, color=["C3" if c > 0 else "C2" for c in change])
    axes[2].axhline(0, color="grey", linewidth=1)
    for x, m in enumerate(adapters):
        axes[2].annotate(f"MC {matrix[m]['general']['mc_accuracy']:.0f} %", (x, change[x]), ha="center", fontsize=8,
                         textcoords="offset points", xytext=(0, 4 if change[x] >= 0 else -12))
    axes[2].set_title(f"forgetting: general-knowledge text perplexity, % change vs base ({base_general:.1f})\n"
                      f"(above 0 = forgot; MC = multiple-choice accuracy, base {matrix['base']['general']['mc_accuracy']:.0f} %)",
                      fontsize=10)
    axes[2].tick_params(axis="x", rotation=30)
    fig.suptitle(f"Specialists, mixture and base; {summary['train_examples_per_domain']} training examples per domain")
    fig.tight_layout()
    atomic_io.save_figure(fig, Path(cfg.domains.plots_dir) / "cross_evaluation.png")
    plt.close(fig)

