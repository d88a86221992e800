"""`loralab <verb>`: one command line over the library functions.

    loralab prepare  [--dataset PATH] [--format F] [--question-field Q] [--answer-field A]
    loralab train    [--resume]
    loralab evaluate [--adapter DIR] [--rescore | --add-few-shot | --lm-eval TASKS [--lm-eval-limit N]]
    loralab run      [--quick] [--resume]       # prepare + train + evaluate + report
    loralab tune     [--quick] [--storage URL] [--study-name N] [--sampler S] [--n-trials K] [--timeout-minutes M]
                                                # Optuna search; experiments/metrics_comparison.json
    loralab sweep    [--quick]                  # one factor at a time; experiments/sensitivity.json
    loralab merge    [--adapter DIR] [--out DIR] # base + adapter as one plain HF model directory
    loralab export   [--adapter DIR] [--formats merged,gguf-q8_0,...] [--no-evaluate]
                                                # merged / GGUF / GGUF adapter + Modelfile, verified; experiments/export_report.md
    loralab serve    [--adapter NAME=DIR ...] [--merged DIR] [--engine auto|torch|llama.cpp|vllm] [--host H] [--port P]
                                                # OpenAI-compatible HTTP server, multi-LoRA, batched
    loralab compare  [--quick]                  # methods x seeds on the test split; experiments/method_comparison.md
    loralab domains  [--quick]                  # specialists + mixture, cross-evaluated; experiments/domain_transfer.md
    loralab inject   [--quick]                  # can an adapter learn its facts? experiments/knowledge_injection.md
    loralab prune    [--adapter DIR] [--method M] [--sparsity S] [--source merged|base] [--recover] [--study]
                                                # a pruned HF directory; --study: experiments/pruning_study.md
    loralab ui       [--host H] [--port P]      # local web dashboard (runs, launch, compare, playground, data)
    loralab analysis                            # experiments/optimization_analysis.md from the committed results
    loralab provenance [--check] [--write]      # committed results, their commits, the stale ones
    loralab config                              # print the resolved config as YAML

Every verb takes `--config FILE.yaml` and any number of `--set section.key=value`.

The verbs are data: `VERBS` holds one `Verb` record each (its help, its flags, the config field each
flag sets, and the function that runs it), so adding a verb is one edit. Each verb's function
imports its library module when it runs, so `loralab config` and `--help` never load torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib.resources import as_file
from typing import Any

import yaml

from loralab.config import QUICK_PRESET, Config, PruneMethod, PruneSource, ServeEngine, choices, load_config
from loralab.util.errors import LoralabError
from loralab.util.library_noise import quiet_library_noise

INTERRUPTED = 130  # the shell's code for Ctrl-C; also when training stopped early on a signal
BAD_INPUT = 2  # argparse's code for a bad command line, and ours for any LoralabError


@dataclass(frozen=True)
class Flag:
    """One option of a verb. `sets` names the config field (section.key) it overrides, if any; its
    value is taken literally (a path or a field name is never parsed as YAML: "2024-05-01" stays a
    string), after `convert`. A flag the user did not give is None and leaves the config alone."""

    names: tuple[str, ...]
    sets: str | None = None
    convert: Callable[[Any], Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # argparse's add_argument keywords


def flag(*names: str, sets: str | None = None, convert: Callable[[Any], Any] | None = None, **options: Any) -> Flag:
    return Flag(names, sets, convert, options)


@dataclass(frozen=True)
class Verb:
    name: str
    help: str
    run: Callable[[Config, argparse.Namespace], int]  # returns the exit code
    flags: tuple[Flag, ...] = ()


# --- what each verb does ----------------------------------------------------------------------------

def print_config(cfg: Config, args: argparse.Namespace) -> int:
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def run_prepare(cfg: Config, args: argparse.Namespace) -> int:
    from loralab.data.prepare import prepare_dataset

    card = prepare_dataset(cfg.data)
    print(f"wrote {cfg.data.out_dir}/: {card['processed_records']} records, splits {card['splits']}")
    return 0


def run_train(cfg: Config, args: argparse.Namespace) -> int:
    from loralab.training.recipe import train

    result = train(cfg, resume=args.resume)
    return INTERRUPTED if result.interrupted else 0


def run_evaluate(cfg: Config, args: argparse.Namespace) -> int:
    from loralab.metrics.evaluate import add_few_shot, evaluate_model_pair, rescore
    from loralab.training.tracking import log_standalone_evaluation, require_trackers

    if args.lm_eval_limit is not None and not args.lm_eval:
        raise LoralabError("--lm-eval-limit applies to --lm-eval TASKS")
    require_trackers(cfg.train.report_to)  # before the models load, not after the evaluation
    if args.lm_eval:  # lm-evaluation-harness alone, into its own file: the usual evaluation is not rerun
        if args.rescore or args.add_few_shot:
            raise LoralabError("--lm-eval runs on its own; give --rescore or --add-few-shot in a separate command")
        from loralab.metrics.evaluate import refresh_report
        from loralab.metrics.harness import run_harness

        run_harness(cfg, args.lm_eval, adapter_dir=args.adapter, limit=args.lm_eval_limit)
        refreshed = refresh_report(cfg)  # the report shows the new section
        print(f"wrote {cfg.eval.lm_eval_results_json}" + (f" and {cfg.eval.report_md}" if refreshed else ""))
        return 0
    if args.rescore or args.add_few_shot:
        if args.adapter:
            raise LoralabError("--rescore and --add-few-shot work on the answers stored in eval.results_json; "
                               "they take no --adapter")
        results = (add_few_shot if args.add_few_shot else rescore)(cfg)
    else:
        results = evaluate_model_pair(cfg, adapter_dir=args.adapter)
    log_standalone_evaluation(cfg, results, [cfg.eval.results_json, cfg.eval.report_md], args.adapter)
    print(f"wrote {cfg.eval.results_json} and {cfg.eval.report_md}")
    return 0


def run_pipeline(cfg: Config, args: argparse.Namespace) -> int:
    from loralab.pipeline import run_all

    summary = run_all(cfg, resume=args.resume)
    return INTERRUPTED if summary.get("interrupted") else 0


def run_merge(cfg: Config, args: argparse.Namespace) -> int:
    from loralab.model_utils import merge_to_directory

    out = merge_to_directory(cfg.model, args.adapter or cfg.train.output_dir, args.out)
    print(f"wrote the merged model to {out}/ (load it with AutoModelForCausalLM.from_pretrained)")
    return 0


def run_tune(cfg: Config, args: argparse.Namespace) -> int:
    from loralab.studies.tune import report_only, tune

    summary = report_only(cfg) if args.report_only else tune(cfg)
    best = summary["best"]
    if best is None:
        print(f"no complete trial yet ({summary['counts']}); wrote {cfg.tune.results_json}")
    else:
        print(f"best of {len(summary['trials'])} trials: trial {best['number']} {best['params']} (eval loss "
              f"{best['eval_loss']:.4f}); wrote {cfg.tune.results_json}, {cfg.tune.summary_md} and {cfg.tune.best_config_yaml}")
    return 0


def run_sweep(cfg: Config, args: argparse.Namespace) -> int:
    from loralab.studies.sweep import sweep

    summary = sweep(cfg)
    print(f"{len(summary['points'])} points; wrote {cfg.sweep.results_json}, {cfg.sweep.summary_md} and {cfg.sweep.plot}")
    return 0


def run_export(cfg: Config, args: argparse.Namespace) -> int:
    from loralab.deploy.export import export

    formats = [f.strip() for f in args.formats.split(",") if f.strip()] if args.formats else None
    results = export(cfg, adapter_dir=args.adapter, formats=formats)
    print(f"wrote {', '.join(e['path'] for e in results['formats'].values())}"
          + (f"; report {cfg.export.report_md}" if cfg.export.evaluate else ""))
    return 0


def run_serve(cfg: Config, args: argparse.Namespace) -> int:
    from loralab.deploy.serve.app import serve

    serve(cfg)
    return 0


def run_compare(cfg: Config, args: argparse.Namespace) -> int:
    from loralab.studies.compare import compare

    summary = compare(cfg)
    print(f"{len(summary['methods'])} methods; wrote {cfg.compare.results_json}, {cfg.compare.summary_md} "
          f"and {cfg.compare.plots_dir}/")
    return 0


def run_domains(cfg: Config, args: argparse.Namespace) -> int:
    from loralab.studies.domains import run_domains as domains

    summary = domains(cfg)
    print(f"{len(summary['matrix'])} models x {len(summary['domains'])} domains; wrote {cfg.domains.results_json}, "
          f"{cfg.domains.summary_md} and {cfg.domains.plots_dir}/")
    return 0


def run_inject(cfg: Config, args: argparse.Namespace) -> int:
    from loralab.studies.inject import run_inject as inject

    summary = inject(cfg)
    ic = cfg.inject
    print(f"{len(summary['runs']) - 1} adapters on {summary['facts']} facts; wrote {ic.results_json}, {ic.summary_md} "
          f"and {ic.plot}")
    return 0


def run_prune(cfg: Config, args: argparse.Namespace) -> int:
    if args.study:
        from loralab.prune.study import prune_study

        summary = prune_study(cfg, adapter_dir=args.adapter)
        p = cfg.prune
        print(f"{len(summary['points'])} points; wrote {p.results_json}, {p.summary_md} and {p.plots_dir}/")
        return 0
    from loralab.prune.prune import REPORT_FILE, prune

    prune(cfg, adapter_dir=args.adapter)
    print(f"wrote {cfg.prune.out_dir}/ (a plain Hugging Face model directory) and its {REPORT_FILE}")
    return 0


def run_ui(cfg: Config, args: argparse.Namespace) -> int:
    from loralab.ui.app import run_ui as ui
    from loralab.ui.form import ConfigSource

    ui(cfg, ConfigSource(tuple(args.config), tuple(args.overrides)))  # its jobs start from the same config
    return 0


def run_analysis(cfg: Config, args: argparse.Namespace) -> int:
    from loralab.studies.analysis import write_analysis

    print(f"wrote {write_analysis()}")
    return 0


def run_provenance(cfg: Config, args: argparse.Namespace) -> int:
    from loralab.audit import LIST_MD, audit, render, write_list

    statuses = audit()
    print(render(statuses))
    if args.write:
        print(f"wrote {write_list(statuses)}" if statuses else f"no results to list; {LIST_MD} not written")
    return 1 if args.check and any(s.stale for s in statuses) else 0


def adapter_pairs(values: list[str]) -> dict[str, str]:
    """`--adapter NAME=DIR` (repeatable) as serve.adapters."""
    pairs = [value.split("=", 1) for value in values]
    if any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
        raise LoralabError("--adapter expects NAME=DIR, e.g. --adapter medical=lora")
    return dict(pairs)


# --- the table ----------------------------------------------------------------------------------------

ADAPTER_DIR = flag("--adapter", help="adapter directory (default: train.output_dir)")
RESUME = flag("--resume", action="store_true", help="continue from the last checkpoint of train.run_dir")

VERBS: tuple[Verb, ...] = (
    Verb("prepare", "build data/ splits from the bundled or a user dataset", run_prepare, (
        flag("--dataset", sets="data.dataset",
             help="builtin:medical, builtin:legal, builtin:shell, or a .jsonl/.json/.csv file (alpaca and sharegpt detected)"),
        flag("--format", sets="data.format", choices=("auto", "jsonl", "json", "csv", "alpaca", "sharegpt")),
        flag("--question-field", sets="data.question_field"),
        flag("--answer-field", sets="data.answer_field"),
        flag("--task-field", sets="data.task_field", help="column holding a task label, for per-task accuracy"),
        flag("--skip-invalid", sets="data.skip_invalid", action="store_const", const=True,
             help="skip bad rows with a warning instead of stopping"),
        flag("--out-dir", sets="data.out_dir"),
    )),
    Verb("train", "fine-tune a LoRA adapter on data/train_split.json", run_train, (RESUME,)),
    Verb("evaluate", "base vs fine-tuned on the held-out split, beside constant-answer baselines", run_evaluate, (
        ADAPTER_DIR,
        flag("--rescore", action="store_true",
             help="score the answers stored in eval.results_json again (baselines, report); loads no model"),
        flag("--add-few-shot", action="store_true",
             help="add the few-shot baseline (the base model alone) to the answers stored in eval.results_json"),
        flag("--lm-eval", metavar="TASKS",
             help="instead: lm-evaluation-harness on base and base + adapter, tasks mmlu_medical,domain_ppl "
                  "(local files); writes lm_eval_results.json beside eval.results_json (needs pip install lm-eval==0.4.13)"),
        flag("--lm-eval-limit", type=int, metavar="N", help="with --lm-eval: only the first N documents of each task"),
    )),
    Verb("run", "prepare, train, evaluate and report", run_pipeline, (flag("--resume", action="store_true"),)),
    Verb("merge", "merge the adapter into the base model (plain HF directory)", run_merge, (
        ADAPTER_DIR,
        flag("--out", default="models/fine_tuned_model", help="output directory (default: models/fine_tuned_model)"),
    )),
    Verb("tune", "Optuna search over tune.space, scored on the eval split", run_tune, (
        flag("--storage", sets="tune.storage",
             help="sqlite:///file.db or postgresql://user:pass@host/db (shared by all workers)"),
        flag("--study-name", sets="tune.study_name"),
        flag("--sampler", sets="tune.sampler", choices=("tpe", "grid", "random")),
        flag("--n-trials", sets="tune.n_trials", type=int, help="finished trials in the whole study (all workers)"),
        flag("--timeout-minutes", sets="tune.timeout_minutes", type=float, help="wall-time budget of this worker (0 = none)"),
        flag("--report-only", action="store_true", help="rewrite the results, table and plots from the study; no training"),
    )),
    Verb("sweep", "sensitivity: one factor at a time around the config (sweep.factors)", run_sweep),
    Verb("export", "merged safetensors, GGUF (F16/Q8_0/Q4_1) and a llama.cpp/Ollama adapter, each verified", run_export, (
        ADAPTER_DIR,
        flag("--formats", help="some of merged,gguf-f16,gguf-q8_0,gguf-q4_1,gguf-q4_0,gguf-lora (default: export.formats)"),
        flag("--out", sets="export.out_dir", help="output directory (default: export.out_dir)"),
        flag("--no-evaluate", sets="export.evaluate", action="store_const", const=False,
             help="verify only; skip the test-split measurements"),
    )),
    Verb("serve", "OpenAI-compatible server: base + LoRA adapters, batched", run_serve, (
        flag("--adapter", sets="serve.adapters", convert=adapter_pairs, dest="adapters", action="append", metavar="NAME=DIR",
             help="serve an adapter under model id NAME (repeatable; replaces serve.adapters)"),
        flag("--merged", sets="serve.merged_model", help="serve a merged model directory instead of base + adapters"),
        flag("--engine", sets="serve.engine", choices=choices(ServeEngine),
             help="auto (default): llama.cpp where it is built and can serve the model, else torch"),
        flag("--host", sets="serve.host", help="bind address (default 127.0.0.1)"),
        flag("--port", sets="serve.port", type=int),
    )),
    Verb("compare", "every method, same data and budget, own lr, seeds; test split", run_compare),
    Verb("domains", "an adapter per domain and one on their mixture, cross-evaluated, forgetting", run_domains),
    Verb("inject", "knowledge injection: recall of trained facts, as trained and in new words, vs epochs, rank, "
         "modules, lr; forgetting", run_inject),
    Verb("prune", "prune the fine-tuned (or base) model: magnitude, Wanda, 2:4, heads, MLP channels, layers",
         run_prune, (
             ADAPTER_DIR,
             flag("--method", sets="prune.method", choices=choices(PruneMethod)),
             flag("--sparsity", sets="prune.sparsity", type=float,
                  help="fraction of weights, of heads per KV group, of MLP channels or of layers to remove"),
             flag("--source", sets="prune.source", choices=choices(PruneSource),
                  help="merged: base + adapter (default); base: the base model alone"),
             flag("--out", sets="prune.out_dir", help="output directory (default: prune.out_dir)"),
             flag("--recover", sets="prune.recover", action="store_const", const=True,
                  help="then train a LoRA adapter on the pruned model (prune.recovery_examples)"),
             flag("--no-evaluate", sets="prune.evaluate", action="store_const", const=False,
                  help="skip the test-split measurements"),
             flag("--study", action="store_true",
                  help="every prune.study_points point, measured; experiments/pruning_study.md (resumable)"),
         )),
    Verb("ui", "local web dashboard: runs, launch, compare, playground, data (token in the printed URL)", run_ui, (
        flag("--host", sets="ui.host", help="bind address (default 127.0.0.1)"),
        flag("--port", sets="ui.port", type=int, help="port (default: a free one)"),
    )),
    Verb("analysis", "rebuild experiments/optimization_analysis.md from the committed results", run_analysis),
    Verb("provenance", "every committed result with the commit that wrote it; flags the stale ones", run_provenance, (
        flag("--check", action="store_true", help="exit 1 when any result is stale (for CI)"),
        flag("--write", action="store_true", help="also write the list to experiments/provenance.md (docs quote it)"),
    )),
    Verb("config", "print the resolved configuration", print_config),
)
VERBS_BY_NAME = {verb.name: verb for verb in VERBS}


# --- the machinery: a parser from the table, a config from the parsed flags ------------------------------

def _common_flags() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", action="append", default=[],
                        help=f"YAML config file (sections: {', '.join(f.name for f in dataclasses.fields(Config))}); "
                             "repeatable, later files win")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set train.learning_rate=1e-4 (repeatable)")
    common.add_argument("--quick", action="store_true", help=f"apply the ~2-minute preset ({QUICK_PRESET})")
    return common


def build_parser(verbs: tuple[Verb, ...] = VERBS) -> argparse.ArgumentParser:
    common = _common_flags()
    parser = argparse.ArgumentParser(prog="loralab", description="LoRA fine-tuning, evaluation and reporting, offline on a CPU.")
    subparsers = parser.add_subparsers(dest="verb", required=True)
    for verb in verbs:
        sub = subparsers.add_parser(verb.name, parents=[common], help=verb.help)
        for option in verb.flags:
            sub.add_argument(*option.names, **option.options)
    return parser


def _dest(option: Flag) -> str:
    return option.options.get("dest") or option.names[0].lstrip("-").replace("-", "_")


def set_field(cfg: Config, dotted: str, value: Any) -> None:
    section_name, key = dotted.split(".")
    section = getattr(cfg, section_name)
    if not hasattr(section, key):  # a renamed config field: tests/test_cli.py catches this before a user does
        raise AttributeError(f"cli flag sets {dotted}, which Config does not have")
    setattr(section, key, value)


def load_verb_config(verb: Verb, args: argparse.Namespace) -> Config:
    """Defaults, the preset, the user's files (they win over the preset), `--set`, then the verb's flags."""
    with ExitStack() as stack:
        presets = [stack.enter_context(as_file(QUICK_PRESET))] if args.quick else []
        cfg = load_config(*presets, *args.config, overrides=args.overrides)
    for option in verb.flags:
        value = getattr(args, _dest(option))
        if option.sets is not None and value is not None:
            set_field(cfg, option.sets, option.convert(value) if option.convert else value)
    return cfg.validate()  # a flag's value obeys the same ranges as the file's


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verb = VERBS_BY_NAME[args.verb]
    quiet_library_noise()
    try:
        return verb.run(load_verb_config(verb, args), args)
    except LoralabError as exc:
        print(f"loralab: error: {exc}", file=sys.stderr)
        return BAD_INPUT
    except KeyboardInterrupt:
        print("loralab: interrupted", file=sys.stderr)
        return INTERRUPTED


def entry() -> None:
    """The `loralab` console command: main() under jemalloc where the machine has it (util/allocator.py)."""
    from loralab.util.allocator import reexec_with_jemalloc

    reexec_with_jemalloc(["-m", "loralab", *sys.argv[1:]])
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
