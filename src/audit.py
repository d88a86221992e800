"""`loralab provenance`: every committed result, the commit that wrote it, and whether it is stale.

A result is stale when a commit after the one that produced it changed the code it depends on (a change
to comments, docstrings or layout alone does not count), when it was produced from a checkout with
uncommitted code, when it says so itself (a top-level "stale" note), or when it carries no provenance
block at all (written before results recorded one). One record per kind of result (PEFT's
one-record-per-variant style): where it lives, the command that regenerates it, and the code it
depends on, as git pathspecs.
"""

from __future__ import annotations

import ast
import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path

from loralab.util import atomic_io
from loralab.util.errors import LoralabError
from loralab.util.provenance import git_output, repo_root

# Code every trained result depends on: data, model loading, adapters, the training loop, the config.
# Experiment tracking is left out: it sends a run's numbers to TensorBoard/MLflow and never changes them
# (train.report_to is not part of a run's identity), and the committed results were written untracked.
TRAINING = ("src/config.py", "src/model_utils.py", "src/data", "src/adapters", "src/training", "src/presets",
            ":(exclude)src/training/tracking.py")
EVALUATION = ("src/metrics",)
# The study machinery every study shares; each study also depends on its own module (below).
STUDY_CORE = ("src/studies/runner.py", "src/studies/space.py", "src/studies/records.py", "src/studies/writer.py",
              "src/studies/cells.py")
RESULT_ROOTS = ("experiments", "benchmarks/results", "lora")
LIST_MD = "experiments/provenance.md"  # `loralab provenance --write`: the list, for docs/provenance.md to quote


@dataclass(frozen=True)
class ResultKind:
    pattern: str  # fnmatch over the repository-relative path
    command: str  # what regenerates it
    depends_on: tuple[str, ...]  # git pathspecs of the code its numbers come from


RUN = (*TRAINING, *EVALUATION, "src/pipeline.py")
KINDS = (
    ResultKind("experiments/eval_results.json", "make run", RUN),
    ResultKind("experiments/run_summary.json", "make run", RUN),
    ResultKind("lora/training_args.json", "make run", TRAINING),
    ResultKind("experiments/best/*.json",
               "loralab run --config experiments/best_config.yaml --config configs/retrain_best.yaml",
               (*RUN, "configs/retrain_best.yaml")),
    ResultKind("experiments/best/lora/training_args.json",
               "loralab run --config experiments/best_config.yaml --config configs/retrain_best.yaml",
               (*TRAINING, "configs/retrain_best.yaml")),
    ResultKind("experiments/metrics_comparison.json", "loralab tune",
               (*TRAINING, *STUDY_CORE, "src/studies/tune.py", "src/studies/tune_report.py", "src/studies/optuna_storage.py")),
    ResultKind("experiments/sensitivity.json", "loralab sweep --config experiments/best_config.yaml",
               (*TRAINING, *EVALUATION, *STUDY_CORE, "src/studies/sweep.py")),
    ResultKind("experiments/method_comparison.json", "loralab compare",
               (*TRAINING, *EVALUATION, *STUDY_CORE, "src/studies/compare.py")),
    ResultKind("experiments/compare_runs/*.json", "loralab compare",
               (*TRAINING, *EVALUATION, *STUDY_CORE, "src/studies/compare.py")),
    ResultKind("experiments/domain_transfer.json", "loralab domains",
               (*TRAINING, *EVALUATION, *STUDY_CORE, "src/studies/domains.py")),
    ResultKind("experiments/knowledge_injection.json", "loralab inject",
               (*TRAINING, *EVALUATION, *STUDY_CORE, "src/studies/inject.py")),
    ResultKind("experiments/pruning_study.json", "loralab prune --study", (*TRAINING, *EVALUATION, "src/prune")),
    ResultKind("experiments/prune_runs/*.json", "loralab prune --study", (*TRAINING, *EVALUATION, "src/prune")),
    ResultKind("experiments/export_report.json", "loralab export",
               (*TRAINING, *EVALUATION, "src/deploy", ":(exclude)src/deploy/serve")),
    ResultKind("experiments/lm_eval_results.json", "loralab evaluate --lm-eval mmlu_medical,domain_ppl",
               (*TRAINING, *EVALUATION)),
    ResultKind("benchmarks/results/train_throughput_*.json", "python benchmarks/train_throughput.py",
               (*TRAINING, "benchmarks/train_throughput.py")),
    ResultKind("benchmarks/results/inference_*.json", "make llama-cpp && python benchmarks/inference.py",
               (*TRAINING, "src/deploy", "benchmarks/inference.py")),
    ResultKind("benchmarks/results/memory_breakdown.json", "python benchmarks/memory_breakdown.py",
               (*TRAINING, "benchmarks/memory_breakdown.py")),
    ResultKind("benchmarks/results/compile_probe_*.json", "python benchmarks/compile_probe.py",
               (*TRAINING, "benchmarks/compile_probe.py")),
    ResultKind("benchmarks/results/make_run_*.json", "time make run on a fresh clone (timings recorded by hand)", RUN),
)


@dataclass
class ResultStatus:
    path: str
    kind: ResultKind | None
    commit: str | None
    written_at: str | None
    problems: list[str]

    @property
    def stale(self) -> bool:
        return bool(self.problems)


def kind_of(path: str) -> ResultKind | None:
    return next((k for k in KINDS if fnmatch.fnmatch(path, k.pattern)), None)


def _git(root: Path, *args: str) -> str:
    """util.provenance's git runner, where a failure is an error (an audit cannot go on without git)."""
    out = git_output(root, *args)
    if out is None:
        raise LoralabError(f"git {' '.join(args[:2])} failed in {root}; run `loralab provenance` in a git checkout")
    return out


