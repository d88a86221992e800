"""Multi-domain adaptation: the built-in legal and shell datasets, the forgetting probe's scoring,
and `loralab domains` on a tiny random Llama (specialists, mixture, cross-evaluation matrix)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loralab.config import DataConfig
from loralab.data.builtin_domains import GENERAL_TOPICS, general_knowledge_questions, parse_cheatsheet
from loralab.data.prepare import prepare_dataset
from loralab.metrics.general_knowledge import continuation_logprobs, score_general_knowledge
from loralab.studies.domains import run_domains
from loralab.util.errors import LoralabError

from helpers.data import QA_ROWS, write_jsonl


def test_cheatsheet_blocks_become_questions():
    text = ("# To create a symlink:\nln -s target name\n\n# Symlink, overwriting existing files\nln -sf a b\n"
            "# To list\n# hidden files too:\nls -a\n\n# Only a note, no command\n\n"
            "# To run a script:\nl1\nl2\nl3\nl4\nl5\n")
    assert parse_cheatsheet("ln", text) == [
        ("How do I create a symlink with ln?", "ln -s target name"),
        ("ln: symlink, overwriting existing files. Which command?", "ln -sf a b"),
        ("How do I list hidden files too with ln?", "ls -a"),
    ]  # the note without a command and the 5-line script are skipped


def test_builtin_legal_and_shell_datasets(tmp_path):
    shell = prepare_dataset(DataConfig(dataset="builtin:shell", out_dir=str(tmp_path / "shell")))
    assert shell["processed_records"] > 1000 and set(shell["tasks"]["test"]) == {"shell_command"}
    rows = json.loads((tmp_path / "shell" / "processed_dataset.json").read_text())
    assert {"question": "How do I create a symlink with ln?", "answer": "ln -s path/to/the/target/directory name-of-symlink"} in [
        {"question": r["question"], "answer": r["answer"]} for r in rows]
    legal = prepare_dataset(DataConfig(dataset="builtin:legal", out_dir=str(tmp_path / "legal")))
    assert legal["processed_records"] > 400 and legal["sources_and_licenses"] == {"CC-BY-4.0": legal["processed_records"]}
    with pytest.raises(LoralabError, match="unknown built-in dataset.*builtin:legal"):
        prepare_dataset(DataConfig(dataset="builtin:poetry", out_dir=str(tmp_path / "x")))


def test_general_knowledge_questions_stay_outside_the_domains():
    questions = general_knowledge_questions(60, seed=0)
    assert len(questions) == 60 and {q["topic"] for q in questions} <= set(GENERAL_TOPICS)
    assert all(len(q["choices"]) == 4 and 0 <= q["correct"] < 4 for q in questions)
    assert questions == general_knowledge_questions(60, seed=0) != general_knowledge_questions(60, seed=1)


def test_batched_continuation_scores_equal_one_at_a_time(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    pairs = [("Question: what is 2+2?\nAnswer:", " four"), ("Question: name a long river in Africa\nAnswer:", " The Nile"),
             ("Q:", " a much longer continuation than the others, to force padding in the batch")]
    batched = continuation_logprobs(model, tokenizer, pairs, batch_size=3, device=torch.device("cpu"), amp_dtype=None)
    for (context, continuation), got in zip(pairs, batched):
        ids = tokenizer(context + continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
        n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        token_lp = logprobs.gather(-1, ids[0, 1:, None])[:, 0]
        assert got["text_tokens"] == ids.shape[1] - 1
        assert got["text_logprob"] == pytest.approx(float(token_lp.sum()), abs=1e-4)
        assert got["continuation_logprob"] == pytest.approx(float(token_lp[n_context - 1 :].sum()), abs=1e-4)
    # a question whose right answer is by far the likeliest continuation is scored correct
    question = {"question": "what is 2+2?", "choices": ["x", "y", "z", "w"], "correct": 0}
    result = score_general_knowledge(model, tokenizer, [question], 4, torch.device("cpu"), None)
    chosen = max(range(4), key=lambda c: continuation_logprobs(
        model, tokenizer, [("Question: what is 2+2?\nAnswer:", f" {question['choices'][c]}")], 1, torch.device("cpu"), None
    )[0]["continuation_logprob"])
    assert result["mc_accuracy"] == (100.0 if chosen == 0 else 0.0) and result["text_perplexity"] > 1


def _two_domain_config(cfg, tmp_path: Path):
    first = [dict(r, task="codes") for r in QA_ROWS[:20]]
    second = [{"question": f"How do I list directory number {i}?", "answer": f"ls /dir{i} -la", "task": "shell_like"}
              for i in range(20)]
    dc = cfg.domains
    dc.datasets = {"codes": str(write_jsonl(tmp_path / "codes.jsonl", first)),
                   "cmds": str(write_jsonl(tmp_path / "cmds.jsonl", second))}
    cfg.data.task_field = "task"
    dc.train_examples, dc.eval_examples, dc.generation_per_task, dc.general_questions = 8, 4, 1, 6
    dc.runs_dir = str(tmp_path / "runs")
    dc.results_dir = str(tmp_path / "results")
    cfg.train.batch_size = 4
    return cfg


def _check_the_tracked_cross_evaluation(cfg, matrix: dict) -> None:
    """With MLflow in train.report_to, the study's parent run holds the matrix and the result files."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cfg.train.mlflow_tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.train.experiment_name).experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("loralab.study") == "domains/runs"]
    children = sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    assert children == ["cmds", "codes", "mixture"]
    assert parent.data.metrics["codes/cmds/perplexity"] == pytest.approx(matrix["codes"]["cmds"]["perplexity"])
    assert parent.data.metrics["base/general/mc_accuracy"] == pytest.approx(matrix["base"]["general"]["mc_accuracy"])
    assert {"domain_transfer.json", "domain_transfer.md", "cross_evaluation.png"} <= {
        f.path for f in client.list_artifacts(parent.info.run_id)}


