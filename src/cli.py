"""`loralab <verb>`: one command line over the library functions.

    loralab prepare  [--dataset PATH] [--format F] [--question-field Q] [--answer-field A]
    loralab train    [--resume]
    loralab evaluate [--adapter DIR]
    loralab run      [--quick] [--resume]       # prepare + train + evaluate + report
    loralab tune     [--quick] [--storage URL] [--study-name N] [--sampler S] [--n-trials K] [--timeout-minutes M]
                                                # Optuna search; experiments/metrics_comparison.json
    loralab sweep    [--quick]                  # one factor at a time; experiments/sensitivity.json
    loralab merge    [--adapter DIR] [--out DIR] # base + adapter as one plain HF model directory
    loralab export   [--adapter DIR] [--formats merged,gguf-q8_0,...] [--no-evaluate]
                                                # merged / GGUF / int8, verified; experiments/export_report.md
    loralab serve    [--adapter NAME=DIR ...] [--merged DIR] [--host H] [--port P]
                                                # OpenAI-compatible HTTP server, multi-LoRA, batched
    loralab compare  [--quick]                  # methods x seeds on the test split; experiments/method_comparison.md
    loralab domains  [--quick]                  # specialists + mixture, cross-evaluated; experiments/domain_transfer.md
    loralab analysis                            # experiments/optimization_analysis.md from the committed results
    loralab config                              # print the resolved config as YAML

Every verb takes `--config FILE.yaml` and any number of `--set section.key=value`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from loralab.config import Config, load_config
from loralab.util.errors import LoralabError
from loralab.util.library_noise import quiet_library_noise

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", action="append", default=[],
                        help="YAML config file (sections: data, model, lora, train, eval, tune, serve, export, compare, domains); "
                             "repeatable, later files win")
    common.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set train.learning_rate=1e-4 (repeatable)")
    common.add_argument("--quick", action="store_true", help=f"apply the ~2-minute preset ({REPO_CONFIGS / 'quick.yaml'})")

    parser = argparse.ArgumentParser(prog="loralab", description="LoRA fine-tuning, evaluation and reporting, offline on a CPU.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    prepare = verbs.add_parser("prepare", parents=[common], help="build data/ splits from the bundled or a user dataset")
    prepare.add_argument("--dataset", help="builtin:medical, builtin:legal, builtin:shell, or a .jsonl/.json/.csv file (alpaca and sharegpt detected)")
    prepare.add_argument("--format", choices=("auto", "jsonl", "json", "csv", "alpaca", "sharegpt"))
    prepare.add_argument("--question-field")
    prepare.add_argument("--answer-field")
    prepare.add_argument("--task-field", help="column holding a task label, for per-task accuracy")
    prepare.add_argument("--skip-invalid", action="store_true", help="skip bad rows with a warning instead of stopping")
    prepare.add_argument("--out-dir")

    train = verbs.add_parser("train", parents=[common], help="fine-tune a LoRA adapter on data/train_split.json")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint of train.run_dir")

    evaluate = verbs.add_parser("evaluate", parents=[common], help="base vs fine-tuned on the held-out split")
    evaluate.add_argument("--adapter", help="adapter directory (default: train.output_dir)")

    run = verbs.add_parser("run", parents=[common], help="prepare, train, evaluate and report")
    run.add_argument("--resume", action="store_true")

    merge = verbs.add_parser("merge", parents=[common], help="merge the adapter into the base model (plain HF directory)")
    merge.add_argument("--adapter", help="adapter directory (default: train.output_dir)")
    merge.add_argument("--out", default="models/fine_tuned_model", help="output directory (default: models/fine_tuned_model)")

    tune = verbs.add_parser("tune", parents=[common], help="Optuna search over tune.space, scored on the eval split")
    tune.add_argument("--storage", help="sqlite:///file.db or postgresql://user:pass@host/db (shared by all workers)")
    tune.add_argument("--study-name")
    tune.add_argument("--sampler", choices=("tpe", "grid", "random"))
    tune.add_argument("--n-trials", type=int, help="finished trials in the whole study (all workers)")
    tune.add_argument("--timeout-minutes", type=float, help="wall-time budget of this worker (0 = none)")
    tune.add_argument("--report-only", action="store_true", help="rewrite the results, table and plots from the study; no training")

    verbs.add_parser("sweep", parents=[common], help="sensitivity: one factor at a time around the config (tune.sweep)")

    export = verbs.add_parser("export", parents=[common], help="merged safetensors, GGUF (F16/Q8_0/Q4_0) and int8, each verified")
    export.add_argument("--adapter", help="adapter directory (default: train.output_dir)")
    export.add_argument("--formats", help="comma-separated: merged,gguf-f16,gguf-q8_0,gguf-q4_0,int8 (default: all)")
    export.add_argument("--out", help="output directory (default: export.out_dir)")
    export.add_argument("--no-evaluate", action="store_true", help="verify only; skip the test-split measurements")

    serve = verbs.add_parser("serve", parents=[common], help="OpenAI-compatible server: base + LoRA adapters, batched")
    serve.add_argument("--adapter", dest="adapters", action="append", metavar="NAME=DIR",
                       help="serve an adapter under model id NAME (repeatable; replaces serve.adapters)")
    serve.add_argument("--merged", help="serve a merged model directory instead of base + adapters")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int)

    verbs.add_parser("compare", parents=[common], help="every method, same data and budget, own lr, seeds; test split")
    verbs.add_parser("domains", parents=[common], help="an adapter per domain and one on their mixture, cross-evaluated, forgetting")
    verbs.add_parser("analysis", parents=[common], help="rebuild experiments/optimization_analysis.md from the committed results")
    verbs.add_parser("config", parents=[common], help="print the resolved configuration")
    return parser


def resolve_config(args: argparse.Namespace) -> Config:
    presets = [REPO_CONFIGS / "quick.yaml"] if args.quick else []
    cfg = load_config(*presets, *args.config, overrides=args.overrides)  # the user's files win over the preset
    # Paths and field names are taken literally (not parsed as YAML: "2024-05-01" stays a string).
    for attr in ("dataset", "format", "question_field", "answer_field", "task_field", "out_dir"):
        value = getattr(args, attr, None)
        if value is not None:
            setattr(cfg.data, attr, value)
    if getattr(args, "skip_invalid", False):
        cfg.data.skip_invalid = True
    if args.verb == "serve":
        if args.adapters:
            pairs = [a.split("=", 1) for a in args.adapters]
            if any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
                raise LoralabError("--adapter expects NAME=DIR, e.g. --adapter medical=lora")
            cfg.serve.adapters = dict(pairs)
        for attr, value in (("merged_model", args.merged), ("host", args.host), ("port", args.port)):
            if value is not None:
                setattr(cfg.serve, attr, value)
    if args.verb == "export":
        if args.out:
            cfg.export.out_dir = args.out
        if args.no_evaluate:
            cfg.export.evaluate = False
    for attr in ("storage", "study_name", "sampler", "n_trials", "timeout_minutes"):
        value = getattr(args, attr, None)
        if value is not None:
            setattr(cfg.tune, attr, value)
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet_library_noise()
    try:
        cfg = resolve_config(args)
        if args.verb == "config":
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        elif args.verb == "prepare":
            from loralab.data.prepare import prepare_dataset

            card = prepare_dataset(cfg.data)
            print(f"wrote {cfg.data.out_dir}/: {card['processed_records']} records, splits {card['splits']}")
        elif args.verb == "train":
            from loralab.training.recipe import train

            result = train(cfg, resume=args.resume)
            return 130 if result.interrupted else 0
        elif args.verb == "evaluate":
            from loralab.metrics.evaluate import evaluate_model_pair

            evaluate_model_pair(cfg, adapter_dir=args.adapter)
            print(f"wrote {cfg.eval.results_json} and {cfg.eval.report_md}")
        elif args.verb == "merge":
            from loralab.model_utils import merge_to_directory

            out = merge_to_directory(cfg.model, args.adapter or cfg.train.output_dir, args.out)
            print(f"wrote the merged model to {out}/ (load it with AutoModelForCausalLM.from_pretrained)")
        elif args.verb == "tune":
            from loralab.studies.tune import report_only, tune

            summary = report_only(cfg) if args.report_only else tune(cfg)
            best = summary["best"]
            if best is None:
                print(f"no complete trial yet ({summary['counts']}); wrote {cfg.tune.results_json}")
            else:
                print(f"best of {len(summary['trials'])} trials: trial {best['number']} {best['params']} (eval loss "
                      f"{best['eval_loss']:.4f}); wrote {cfg.tune.results_json}, {cfg.tune.summary_md} and {cfg.tune.best_config_yaml}")
        elif args.verb == "sweep":
            from loralab.studies.sweep import sweep

            summary = sweep(cfg)
            print(f"{len(summary['points'])} points; wrote {cfg.tune.sweep_results_json}, {cfg.tune.sweep_summary_md} "
                  f"and {cfg.tune.sweep_plot}")
        elif args.verb == "export":
            from loralab.deploy.export import export

            formats = [f.strip() for f in args.formats.split(",") if f.strip()] if args.formats else None
            results = export(cfg, adapter_dir=args.adapter, formats=formats)
            print(f"wrote {', '.join(e['path'] for e in results['formats'].values())}"
                  + (f"; report {cfg.export.report_md}" if cfg.export.evaluate else ""))
        elif args.verb == "compare":
            from loralab.studies.compare import compare

            summary = compare(cfg)
            print(f"{len(summary['methods'])} methods; wrote {cfg.compare.results_json}, {cfg.compare.summary_md} "
                  f"and {cfg.compare.plots_dir}/")
        elif args.verb == "domains":
            from loralab.studies.domains import run_domains

            summary = run_domains(cfg)
            print(f"{len(summary['matrix'])} models x {len(summary['domains'])} domains; wrote {cfg.domains.results_json}, "
                  f"{cfg.domains.summary_md} and {cfg.domains.plots_dir}/")
        elif args.verb == "analysis":
            from loralab.studies.analysis import write_analysis

            print(f"wrote {write_analysis()}")
        elif args.verb == "serve":
            from loralab.deploy.serve.app import serve

            serve(cfg)
        elif args.verb == "run":
            from loralab.pipeline import run_all

            summary = run_all(cfg, resume=args.resume)
            return 130 if summary.get("interrupted") else 0
    except LoralabError as exc:
        print(f"loralab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loralab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
