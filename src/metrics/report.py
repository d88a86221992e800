"""The Markdown report and plots for an evaluation (experiments/report.md, experiments/plots/)."""

from __future__ import annotations

import json
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
        "above chance (0-100): the task's most frequent training answer, and its most frequent answer words as one string "
        "as long as its median answer; and the base model shown k training examples (few-shot), where the evaluation made "
        "it. Above chance, any answer that ignores its question scores 0; their raw scores are in the last table. The "
        "gain is the fine-tuned score minus the best competitor of each task (whichever scores higher on these same "
        "questions, which can only favour the competitors), with a paired "
        f"bootstrap 95 % interval over questions ({baselines['bootstrap']['resamples']} resamples, stratified by task).",
        "",
        "| tasks scored by | tasks | fine-tuned | best competitor per task | gain (95 % CI) |",
        "|---|---:|---:|---:|---:|",
        *(f"| {metric} above chance | {len(group['tasks'])} | {group['fine_tuned']:.1f} | {group['best_baseline']:.1f} "
          f"| **{group['gain']:+.1f}** ({group['gain_ci95'][0]:+.1f} to {group['gain_ci95'][1]:+.1f}) |"
          for metric, group in baselines.get("by_metric", {}).items()),
        f"| macro mean of all tasks (ranking key) | {len(baselines['per_task'])} | {baselines['fine_tuned']:.1f} "
        f"| {baselines['best_baseline']:.1f} | {baselines['gain']:+.1f} ({low:+.1f} to {high:+.1f}) |",
        "",
    ]
    few_shot = "few_shot_base" in next(iter(baselines["per_task"].values()), {})
    if few_shot and few_shot_info:
        by_k = ", ".join(f"k={k}: {v:.1f}" for k, v in few_shot_info["eval_domain_accuracy_by_k"].items())
        lines += [f"Few-shot base: the base model with k={few_shot_info['k']} training examples of the task before "
                  f"each question, k chosen on {few_shot_info['eval_questions']} eval-split questions ({by_k}"
                  + (f"; scored with {few_shot_info['k_chosen_with']}" if "k_chosen_with" in few_shot_info else "")
                  + ").", ""]
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
    lines += ["", "The constants, and every answer's raw primary score (before the chance correction, 0-100):", "",
              "| task | most frequent answer | most frequent answer words | raw: fine-tuned | base | majority | "
              "frequent words |" + (" few-shot |" if few_shot else ""),
              "|---|---|---|---:|---:|---:|---:|" + ("---:|" if few_shot else "")]
    for task, row in baselines["per_task"].items():
        majority, words, raw = row["constants"].get("majority", ""), row["constants"].get("frequent_words", ""), row["raw"]
        lines.append(f"| {task} | {_cell(majority, 80)} | {_cell(words, 80)} | {raw['fine_tuned']:.1f} | {raw['base']:.1f} "
                     f"| {raw['majority_answer']:.1f} | {raw['frequent_words']:.1f} |"
                     + (f" {raw['few_shot_base']:.1f} |" if few_shot else ""))
    return [*lines, ""]


