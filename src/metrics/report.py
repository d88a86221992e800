"""The Markdown report and plots for an evaluation (experiments/report.md, experiments/plots/)."""

from __future__ import annotations

import os
from pathlib import Path

from loralab.config import Config
from loralab.util import atomic_io


def _cell(text: str, limit: int = 220) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _bar_plot(
    path: Path, title: str, ylabel: str, labels: list[str], base: list[float], tuned: list[float], log: bool = False
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(labels)), 4))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], base, width=0.4, label="base", color="#9aa5b1")
    ax.bar([i + 0.2 for i in x], tuned, width=0.4, label="fine-tuned (LoRA)", color="#2f6fdf")
    ax.set_xticks(list(x))
    ax.set_xticklabels([label.replace("_", "\n") for label in labels], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_io.save_figure(fig, path)
    plt.close(fig)


def _baseline_lines(baselines: dict | None, few_shot_info: dict | None) -> list[str]:
    """The fine-tuned model against constant answers and the base model, task by task (metrics/baselines.py)."""
    if not baselines:
        return []
    low, high = baselines["gain_ci95"]
    lines = [
        "## Against baselines",
        "",
        "Constant answers built from the training split alone, scored on the same questions with the same primary metric "
        "(0-100): the task's most frequent training answer, and its most frequent answer words as one string as long as "
        "its median answer; and the base model shown k training examples (few-shot), where the evaluation made it. The "
        "gain is the fine-tuned score minus the best competitor of each task (whichever scores higher on these same "
        "questions, which can only favour the competitors), with a paired "
        f"bootstrap 95 % interval over questions ({baselines['bootstrap']['resamples']} resamples, stratified by task).",
        "",
        f"Macro mean over tasks: fine-tuned {baselines['fine_tuned']:.1f}, best competitor per task "
        f"{baselines['best_baseline']:.1f}: **gain {baselines['gain']:+.1f} points (95 % CI {low:+.1f} to {high:+.1f})**.",
        "",
    ]
    few_shot = "few_shot_base" in next(iter(baselines["per_task"].values()), {})
    if few_shot and few_shot_info:
        by_k = ", ".join(f"k={k}: {v:.1f}" for k, v in few_shot_info["eval_domain_accuracy_by_k"].items())
        lines += [f"Few-shot base: the base model with k={few_shot_info['k']} training examples of the task before "
                  f"each question, k chosen on {few_shot_info['eval_questions']} eval-split questions ({by_k}).", ""]
    lines += [
        "| task | metric | fine-tuned | base | majority answer | frequent words |" + (" few-shot base |" if few_shot else "")
        + " best competitor | gain (95 % CI) |",
        "|---|---|---:|---:|---:|---:|" + ("---:|" if few_shot else "") + "---|---:|",
    ]
    for task, row in baselines["per_task"].items():
        lo, hi = row["gain_ci95"]
        lines.append(f"| {task} | {row['metric']} | {row['fine_tuned']:.1f} | {row['base']:.1f} | "
                     f"{row['majority_answer']:.1f} | {row['frequent_words']:.1f} | "
                     + (f"{row['few_shot_base']:.1f} | " if few_shot else "")
                     + f"{row['best_baseline']} | {row['gain']:+.1f} ({lo:+.1f} to {hi:+.1f}) |")
    lines += ["", "The constants:", "", "| task | most frequent answer | most frequent answer words |", "|---|---|---|"]
    for task, row in baselines["per_task"].items():
        majority, words = row["constants"].get("majority", ""), row["constants"].get("frequent_words", "")
        lines.append(f"| {task} | {_cell(majority, 80)} | {_cell(words, 80)} |")
    return [*lines, ""]


def write_report(results: dict, cfg: Config) -> None:
    base, tuned = results["models"]["base"], results["models"]["fine_tuned"]
    tasks = sorted(base["per_task"])
    plots = Path(cfg.eval.plots_dir)
    report_path = Path(cfg.eval.report_md)
    rel = lambda p: Path(os.path.relpath(p, report_path.parent)).as_posix()  # noqa: E731

    _bar_plot(plots / "accuracy_by_task.png", "Domain accuracy by task (primary metric)", "score (0-1)",
              tasks, [base["per_task"][t]["primary"] for t in tasks], [tuned["per_task"][t]["primary"] for t in tasks])
    ppl_tasks = sorted(base["per_task_ppl"])
    _bar_plot(plots / "perplexity_by_task.png", "Answer perplexity by task (lower is better)", "perplexity (log scale)",
              ppl_tasks, [base["per_task_ppl"][t] for t in ppl_tasks], [tuned["per_task_ppl"][t] for t in ppl_tasks], log=True)

    s = results["summary"]
    lines = [
        "# Evaluation report",
        "",
        f"Base model `{results['base_model']}` versus the same model with the LoRA adapter in `{results['adapter_dir']}`, "
        f"on the held-out **{results['split']}** split ({results['models']['base']['examples_scored']} examples for perplexity, "
        f"{results['generation_examples']} for generated-answer accuracy). Regenerate with `loralab evaluate`.",
        "",
        "| metric | base | fine-tuned | change |",
        "|---|---:|---:|---:|",
        f"| answer perplexity (token-weighted, lower is better) | {base['perplexity']:.2f} | {tuned['perplexity']:.2f} "
        f"| {s['perplexity_ratio_base_over_tuned']:.2f}x lower |",
        "| domain accuracy (macro mean of per-task primary metric, %, ± standard error) "
        f"| {base['domain_accuracy']:.1f} ± {base['domain_accuracy_se']:.1f} "
        f"| {tuned['domain_accuracy']:.1f} ± {tuned['domain_accuracy_se']:.1f} "
        f"| {s['domain_accuracy_gain_points']:+.1f} points |",
        "",
        *_baseline_lines(results.get("baselines"), results.get("few_shot")),
        "## Per task",
        "",
        "| task | n | primary metric | base | fine-tuned | base EM | tuned EM | base contains | tuned contains "
        "| base ppl | tuned ppl |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in tasks:
        b, f = base["per_task"][t], tuned["per_task"][t]
        lines.append(
            f"| {t} | {b['n']} | {b['primary_metric']} | {b['primary']:.3f} ± {b['primary_se']:.3f} "
            f"| {f['primary']:.3f} ± {f['primary_se']:.3f} | {b['exact_match']:.3f} | "
            f"{f['exact_match']:.3f} | {b['contains']:.3f} | {f['contains']:.3f} "
            f"| {base['per_task_ppl'].get(t, float('nan')):.2f} | "
            f"{tuned['per_task_ppl'].get(t, float('nan')):.2f} |"
        )
    lines += [
        "",
        "± is one standard error over the questions of a task (with 20 questions, an exact-match rate of 0.5 has ± 0.11). "
        "`contains` credits an answer that includes the reference anywhere (lenient towards the verbose base model); "
        "exact match and token F1 use SQuAD normalisation (lower case, no punctuation or articles).",
        "",
        f"![accuracy by task]({rel(plots / 'accuracy_by_task.png')})",
        f"![perplexity by task]({rel(plots / 'perplexity_by_task.png')})",
        "",
        "## Before and after",
        "",
        "| task | question | reference | base | fine-tuned |",
        "|---|---|---|---|---|",
    ]
    for sample in results["showcase"]:
        lines.append(f"| {sample['task']} | {_cell(sample['question'])} | {_cell(sample['reference'])} | "
                     f"{_cell(sample['base'])} | {_cell(sample['fine_tuned'])} |")
    lines.append("")
    atomic_io.write_text(report_path, "\n".join(lines))
