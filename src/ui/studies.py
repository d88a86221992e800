"""Studies found under the project (compare, tune, sweep, domains, prune, export results) and the
table and chart the page draws for each, read from the same JSON files the Markdown reports are
written from. The row marked best is the one chosen on the eval split (lowest eval loss), never
on test numbers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loralab.config import Config
from loralab.ui.paths import Project
from loralab.ui.runs import walk

Table = dict[str, Any]  # {"columns": [...], "rows": [[...]], "best": index | None}
Chart = dict[str, Any]  # {"title", "labels", "series": [{"name", "values", "errors"}]}


def _file_names() -> dict[str, tuple[str, str]]:
    """kind -> (results JSON name, report name), from the config that names them (one definition)."""
    c = Config()
    pairs = {"compare": (c.compare.results_json, c.compare.summary_md), "tune": (c.tune.results_json, c.tune.summary_md),
             "sweep": (c.sweep.results_json, c.sweep.summary_md), "domains": (c.domains.results_json, c.domains.summary_md),
             "prune": (c.prune.results_json, c.prune.summary_md), "export": (c.export.report_json, c.export.report_md)}
    return {kind: (Path(js).name, Path(md).name) for kind, (js, md) in pairs.items()}


FILES = _file_names()
KIND_OF = {json_name: kind for kind, (json_name, _) in FILES.items()}


def find_studies(project: Project) -> dict[str, tuple[str, Path]]:
    """study id (the project-relative results file) -> (kind, path)."""
    found = {}
    for folder, files in walk(project):
        for name in files:
            if name in KIND_OF:
                path = folder / name
                found[project.relative(path)] = (KIND_OF[name], path)
    return found


def report_path(kind: str, results: Path) -> Path:
    return results.parent / FILES[kind][1]


def _argmin(values: list[float | None]) -> int | None:
    scored = [(v, i) for i, v in enumerate(values) if v is not None]
    return min(scored)[1] if scored else None


def _compare(data: dict) -> tuple[Table, Chart]:
    methods = data.get("methods", {})
    columns = ["method", "learning rate", "seeds", "eval loss", "± sd", "test perplexity", "± sd",
               "domain score (above chance)", "± sd", "tokens/s", "trainable params"]
    rows, eval_losses = [], []
    for name, m in methods.items():
        rows.append([name, m.get("learning_rate"), len(m.get("runs", [])), m.get("eval_loss"), m.get("eval_loss_sd"),
                     m.get("test_perplexity"), m.get("test_perplexity_sd"), m.get("domain_accuracy"),
                     m.get("domain_accuracy_sd"), m.get("tokens_per_s"), m.get("trainable_parameters")])
        eval_losses.append(m.get("eval_loss"))
    chart = {"title": "eval loss after the same examples (mean ± sd over seeds)", "labels": list(methods),
             "series": [{"name": "eval loss", "values": eval_losses,
                         "errors": [m.get("eval_loss_sd") for m in methods.values()]}]}
    return {"columns": columns, "rows": rows, "best": _argmin(eval_losses)}, chart


def _tune(data: dict) -> tuple[Table, Chart]:
    trials = data.get("trials", [])
    params = list(data.get("space", {}))
    columns = ["trial", "state", *params, "eval loss", "tokens/s"]
    rows = [[t.get("number"), t.get("state"), *(t.get("params", {}).get(p) for p in params), t.get("eval_loss"),
             t.get("tokens_per_s")] for t in trials]
    best_number = (data.get("best") or {}).get("number")
    best = next((i for i, t in enumerate(trials) if t.get("number") == best_number), None)
    complete = [t for t in trials if t.get("eval_loss") is not None]
    chart = {"title": "eval loss per trial", "labels": [f"#{t.get('number')}" for t in complete],
             "series": [{"name": "eval loss", "values": [t["eval_loss"] for t in complete]}]}
    return {"columns": columns, "rows": rows, "best": best}, chart


def _sweep(data: dict) -> tuple[Table, Chart]:
    points = data.get("points", [])
    labels = [", ".join(f"{k}={v}" for k, v in p.get("params", {}).items()) or "center" for p in points]
    columns = ["point", "eval loss", "eval perplexity", "domain score (above chance)", "tokens/s", "trainable params"]
    rows = [[label, p.get("eval_loss"), p.get("eval_perplexity"), p.get("domain_accuracy"), p.get("tokens_per_s"),
             p.get("trainable_parameters")] for label, p in zip(labels, points)]
    losses = [p.get("eval_loss") for p in points]
    chart = {"title": "eval loss, one factor moved at a time", "labels": labels,
             "series": [{"name": "eval loss", "values": losses}]}
    return {"columns": columns, "rows": rows, "best": _argmin(losses)}, chart


def _domains(data: dict) -> tuple[Table, Chart]:
    matrix = data.get("matrix", {})
    domains = list(data.get("domains", {}))
    columns = ["model", *(f"{d} score" for d in domains), *(f"{d} perplexity" for d in domains),
               "general MC accuracy %", "general text perplexity"]
    rows = []
    for model, scores in matrix.items():
        general = scores.get("general", {})
        rows.append([model, *(scores.get(d, {}).get("domain_accuracy") for d in domains),
                     *(scores.get(d, {}).get("perplexity") for d in domains),
                     general.get("mc_accuracy"), general.get("text_perplexity")])
    chart = {"title": "domain score (points above chance) of each model on each domain (± standard error)",
             "labels": list(matrix),
             "series": [{"name": d, "values": [s.get(d, {}).get("domain_accuracy") for s in matrix.values()],
                         "errors": [s.get(d, {}).get("domain_accuracy_se") for s in matrix.values()]} for d in domains]}
    return {"columns": columns, "rows": rows, "best": None}, chart


def _points(data: dict) -> tuple[Table | None, Chart | None]:
    """prune and export: their Markdown report says it all; no table of their own."""
    return None, None


TABLES: dict[str, Callable[[dict], tuple[Table | None, Chart | None]]] = {
    "compare": _compare, "tune": _tune, "sweep": _sweep, "domains": _domains, "prune": _points, "export": _points,
}


def study_view(kind: str, path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    table, chart = TABLES[kind](data)
    return {"table": table, "chart": chart}