def test_domains_trains_specialists_and_a_mixture_and_cross_evaluates(tiny_config, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    cfg = _two_domain_config(tiny_config, tmp_path)
    cfg.train.report_to, cfg.train.mlflow_tracking_uri = ["mlflow"], f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_domains(cfg)
    matrix = summary["matrix"]
    assert list(matrix) == ["base", "codes", "cmds", "mixture"]
    assert all(set(row) == {"codes", "cmds", "general"} for row in matrix.values())
    subsets = Path(cfg.domains.runs_dir) / "subsets"
    ids = {name: {r["id"] for r in json.loads((subsets / name / "train_split.json").read_text())}
           for name in ("codes", "cmds", "mixture")}
    assert len(ids["codes"]) == len(ids["cmds"]) == 8 and ids["mixture"] == ids["codes"] | ids["cmds"]
    assert summary["training"]["mixture"]["steps"] == 2 * summary["training"]["codes"]["steps"]
    # each adapter really changes the model: its own domain's perplexity moves away from the base's
    for name in ("codes", "cmds"):
        assert matrix[name][name]["perplexity"] != pytest.approx(matrix["base"][name]["perplexity"], rel=1e-4)
    assert matrix["codes"]["general"]["text_perplexity"] != pytest.approx(matrix["base"]["general"]["text_perplexity"], rel=1e-6)
    text = Path(cfg.domains.summary_md).read_text()
    assert "| mixture |" in text and "Forgetting" in text
    assert (Path(cfg.domains.plots_dir) / "cross_evaluation.png").stat().st_size > 10_000

    _check_the_tracked_cross_evaluation(cfg, matrix)

    cells = Path(cfg.domains.runs_dir) / "cells.json"
    stamp = cells.stat().st_mtime_ns
    again = run_domains(cfg)  # adapters and cells are reused, not recomputed
    assert cells.stat().st_mtime_ns == stamp and again["matrix"] == matrix


def test_domains_refuses_bad_settings_before_training(tiny_config, tmp_path):
    cfg = _two_domain_config(tiny_config, tmp_path)
    cfg.domains.datasets = {"only": cfg.domains.datasets["codes"]}
    with pytest.raises(LoralabError, match="at least two domains"):
        run_domains(cfg)
    cfg.domains.datasets = {"mixture": "builtin:legal", "codes": "builtin:shell"}
    with pytest.raises(LoralabError, match="reserved|rename"):
        run_domains(cfg)
    assert not Path(cfg.domains.runs_dir).exists()
