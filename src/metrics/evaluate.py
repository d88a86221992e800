"""`loralab evaluate`: the base model and the fine-tuned one, side by side, on the held-out split.

- Answer perplexity: exp of the token-weighted mean negative log-likelihood of the reference
  answer tokens (including the end-of-turn token) given the prompt rendered with the tokenizer's
  own chat template: exp(sum of NLL over all answer tokens / number of answer tokens).
- Domain scores: greedy answers to the first `eval.generation_per_task` questions of each task,
  scored by the task's primary metric (metrics.text.PRIMARY_METRIC: exact match or chrF) corrected
  for chance, so that a constant answer scores 0; one headline per primary metric (the mean over its
  tasks, in points), and their macro mean over all tasks (`domain_accuracy`) as the ranking key.
- Before/after answers to a fixed set of prompts (the first `eval.showcase_per_task` per task).

The adapter is loaded with plain `PeftModel.from_pretrained`, and the base model's numbers come
from the same object with the adapter disabled, so the base model is loaded once.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch

from loralab.config import Config
from loralab.data.chat import collate, encode_chat, ensure_chat_template, left_pad, prompt_ids
from loralab.data.prepare import load_split
from loralab.metrics.losses import answer_token_nll
from loralab.metrics.text import above_chance, primary_metric, score_all
from loralab.model_utils import autocast, is_full_model_dir, load_adapter, load_base_model, resolve_autocast_dtype, resolve_device
from loralab.util import atomic_io, provenance
from loralab.util.cpu import cpu_profile
from loralab.util.errors import LoralabError


@torch.no_grad()
def answer_perplexity(model, tokenizer, rows: list[dict], batch_size: int, max_length: int, device, amp_dtype) -> dict:
    """Token-weighted answer perplexity, overall and per task."""
    model.eval()
    encoded = [(row["task"], encode_chat(tokenizer, row["messages"], max_length)) for row in rows]
    encoded = [(task, e) for task, e in encoded if e is not None]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][1].input_ids))
    nll_sum: dict[str, float] = defaultdict(float)
    tokens: dict[str, int] = defaultdict(int)
    for start in range(0, len(order), batch_size):
        chunk = [encoded[i] for i in order[start : start + batch_size]]
        batch = {k: v.to(device) for k, v in collate([e for _, e in chunk], tokenizer.pad_token_id).items()}
        with autocast(device, amp_dtype):
            nll, rows_of_tokens = answer_token_nll(model, batch)
        per_row = torch.zeros(len(chunk), dtype=torch.float64).index_add_(0, rows_of_tokens.cpu(), nll.double().cpu())
        for (task, example), value in zip(chunk, per_row.tolist()):
            nll_sum[task] += value
            tokens[task] += example.n_label_tokens
    total_nll, total_tokens = sum(nll_sum.values()), sum(tokens.values())
    if not total_tokens:
        raise LoralabError(f"no evaluation example fits in train.max_length={max_length}")
    return {
        "examples_scored": len(encoded),
        "perplexity": math.exp(total_nll / total_tokens),
        "answer_tokens": total_tokens,
        "per_task_ppl": {task: math.exp(nll_sum[task] / tokens[task]) for task in sorted(tokens)},
    }


@torch.no_grad()
def generate_answers(
    model, tokenizer, rows: list[dict], batch_size: int, max_new_tokens: int, device, amp_dtype, desc: str
) -> list[str]:
    """Greedy, batched (left-padded, longest prompts together), KV-cached answers."""
    from tqdm.auto import tqdm

    model.eval()
    prompts = [prompt_ids(tokenizer, row["messages"]) for row in rows]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", dynamic_ncols=True):
        indices = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in left_pad([prompts[i] for i in indices], tokenizer.pad_token_id).items()}
        with autocast(device, amp_dtype):
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        width = batch["input_ids"].shape[1]
        for i, sequence in zip(indices, output[:, width:]):
            answers[i] = tokenizer.decode(sequence, skip_special_tokens=True).strip()
    return answers


def generation_subset(rows: list[dict], per_task: int) -> list[dict]:
    """The first `per_task` rows (or samples) of each task, in order (splits are stored shuffled)."""
    taken: dict[str, int] = defaultdict(int)
    subset = []
    for row in rows:
        if taken[row["task"]] < per_task:
            taken[row["task"]] += 1
            subset.append(row)
    return subset


def score_answers(rows: list[dict], answers: list[str]) -> dict:
    """Per task: every metric's raw mean, and the task's primary metric above chance (metrics.text.
    above_chance: 0 for any answer that ignores its question) with its standard error (std of the
    per-question scores / sqrt(n)). Headlines, in points: the mean over the tasks of each primary
    metric (exact-match tasks apart from chrF tasks, never one average of both), and `domain_accuracy`,
    the macro mean of every task's corrected primary score, which tune and compare rank by."""
    by_task: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for row, answer in zip(rows, answers):
        by_task[row["task"]].append((answer, row["answer"]))
    per_task = {}
    for task, pairs in sorted(by_task.items()):
        scores = [score_all(a, r) for a, r in pairs]
        means = {name: sum(s[name] for s in scores) / len(scores) for name in scores[0]}
        metric = primary_metric(task, [r for _, r in pairs])
        values = above_chance(metric, [a for a, _ in pairs], [r for _, r in pairs])
        se = float(values.std(ddof=1)) / math.sqrt(len(values)) if len(values) > 1 else 0.0
        per_task[task] = {"n": len(pairs), "primary_metric": metric, "primary": float(values.mean()), "primary_se": se,
                          "primary_raw": means[metric], **means}
    by_metric: dict[str, list[str]] = defaultdict(list)
    for task, row in per_task.items():
        by_metric[row["primary_metric"]].append(task)
    k = len(per_task)
    return {
        "domain_accuracy": 100 * sum(v["primary"] for v in per_task.values()) / k,
        "domain_accuracy_se": 100 * math.sqrt(sum(v["primary_se"] ** 2 for v in per_task.values())) / k,
        "by_metric": {metric: {"tasks": tasks, "score": 100 * sum(per_task[t]["primary"] for t in tasks) / len(tasks)}
                      for metric, tasks in sorted(by_metric.items())},
        "per_task": per_task,
    }


