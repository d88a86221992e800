"""Typed configuration: dataclasses loaded from YAML, overridden with `--set section.key=value`.

A config is plain data (torchtune's "configs as data"): every run writes the fully resolved config
next to its results, so any number in a report can be traced to the exact settings that made it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loralab.util.errors import LoralabError


@dataclass
class DataConfig:
    # "builtin:medical" (the default), "builtin:legal", "builtin:shell" (built from installed packages),
    # or a path to a user dataset.
    dataset: str = "builtin:medical"
    # auto | jsonl | json | csv | alpaca | sharegpt ("auto" looks at the extension and the fields).
    format: str = "auto"
    question_field: str | None = None  # where a user dataset names its fields differently
    answer_field: str | None = None
    task_field: str | None = None  # optional per-row task label (drives per-task accuracy)
    skip_invalid: bool = False  # drop bad rows with a warning instead of stopping at the first
    out_dir: str = "data"
    eval_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 42
    # Size of the bundled medical dataset, per task type (see medical_dataset.py).
    builtin_per_task: dict[str, int] = field(
        default_factory=lambda: {
            "hpo_definition": 700,
            "hpo_category": 400,
            "disease_phenotypes": 250,
            "icd_code_to_description": 350,
            "icd_description_to_code": 350,
            "icd_chapter": 350,
            "abbreviation_expansion": 600,
        }
    )


@dataclass
class ModelConfig:
    # "smollm2-135m-instruct" (bundled GGUF), a local Hugging Face model directory, or a .gguf path.
    name_or_path: str = "smollm2-135m-instruct"
    cache_dir: str = "models/base_model"
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | bf16 | fp32 (auto: bf16 autocast where the CPU/GPU has it)
    # dtype of the frozen base weights while training: auto (bf16 when autocast is bf16), bf16, fp32.
    # The adapter and its optimizer state stay fp32 whatever this says.
    frozen_dtype: str = "auto"
    # none | int8 | nf4: hold the frozen base quantized with bitsandbytes and train LoRA on top
    # (QLoRA with nf4). Needs `pip install bitsandbytes==0.50.2` (its CPU backend trains on this machine).
    quantize_base: str = "none"
    gradient_checkpointing: bool = False


@dataclass
class LoraSettings:
    # lora | rslora | dora | pissa | olora | loraplus | adalora | ia3 | full (src/peft_methods.py)
    method: str = "lora"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # "auto" (attention projections of the architecture), "all-linear", or a list of module names.
    target_modules: Any = "auto"
    loraplus_lr_ratio: float | None = None  # method=loraplus only: B's learning rate / A's (default 16)
    adalora_init_r: int | None = None  # method=adalora only: starting rank (default 1.5 r; r is the target)


@dataclass
class TrainConfig:
    learning_rate: float = 1e-3  # best of a short lr sweep on the eval split (see submission.md)
    lr_scheduler: str = "cosine"  # any transformers scheduler name: cosine, linear, constant, ...
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 8
    gradient_accumulation: int = 1
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    max_length: int = 256
    seed: int = 42
    eval_every: int = 50
    eval_examples: int = 96  # eval-loss subset size; the full eval split when 0
    save_every: int = 50
    keep_checkpoints: int = 2
    run_dir: str = "runs/default"  # checkpoints and the per-run log live here
    output_dir: str = "lora"  # the final adapter
    log_file: str = "experiments/training_logs.txt"
    loss_plot: str = "experiments/plots/loss_curve.png"
    # Speed techniques, on by default; each can be switched off (benchmarks/train_throughput.py --ablation).
    length_bucketing: bool = True  # batch examples of similar length together (less padding)
    answer_only_logits: bool = True  # apply the output head only where the next token is labelled
    compile: bool = False  # torch.compile the decoder (dynamic shapes); pays off only on long runs


@dataclass
class EvalConfig:
    split: str = "test"
    batch_size: int = 16
    max_new_tokens: int = 64
    generation_per_task: int = 20  # examples per task type for generated-answer accuracy
    showcase_per_task: int = 2  # before/after answers shown in the report
    results_json: str = "experiments/eval_results.json"
    report_md: str = "experiments/report.md"
    plots_dir: str = "experiments/plots"


@dataclass
class TuneConfig:
    # Search space, by `section.key`: a list is a categorical choice; a mapping {low, high, log}
    # is a range (int when both ends are ints). `lora.alpha_ratio` sets lora.alpha = ratio x rank.
    space: dict[str, Any] = field(
        default_factory=lambda: {
            "train.learning_rate": {"low": 2.0e-4, "high": 6.0e-3, "log": True},
            "train.batch_size": [2, 4, 8],
            "lora.r": [2, 4, 8, 16, 32],
            "lora.alpha_ratio": [1, 2, 4],
            "lora.dropout": {"low": 0.0, "high": 0.2},
            "lora.target_modules": ["auto", "all-linear"],
        }
    )
    sampler: str = "tpe"  # tpe | grid (every combination of list-valued params) | random (a control)
    pruner: str = "median"  # median | hyperband | none: stop bad trials on their intermediate eval loss
    n_trials: int = 40  # finished (complete or pruned) trials in the whole study, across all workers
    timeout_minutes: float = 55.0  # wall-time budget of one worker; 0 = none
    startup_trials: int = 8  # random trials before TPE models the space; trials before pruning starts
    reports_per_trial: int = 3  # intermediate eval losses per trial (what pruning looks at)
    study_name: str = "loralab"
    # Any SQLAlchemy URL Optuna accepts: sqlite:///file.db (default, resumable) or
    # postgresql://user:pass@host/db (many workers on many machines share one study).
    storage: str = "sqlite:///runs/tune/study.db"
    heartbeat_seconds: int = 20  # a worker's pulse; a RUNNING trial silent for grace_seconds is failed
    grace_seconds: int = 60
    max_retries: int = 2  # a failed (e.g. killed) trial is re-queued with the same params this often
    # The budget of one trial, in training examples: steps = trial_examples / (batch x accumulation),
    # so trials with different batch sizes see the same data.
    trial_examples: int = 240
    trial_eval_examples: int = 96
    runs_dir: str = "runs/tune"
    results_json: str = "experiments/metrics_comparison.json"
    summary_md: str = "experiments/tuning_summary.md"
    best_config_yaml: str = "experiments/best_config.yaml"
    plots_dir: str = "experiments/plots/tune"
    # `loralab sweep`: one factor at a time around the given config. "x3" means 3 x the config's value.
    sweep: dict[str, list] = field(
        default_factory=lambda: {
            "lora.r": [1, 2, 4, 8, 16, 32, 64],
            "train.learning_rate": ["x0.1", "x0.3", "x1", "x3", "x10"],
            "train.batch_size": [1, 2, 4, 8, 16],
        }
    )
    sweep_generation_per_task: int = 10  # eval-split questions per task for domain accuracy
    sweep_results_json: str = "experiments/sensitivity.json"
    sweep_summary_md: str = "experiments/sensitivity.md"
    sweep_plot: str = "experiments/plots/sensitivity.png"


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    # Model ids a request may name, each a LoRA adapter directory (safetensors only), loaded once at
    # start; the base model is served under its own id. Requests can never load other paths.
    adapters: dict[str, str] = field(default_factory=lambda: {"medical": "lora"})
    merged_model: str = ""  # a merged HF directory (loralab export) to serve instead of base + adapters
    int8: bool = False  # dynamic int8 quantization of the Linear layers (merged model only)
    api_key_env: str = "LORALAB_API_KEY"  # when this variable is set, every /v1 request needs the key
    max_prompt_tokens: int = 1024  # longer prompts: 413
    max_tokens_limit: int = 512  # max_tokens above this: 400
    default_max_tokens: int = 128
    max_batch: int = 16  # requests decoded together in one forward pass
    # How long the engine waits for concurrent requests to join a batch before it starts decoding:
    # batches form per round, so a request that just misses one waits for the whole next round.
    batch_wait_ms: float = 50.0
    max_queue: int = 64  # waiting requests beyond this: 429, never an unbounded backlog
    request_timeout_s: float = 120.0  # 504 when a request has not finished by then
    max_body_bytes: int = 1_000_000


@dataclass
class ExportConfig:
    out_dir: str = "models/fine_tuned_model"  # merged/, gguf files, export_report.json under here
    formats: list[str] = field(default_factory=lambda: ["merged", "gguf-f16", "gguf-q8_0", "gguf-q4_1", "int8"])
    evaluate: bool = True  # measure every format on the test split (perplexity, accuracy, speed)
    generation_per_task: int = 10
    speed_tokens: int = 64  # greedy tokens at batch 1 for the tokens/s column
    report_md: str = "experiments/export_report.md"
    report_json: str = "experiments/export_report.json"


@dataclass
class CompareConfig:
    """`loralab compare`: each method, the same data and example budget, its own learning rate."""

    # A method, or method@int8 / method@nf4 for a base held quantized by bitsandbytes (QLoRA).
    # olora also works (tests/test_methods.py trains it) but is left out of the default list to keep the full
    # comparison near three hours of a 2-core CPU: it is pissa's sibling, another initialisation from the
    # weights; add it with --set compare.methods=[...]. Run in this order: a partial comparison has the
    # reference points first.
    methods: list[str] = field(default_factory=lambda: ["lora", "rslora", "dora", "full", "lora@nf4", "ia3", "pissa",
                                                        "loraplus", "adalora", "lora@int8"])
    seeds: list[int] = field(default_factory=lambda: [42, 43, 44])
    # Per method (an entry like lora@nf4 uses its method's list unless given its own), the learning rates tried (one seed each, scored on the eval split); the best is used
    # for every seed. Methods differ by orders of magnitude here, so one shared lr would be unfair.
    learning_rates: dict[str, list[float]] = field(default_factory=lambda: {
        "lora": [1e-3, 3e-3, 1e-2], "rslora": [3e-4, 1e-3, 3e-3], "dora": [1e-3, 3e-3, 1e-2],
        "pissa": [3e-4, 1e-3, 3e-3], "olora": [3e-4, 1e-3, 3e-3], "loraplus": [3e-4, 1e-3, 3e-3],
        "adalora": [3e-3, 1e-2, 3e-2], "ia3": [3e-3, 1e-2, 3e-2], "full": [1e-5, 3e-5, 1e-4],
    })
    # When the best learning rate is the grid's largest or smallest, try up to this many more past that edge.
    lr_extensions: int = 1
    train_examples: int = 240  # every run, whatever its batch size
    eval_examples: int = 96  # eval-split examples for choosing the learning rate
    generation_per_task: int = 10  # test-split questions per task for domain accuracy
    runs_dir: str = "runs/compare"
    # One JSON record per finished run (committed): a fresh clone continues the comparison without retraining.
    records_dir: str = "experiments/compare_runs"
    results_json: str = "experiments/method_comparison.json"
    summary_md: str = "experiments/method_comparison.md"
    plots_dir: str = "experiments/plots/compare"


@dataclass
class DomainsConfig:
    """`loralab domains`: a specialist adapter per domain, one on their mixture, cross-evaluated."""

    # name -> dataset (a built-in or a file, as data.dataset takes); 'base' and 'mixture' are reserved.
    datasets: dict[str, str] = field(default_factory=lambda: {
        "medical": "builtin:medical", "legal": "builtin:legal", "shell": "builtin:shell"})
    train_examples: int = 240  # per specialist (one epoch); the mixture trains on all of them
    eval_examples: int = 64  # eval-split examples per adapter for its training eval loss
    generation_per_task: int = 10  # test questions per task for domain accuracy
    general_questions: int = 200  # MMLU questions for the forgetting probe
    runs_dir: str = "runs/domains"
    results_json: str = "experiments/domain_transfer.json"
    summary_md: str = "experiments/domain_transfer.md"
    plots_dir: str = "experiments/plots/domains"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    domains: DomainsConfig = field(default_factory=DomainsConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check/convert a YAML value to the field's declared type; one clear error otherwise."""
    if annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except LoralabError:
                continue
        raise LoralabError(f"{where}: expected {annotation}, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise LoralabError(f"{where}: expected a mapping, got {value!r}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise LoralabError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise LoralabError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "2e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise LoralabError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise LoralabError(f"{where}: expected a string, got {value!r}")
    return value


def _apply(section_obj: Any, values: dict[str, Any], where: str) -> None:
    hints = typing.get_type_hints(type(section_obj))
    names = {f.name for f in dataclasses.fields(section_obj)}
    for key, value in values.items():
        if key not in names:
            known = ", ".join(sorted(names))
            raise LoralabError(f"{where}: unknown key '{key}' (known: {known})")
        setattr(section_obj, key, _coerce(value, hints[key], f"{where}.{key}"))


def _section_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(Config))


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` strings; the value is parsed as YAML (so 1e-4, true, [a, b] work)."""
    for item in overrides:
        if "=" not in item:
            raise LoralabError(f"--set {item!r}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2:
            raise LoralabError(f"--set {item!r}: expected section.key=value, e.g. train.learning_rate=1e-4")
        section, key = parts
        if section not in _section_names():
            raise LoralabError(f"--set {item!r}: unknown section '{section}' ({', '.join(_section_names())})")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _apply(getattr(config, section), {key: value}, f"--set {section}")
    return config


def _apply_file(config: Config, path: Path) -> None:
    if not path.is_file():
        raise LoralabError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise LoralabError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict):
        raise LoralabError(f"{path}: expected a mapping of sections ({', '.join(_section_names())})")
    for section, values in raw.items():
        if section not in _section_names():
            raise LoralabError(f"{path}: unknown section '{section}' ({', '.join(_section_names())})")
        if not isinstance(values, dict):
            raise LoralabError(f"{path}: section '{section}' must be a mapping")
        _apply(getattr(config, section), values, f"{path}: {section}")


def load_config(*paths: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Defaults, then each YAML file in order (later files win), then `--set` overrides."""
    config = Config()
    for path in paths:
        if path is not None:
            _apply_file(config, Path(path))
    return apply_overrides(config, overrides or [])