def committed_results(root: Path) -> list[str]:
    """Every committed JSON file under the result folders (Markdown, plots and logs are written beside them)."""
    listed = _git(root, "ls-files", "--", *RESULT_ROOTS).splitlines()
    return sorted(p for p in listed if p.endswith(".json") and "/stale/" not in p and not p.endswith("adapter_config.json"))


def later_changes(root: Path, commit: str, depends_on: tuple[str, ...]) -> list[str]:
    """The files of `depends_on` that commits after `commit` changed, up to HEAD, leaving out Python files
    whose change touched only comments, docstrings or layout (their code, and so every number, is the same)."""
    changed = _git(root, "diff", "--name-only", f"{commit}..HEAD", "--", *depends_on).split()
    return [path for path in changed if not _same_code(root, commit, path)]


def _same_code(root: Path, commit: str, path: str) -> bool:
    """Whether `path` parses to the same syntax tree, docstrings left out, at `commit` and at HEAD."""
    if not path.endswith(".py"):
        return False
    before, after = git_output(root, "show", f"{commit}:{path}"), git_output(root, "show", f"HEAD:{path}")
    if before is None or after is None:  # added or deleted
        return False
    try:
        return _code_only(before) == _code_only(after)
    except SyntaxError:
        return False


def _code_only(source: str) -> str:
    """The syntax tree of `source` without docstrings; comments and layout never reach the tree."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def check(root: Path, path: str) -> ResultStatus:
    data = json.loads((root / path).read_text(encoding="utf-8"))
    kind = kind_of(path)
    block = data.get("provenance") if isinstance(data, dict) else None
    status = ResultStatus(path, kind, None, None, [])
    if isinstance(data, dict) and data.get("stale"):
        status.problems.append(f"marked stale in the file: {str(data['stale'])[:120]}")
    if not block:
        status.problems.append("no provenance block (written before results recorded one)")
        return status
    status.commit, status.written_at = block.get("commit"), block.get("written_at")
    if not status.commit:
        status.problems.append("written outside a git checkout")
    elif git_output(root, "cat-file", "-e", f"{status.commit}^{{commit}}") is not None:
        changed = later_changes(root, status.commit, kind.depends_on) if kind else []
        if changed:
            status.problems.append(f"code changed since: {', '.join(changed[:4])}" + (" ..." if len(changed) > 4 else ""))
    else:
        status.problems.append(f"commit {status.commit[:10]} is not in this clone's history")
    if block.get("dirty"):
        status.problems.append(f"written from uncommitted code: {', '.join(block.get('dirty_paths', [])[:4])}")
    if "rescored" in data:  # scores recomputed from stored answers: the answers' own code counts too
        history = data.get("provenance_history") or []
        if not history:
            status.problems.append("rescored answers that were generated before results recorded provenance")
        elif kind and history[0].get("commit") and later_changes(root, history[0]["commit"], kind.depends_on):
            status.problems.append(f"its answers were generated by {history[0]['commit'][:10]}, before later code changes")
    if kind is None:
        status.problems.append("no record in loralab.audit.KINDS says what code it depends on")
    return status


def audit(root: Path | None = None) -> list[ResultStatus]:
    root = root or repo_root()
    if root is None:
        raise LoralabError("loralab provenance: not in a git checkout; run it in the clone whose results you want checked")
    return [check(root, path) for path in committed_results(root)]


def _rows(statuses: list[ResultStatus]) -> list[tuple[str, str, str, str]]:
    """(result, commit, written, status) per line; a study's many run records that share commit and status
    make one line ("experiments/compare_runs/*.json (56 files)")."""
    groups: dict[tuple, list[ResultStatus]] = {}
    for s in statuses:
        grouped = s.kind is not None and s.kind.pattern.endswith("_runs/*.json")
        key = (s.kind.pattern, s.commit, tuple(s.problems)) if grouped else (s.path,)
        groups.setdefault(key, []).append(s)
    rows = []
    for key, members in groups.items():
        s = members[0]
        name = f"{key[0]} ({len(members)} files)" if len(key) > 1 else s.path
        state = "ok" if not s.stale else "STALE: " + "; ".join(s.problems)
        rows.append((name, (s.commit or "-")[:10], (s.written_at or "-")[:10], state))
    return rows


def render(statuses: list[ResultStatus]) -> str:
    """The table `loralab provenance` prints: one line per result (per group of run records), then the counts."""
    rows = _rows(statuses)
    width = max((len(r[0]) for r in rows), default=10)
    lines = [f"{'result':<{width}}  {'commit':<10}  {'written':<10}  status"]
    lines += [f"{name:<{width}}  {commit:<10}  {written:<10}  {state}" for name, commit, written, state in rows]
    stale = [s for s in statuses if s.stale]
    lines.append(f"\n{len(statuses)} committed results, {len(stale)} stale.")
    commands = sorted({s.kind.command for s in stale if s.kind})
    if commands:
        lines.append("Regenerate them with: " + "; ".join(f"`{c}`" for c in commands))
    return "\n".join(lines)


def write_list(statuses: list[ResultStatus], root: Path | None = None) -> Path:
    """The list as Markdown in LIST_MD, headed by the commit it was made at; docs/provenance.md quotes it, and
    the suite checks the quote (tests/test_docs_quotes.py), so the docs show what the command printed."""
    root = root or repo_root()
    head = (git_output(root, "rev-parse", "--short=10", "HEAD") or "").strip() or "no commit"
    text = (f"# Committed results and their provenance\n\nWritten by `loralab provenance --write` at commit {head}; "
            "the results committed with this file are listed as the code of that commit judges them.\n\n"
            f"```\n{render(statuses)}\n```\n")
    path = root / LIST_MD
    atomic_io.write_text(path, text)
    return path