def headline(scores: dict) -> str:
    """One line of the per-metric headlines, e.g. "exact_match above chance 12.5 (4 tasks), chrf ..."."""
    return ", ".join(f"{metric} above chance {group['score']:.1f} ({len(group['tasks'])} tasks)"
                     for metric, group in scores["by_metric"].items())


def _load_base(cfg: Config):
    """The base model with a chat template, the device, and the autocast dtype it is evaluated in."""
    device = resolve_device(cfg.model.device)
    loaded = load_base_model(cfg.model, device)
    ensure_chat_template(loaded.tokenizer)
    return loaded, device, resolve_autocast_dtype(cfg.model.precision, device)


def _as_model(name: str, model, base_model, full_model: bool):
    """(the model to run, the context to run it in) for "base" or "fine_tuned": with a whole tuned
    model (lora.method=full) the base is its own object; otherwise one object serves both, the base
    numbers coming from it with the adapter disabled."""
    if full_model:
        return (base_model if name == "base" else model), nullcontext()
    return model, model.disable_adapter() if name == "base" else nullcontext()


def evaluate_adapter(cfg: Config, adapter_dir: str | Path, split: str, generation_per_task: int) -> dict:
    """Answer perplexity and domain score of base+adapter alone on `split` (sweeps use "eval",
    so the test split stays untouched until the final comparison)."""
    rows = load_split(cfg.data.out_dir, split)
    if not rows:
        raise LoralabError(f"{cfg.data.out_dir}/{split}_split.json is empty")
    loaded, device, amp_dtype = _load_base(cfg)
    model = load_adapter(loaded.model, adapter_dir)
    return measure_quality(cfg, model, loaded.tokenizer, rows, generation_per_task, device, amp_dtype)


def measure_quality(cfg: Config, model, tokenizer, rows: list[dict], generation_per_task: int, device, amp_dtype) -> dict:
    """Answer perplexity over `rows` and domain score over the first `generation_per_task` per task."""
    gen_rows = generation_subset(rows, generation_per_task)
    ppl = answer_perplexity(model, tokenizer, rows, cfg.eval.batch_size, cfg.train.max_length, device, amp_dtype)
    answers = generate_answers(model, tokenizer, gen_rows, cfg.eval.batch_size, cfg.eval.max_new_tokens, device, amp_dtype,
                               desc="generate")
    return {**ppl, **score_answers(gen_rows, answers), "generation_examples": len(gen_rows)}