def _recall_lines(recall: dict | None) -> list[str]:
    """The second kind of test: facts the adapter was trained on, asked as in training and in new words."""
    if not recall or "paraphrased" not in recall:
        return []
    new_words, as_trained = recall["paraphrased"], recall["as_trained"]
    lines = [
        "## Recall of training facts",
        "",
        f"The first training questions of each task ({recall['questions']} in all), whose facts the adapter was trained "
        "on: asked word for word as in training, and in a second phrasing that training never saw (the held-out test "
        "above asks about concepts that training never saw). Primary metric above chance (points, 0-100), with the gain "
        "over the best of the base model and the constant answers (95 % CI, paired bootstrap over questions).",
        "",
        "| task | metric | base, as trained | fine-tuned, as trained | base, new words | fine-tuned, new words "
        "| gain in new words (95 % CI) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for task, row in new_words["per_task"].items():
        trained = as_trained["per_task"][task]
        lo, hi = row["gain_ci95"]
        lines.append(f"| {task} | {row['metric']} | {trained['base']:.1f} | {trained['fine_tuned']:.1f} | {row['base']:.1f} "
                     f"| {row['fine_tuned']:.1f} | {row['gain']:+.1f} ({lo:+.1f} to {hi:+.1f}) |")
    for metric, group in new_words.get("by_metric", {}).items():
        trained = as_trained["by_metric"][metric]
        lines.append(f"| **{metric} tasks** | {metric} | | {trained['fine_tuned']:.1f} | | {group['fine_tuned']:.1f} "
                     f"| **{group['gain']:+.1f}** ({group['gain_ci95'][0]:+.1f} to {group['gain_ci95'][1]:+.1f}) |")
    return [*lines, ""]


def _lm_eval_lines(cfg: Config) -> list[str]:
    """lm-evaluation-harness's numbers, when `loralab evaluate --lm-eval` has written them beside these results."""
    from loralab.metrics.harness_report import render_lm_eval_section

    path = Path(cfg.eval.lm_eval_results_json)
    if not path.is_file():
        return []
    return [render_lm_eval_section(json.loads(path.read_text(encoding="utf-8"))),
            f"(From `{path.as_posix()}`, written by `loralab evaluate --lm-eval`.)", ""]


def write_report(results: dict, cfg: Config) -> None:
    base, tuned = results["models"]["base"], results["models"]["fine_tuned"]
    tasks = sorted(base["per_task"])
    plots = Path(cfg.eval.plots_dir)
    report_path = Path(cfg.eval.report_md)
    rel = lambda p: Path(os.path.relpath(p, report_path.parent)).as_posix()  # noqa: E731

    _bar_plot(plots / "accuracy_by_task.png", "Domain score by task (primary metric above chance)", "score (0-1)",
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
        *(f"| {metric} above chance, mean of {len(group['tasks'])} tasks (points, 0 for any constant answer) "
          f"| {group['score']:.1f} | {tuned['by_metric'][metric]['score']:.1f} "
          f"| {tuned['by_metric'][metric]['score'] - group['score']:+.1f} points |"
          for metric, group in base.get("by_metric", {}).items()),
        "| macro mean of both over tasks (the ranking key of tune and compare, ± standard error) "
        f"| {base['domain_accuracy']:.1f} ± {base['domain_accuracy_se']:.1f} "
        f"| {tuned['domain_accuracy']:.1f} ± {tuned['domain_accuracy_se']:.1f} "
        f"| {s['domain_accuracy_gain_points']:+.1f} points |",
        "",
        *_baseline_lines(results.get("baselines"), results.get("few_shot")),
        *_recall_lines(results.get("recall")),
        *_lm_eval_lines(cfg),
        "## Per task",
        "",
        "| task | n | primary metric | base above chance | fine-tuned above chance | base raw | tuned raw "
        "| base contains | tuned contains | base ppl | tuned ppl |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in tasks:
        b, f = base["per_task"][t], tuned["per_task"][t]
        lines.append(
            f"| {t} | {b['n']} | {b['primary_metric']} | {b['primary']:.3f} ± {b['primary_se']:.3f} "
            f"| {f['primary']:.3f} ± {f['primary_se']:.3f} | {b['primary_raw']:.3f} | {f['primary_raw']:.3f} "
            f"| {b['contains']:.3f} | {f['contains']:.3f} "
            f"| {base['per_task_ppl'].get(t, float('nan')):.2f} | "
            f"{tuned['per_task_ppl'].get(t, float('nan')):.2f} |"
        )
    lines += [
        "",
        "Above chance: an answer's score against its own reference minus its mean score against the task's other "
        "references, so an answer that ignores its question scores 0 however common its words. ± is one standard error "
        "over the questions of a task. chrF is sacrebleu's (character 6-grams); exact match uses SQuAD normalisation "
        "(lower case, no punctuation or articles); `contains` credits an answer that includes the reference anywhere "
        "(lenient towards the verbose base model). Token F1 and ROUGE-L (rouge-score, stemmed) are in the JSON.",
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