def with_examples(rows: list[dict], train_rows: list[dict], k: int) -> list[dict]:
    """Each row's conversation preceded by the first k training conversations of its task (few-shot
    as chat turns, which an instruction-tuned model reads as its own earlier answers)."""
    shots: dict[str, list[dict]] = defaultdict(list)
    for example in train_rows:
        if len(shots[example["task"]]) < k:
            shots[example["task"]].append(example)
    return [{**row, "messages": [m for ex in shots[row["task"]] for m in ex["messages"]] + row["messages"]}
            for row in rows]


def few_shot_answers(model, tokenizer, cfg: Config, gen_rows: list[dict], device, amp_dtype) -> dict | None:
    """The few-shot baseline: k chosen on the eval split (highest macro primary score, ties to the
    smaller k), then the base model's answers to `gen_rows` with that many examples. None without an
    eval split to choose k on (data.eval_fraction=0): k is never chosen on the questions it is scored on."""
    train_rows, eval_rows = load_split(cfg.data.out_dir, "train"), load_split(cfg.data.out_dir, "eval")
    choice_rows = generation_subset(eval_rows, cfg.eval.few_shot_eval_per_task)
    if not choice_rows:
        print("few-shot baseline skipped: no eval split to choose k on", file=sys.stderr)
        return None
    args = (cfg.eval.batch_size, cfg.eval.max_new_tokens, device, amp_dtype)
    eval_scores = {}
    for k in cfg.eval.few_shot_ks:
        answers = generate_answers(model, tokenizer, with_examples(choice_rows, train_rows, k), *args,
                                   desc=f"few-shot k={k} (eval split)")
        eval_scores[k] = score_answers(choice_rows, answers)["domain_accuracy"]
    k = max(eval_scores, key=lambda n: (eval_scores[n], -n))
    answers = generate_answers(model, tokenizer, with_examples(gen_rows, train_rows, k), *args,
                               desc=f"few-shot k={k} ({cfg.eval.split} split)")
    return {"k": k, "eval_domain_accuracy_by_k": {str(n): v for n, v in eval_scores.items()},
            "eval_questions": len(choice_rows), "answers": answers}


def evaluate_model_pair(cfg: Config, adapter_dir: str | Path | None = None, quiet: bool = False) -> dict:
    """Evaluate base and base+adapter on `cfg.eval.split`; write JSON, Markdown report and plots."""
    adapter_dir = Path(adapter_dir or cfg.train.output_dir)
    if cfg.eval.generation_per_task < 1:
        raise LoralabError("eval.generation_per_task must be at least 1")
    rows = load_split(cfg.data.out_dir, cfg.eval.split)
    if not rows:
        raise LoralabError(f"{cfg.data.out_dir}/{cfg.eval.split}_split.json is empty")
    loaded, device, amp_dtype = _load_base(cfg)
    tokenizer = loaded.tokenizer
    model = load_adapter(loaded.model, adapter_dir)
    full_model = is_full_model_dir(adapter_dir)
    gen_rows = generation_subset(rows, cfg.eval.generation_per_task)

    results: dict = {"split": cfg.eval.split, "examples": len(rows), "generation_examples": len(gen_rows),
                     "adapter_dir": str(adapter_dir), "base_model": loaded.base_name, "models": {}}
    answers: dict[str, list[str]] = {}
    for name in ("base", "fine_tuned"):
        started = time.perf_counter()
        current, context = _as_model(name, model, loaded.model, full_model)
        with context:
            ppl = answer_perplexity(current, tokenizer, rows, cfg.eval.batch_size, cfg.train.max_length, device, amp_dtype)
            answers[name] = generate_answers(
                current,
                tokenizer,
                gen_rows,
                cfg.eval.batch_size,
                cfg.eval.max_new_tokens,
                device,
                amp_dtype,
                desc=f"generate ({name})",
            )
        results["models"][name] = {
            **ppl,
            **score_answers(gen_rows, answers[name]),
            "seconds": round(time.perf_counter() - started, 1),
        }
        if not quiet:
            m = results["models"][name]
            print(f"{name}: answer perplexity {m['perplexity']:.2f}, {headline(m)}", flush=True)

    few_shot = None
    if cfg.eval.few_shot_ks:  # the base model again, shown training examples
        current, context = _as_model("base", model, loaded.model, full_model)
        with context:
            few_shot = few_shot_answers(current, tokenizer, cfg, gen_rows, device, amp_dtype)
    base, tuned = results["models"]["base"], results["models"]["fine_tuned"]
    results["summary"] = {
        "perplexity_ratio_base_over_tuned": base["perplexity"] / tuned["perplexity"],
        "domain_accuracy_gain_points": tuned["domain_accuracy"] - base["domain_accuracy"],
    }
    results["samples"] = [
        {"task": row["task"], "question": row["question"], "reference": row["answer"],
         "base": answers["base"][i], "fine_tuned": answers["fine_tuned"][i],
         **({"few_shot_base": few_shot["answers"][i]} if few_shot else {})}
        for i, row in enumerate(gen_rows)
    ]
    if few_shot:
        results["few_shot"] = {key: value for key, value in few_shot.items() if key != "answers"}
    results["showcase"] = generation_subset(results["samples"], cfg.eval.showcase_per_task)
    recall = recall_samples(cfg, lambda name: _as_model(name, model, loaded.model, full_model), tokenizer, device,
                            amp_dtype)
    if recall:
        results["recall"] = {"questions": len(recall), "samples": recall}
    return _write_with_baselines(results, cfg)


def recall_rows(train_rows: list[dict], per_task: int) -> list[dict]:
    """The recall test's questions: the first `per_task` training rows of each task that have a
    second phrasing (the facts were trained on; the paraphrase never was)."""
    return generation_subset([row for row in train_rows if row.get("paraphrase")], per_task)


def as_paraphrased(rows: list[dict]) -> list[dict]:
    """Each row asked in its second phrasing: the last user turn replaced by the paraphrase."""
    asked = []
    for row in rows:
        messages = [dict(m) for m in row["messages"]]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last_user]["content"] = row["paraphrase"]
        asked.append({**row, "question": row["paraphrase"], "messages": messages})
    return asked


def recall_answers(model, tokenizer, rows: list[dict], batch_size: int, max_new_tokens: int, device, amp_dtype,
                   who: str = "") -> dict[str, list[str]]:
    """Greedy answers to `rows` asked as in training and in their second phrasing: {"as_trained", "paraphrased"}."""
    return {phrasing: generate_answers(model, tokenizer, asked, batch_size, max_new_tokens, device, amp_dtype,
                                       desc=f"recall, {phrasing.replace('_', ' ')}{who}")
            for phrasing, asked in (("as_trained", rows), ("paraphrased", as_paraphrased(rows)))}


def recall_samples(cfg: Config, model_for, tokenizer, device, amp_dtype) -> list[dict]:
    """Base and fine-tuned answers to training facts asked as in training and in new words (`model_for(name)`:
    the model and the context that makes it the base or the fine-tuned one). [] without paraphrases."""
    rows = recall_rows(load_split(cfg.data.out_dir, "train"), cfg.eval.recall_per_task) if cfg.eval.recall_per_task else []
    if not rows:
        return []
    args = (cfg.eval.batch_size, cfg.eval.max_new_tokens, device, amp_dtype)
    answers: dict[str, list[str]] = {}
    for name in ("base", "fine_tuned"):
        current, context = model_for(name)
        with context:
            given = recall_answers(current, tokenizer, rows, *args, who=f" ({name})")
        answers[f"{name}_as_trained"], answers[name] = given["as_trained"], given["paraphrased"]
    return [{"task": row["task"], "question": row["question"], "paraphrase": row["paraphrase"],
             "reference": row["answer"], **{key: values[i] for key, values in answers.items()}}
            for i, row in enumerate(rows)]


def _write_with_baselines(results: dict, cfg: Config) -> dict:
    """Constant-answer baselines from the training split beside the scores, then the JSON and the report."""
    from loralab.metrics.baselines import compare_with_baselines
    from loralab.metrics.report import write_report

    train_rows = load_split(cfg.data.out_dir, "train")
    results["baselines"] = compare_with_baselines(results["samples"], train_rows)
    if "recall" in results:  # the same comparison for the training facts, in new words and as trained
        samples = results["recall"]["samples"]
        results["recall"]["paraphrased"] = compare_with_baselines(samples, train_rows)
        results["recall"]["as_trained"] = compare_with_baselines(
            [{**s, "base": s["base_as_trained"], "fine_tuned": s["fine_tuned_as_trained"]} for s in samples], train_rows)
    if "provenance" in results:  # a rescore: the answers keep the provenance of the run that generated them
        results.setdefault("provenance_history", []).append(results.pop("provenance"))
    results["provenance"] = provenance.record(cfg.to_dict())
    atomic_io.write_json(cfg.eval.results_json, results)
    write_report(results, cfg)
    return results


def add_few_shot(cfg: Config) -> dict:
    """`loralab evaluate --add-few-shot`: the few-shot baseline's answers, from the base model alone,
    added to the stored answers of eval.results_json (whose base and fine-tuned numbers stay), then
    everything scored again."""
    results = _stored_results(cfg)
    if not cfg.eval.few_shot_ks:
        raise LoralabError("eval.few_shot_ks is empty: nothing to add")
    rows = {(r["task"], r["question"]): r for r in load_split(cfg.data.out_dir, results["split"])}
    try:
        gen_rows = [rows[(s["task"], s["question"])] for s in results["samples"]]
    except KeyError as missing:
        raise LoralabError(f"{cfg.eval.results_json}: question {missing} is not in {cfg.data.out_dir}'s "
                           f"{results['split']} split; evaluate again on this data") from None
    loaded, device, amp_dtype = _load_base(cfg)
    few_shot = few_shot_answers(loaded.model, loaded.tokenizer, cfg, gen_rows, device, amp_dtype)
    if few_shot is None:
        raise LoralabError(f"{cfg.data.out_dir}/eval_split.json is empty: the few-shot baseline chooses k on it")
    for sample, answer in zip(results["samples"], few_shot.pop("answers")):
        sample["few_shot_base"] = answer
    # Generated later, maybe on another machine and precision than the stored answers: said in the file.
    results["few_shot"] = {**few_shot, "added_by": "loralab evaluate --add-few-shot", "machine": cpu_profile(),
                           "precision": str(amp_dtype) if amp_dtype else "fp32"}
    return _write_with_baselines(results, cfg)


def refresh_report(cfg: Config) -> bool:
    """The report written again from the stored results (after `--lm-eval` adds its section); False without them."""
    from loralab.metrics.report import write_report

    path = Path(cfg.eval.results_json)
    if not path.is_file():
        return False
    write_report(json.loads(path.read_text(encoding="utf-8")), cfg)
    return True


def _stored_results(cfg: Config) -> dict:
    path = Path(cfg.eval.results_json)
    if not path.is_file():
        raise LoralabError(f"{path}: not found; run `loralab evaluate` first")
    results = json.loads(path.read_text(encoding="utf-8"))
    if len(results.get("samples", [])) != results.get("generation_examples"):
        raise LoralabError(f"{path}: its samples are not every generated answer; run `loralab evaluate` again")
    return results


def rescore(cfg: Config) -> dict:
    """`loralab evaluate --rescore`: the stored answers of eval.results_json scored again with today's
    baselines and report, without loading a model (the answers are what the models generated)."""
    results = _stored_results(cfg)
    references = [{"task": s["task"], "answer": s["reference"]} for s in results["samples"]]
    for name, model in results["models"].items():
        for key in ("domain_accuracy", "domain_accuracy_se", "by_metric", "per_task"):
            model.pop(key, None)
        model.update(score_answers(references, [s[name] for s in results["samples"]]))
    base, tuned = results["models"]["base"], results["models"]["fine_tuned"]
    results["summary"]["domain_accuracy_gain_points"] = tuned["domain_accuracy"] - base["domain_accuracy"]
    if "few_shot" in results:  # its k was chosen on eval-split answers that were not stored
        results["few_shot"].setdefault("k_chosen_with", "the metrics of the evaluation that generated the answers, "
                                                        "not those of loralab evaluate --rescore")
    results["rescored"] = {"command": "loralab evaluate --rescore",
                           "what": "scores, baselines and report recomputed from the stored answers with today's "
                                   "metrics; the perplexities and answers are those of the evaluation that wrote "
                                   "this file"}
    return _write_with_baselines(results, cfg)

