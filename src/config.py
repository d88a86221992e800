"""Typed configuration: dataclasses loaded from YAML, overridden with `--set section.key=value`.

A config is plain data (torchtune's "configs as data"): every run writes the fully resolved config
next to its results, so any number in a report can be traced to the exact settings that made it.
It is checked when it is loaded, not minutes into a run: enumerated values are `Literal` types
(`model.precision=fp33` fails with the key, the value and the choices), and each section's
`validate()` checks its ranges. Output files are named from one root per section (`results_dir`,
`runs_dir`), and `run_identity` says which settings change what a run learns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from loralab.util.errors import LoralabError

DataFormat = Literal["auto", "jsonl", "json", "csv", "alpaca", "sharegpt"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "bf16", "fp32"]
QuantizedBase = Literal["none", "int8", "nf4"]
# The names of adapters/registry.py (config is a lower layer and cannot import it; a test keeps the two equal).
MethodName = Literal["lora", "rslora", "dora", "pissa", "olora", "loraplus", "adalora", "ia3", "full"]
# transformers' SchedulerType values that work with a warmup and a step count alone (the others need
# extra arguments or a metric at every step).
LrScheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                      "inverse_sqrt"]
Split = Literal["train", "eval", "test"]
ServeEngine = Literal["auto", "torch", "llama.cpp", "vllm"]
Sampler = Literal["tpe", "grid", "random"]
Pruner = Literal["median", "hyperband", "none"]
PruneMethod = Literal["magnitude", "wanda", "wanda-2:4", "heads", "mlp", "layers"]
PruneSource = Literal["merged", "base"]
ExportFormat = Literal["merged", "gguf-f16", "gguf-q8_0", "gguf-q4_1", "gguf-q4_0", "gguf-lora"]
# Experiment trackers a training run can also log to (src/training/tracking.py, docs/tracking.md).
Tracker = Literal["tensorboard", "mlflow"]
Attention = Literal["auto", "sdpa", "eager"]
AnswerLoss = Literal["auto", "chunked", "whole"]

# Presets ship inside the package (src/presets/), so `--quick` works from any install and any folder.
PRESETS = files("loralab") / "presets"
QUICK_PRESET = PRESETS / "quick.yaml"

# Field metadata of a setting that changes where or how fast a run goes, never what it learns or
# measures (paths, the device, speed switches): it stays out of `run_identity`.
NOT_IDENTITY = {"identity": False}
# The sections that decide what a run learns; the others (eval, tune, serve, ...) act on finished runs.
IDENTITY_SECTIONS = ("data", "model", "lora", "train")


def choices(annotation: Any) -> tuple:
    """The allowed values of a Literal type (empty for any other type)."""
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()


def _check(ok: bool, key: str, value: Any, fix: str) -> None:
    if not ok:
        raise LoralabError(f"{key}={value!r}: {fix}")


class Section:
    """What every section shares: `validate()` checks the enumerated fields (also when a program set
    them without `load_config`), then the section's own ranges in `check_ranges()`."""

    name: ClassVar[str]

    def validate(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _coerce(getattr(self, f.name), hints[f.name], f"{self.name}.{f.name}")
        self.check_ranges()

    def check_ranges(self) -> None:
        """Overridden by sections with numeric limits; one `_check` per rule, each naming the key and the fix."""

    def _at_least(self, key: str, low: float, exclusive: bool = False) -> None:
        value = getattr(self, key)
        if exclusive:
            _check(value > low, f"{self.name}.{key}", value, f"must be greater than {low:g}")
        else:
            _check(value >= low, f"{self.name}.{key}", value, f"must be at least {low:g}")

    def _fraction(self, key: str, upper_inclusive: bool = False) -> None:
        value = getattr(self, key)
        ok = 0 <= value <= 1 if upper_inclusive else 0 <= value < 1
        _check(ok, f"{self.name}.{key}", value, f"must be in [0, 1{']' if upper_inclusive else ')'}")


@dataclass
class DataConfig(Section):
    name: ClassVar[str] = "data"

    # "builtin:medical" (the default), "builtin:legal", "builtin:shell" (built from installed packages),
    # or a path to a user dataset.
    dataset: str = "builtin:medical"
    format: DataFormat = "auto"  # "auto" looks at the extension and the fields
    question_field: str | None = None  # where a user dataset names its fields differently
    answer_field: str | None = None
    task_field: str | None = None  # optional per-row task label (drives per-task accuracy)
    # A second phrasing of the question, never trained on: where rows have it, evaluation adds the
    # recall test (training facts asked in new words).
    paraphrase_field: str = "paraphrase"
    skip_invalid: bool = False  # drop bad rows with a warning instead of stopping at the first
    # Training reads its splits from here, so the directory names the data a run learned from (the
    # domains study trains on several): part of a run's identity.
    out_dir: str = "data"
    eval_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 42
    # Size of the bundled medical dataset, per task type (see data/medical.py).
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

    def check_ranges(self) -> None:
        self._fraction("eval_fraction")
        self._fraction("test_fraction")
        total = self.eval_fraction + self.test_fraction
        _check(total < 1, "data.eval_fraction + data.test_fraction", total, "must leave rows for training (below 1)")


@dataclass
class ModelConfig(Section):
    name: ClassVar[str] = "model"

    # "smollm2-135m-instruct" (bundled GGUF), a local Hugging Face model directory, or a .gguf path.
    name_or_path: str = "smollm2-135m-instruct"
    cache_dir: str = field(default="models/base_model", metadata=NOT_IDENTITY)
    device: Device = field(default="auto", metadata=NOT_IDENTITY)
    precision: Precision = "auto"  # auto: bf16 autocast where the CPU/GPU has it
    # dtype of the frozen base weights while training: auto (bf16 when autocast is bf16), bf16, fp32.
    # The adapter and its optimizer state stay fp32 whatever this says.
    frozen_dtype: Precision = "auto"
    # none | int8 | nf4: hold the frozen base quantized with bitsandbytes and train LoRA on top
    # (QLoRA with nf4). Needs `pip install bitsandbytes==0.50.2` (its CPU backend trains on this machine).
    quantize_base: QuantizedBase = "none"
    gradient_checkpointing: bool = field(default=False, metadata=NOT_IDENTITY)  # recomputes, same result
    # With gradient_checkpointing: recompute every n-th decoder layer only. On the default step (the
    # --ablation of benchmarks/train_throughput.py) n=2 kept most of the memory saving and most of the cost.
    checkpoint_every_n_layers: int = field(default=1, metadata=NOT_IDENTITY)

    def check_ranges(self) -> None:
        self._at_least("checkpoint_every_n_layers", 1)


@dataclass
class LoraSettings(Section):
    name: ClassVar[str] = "lora"

    method: MethodName = "lora"  # each one's record is in src/adapters/registry.py
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # "auto" (attention projections of the architecture), "all-linear", or a list of module names.
    target_modules: Any = "auto"
    loraplus_lr_ratio: float | None = None  # method=loraplus only: B's learning rate / A's (default 16)
    adalora_init_r: int | None = None  # method=adalora only: starting rank (default 1.5 r; r is the target)

    def check_ranges(self) -> None:
        # Method-specific options are checked by the method's record (adapters/registry.py).
        self._at_least("r", 1)
        self._at_least("alpha", 0, exclusive=True)
        self._fraction("dropout")


@dataclass
class TrainConfig(Section):
    name: ClassVar[str] = "train"

    learning_rate: float = 1e-3  # best of a short lr sweep on the eval split (see submission.md)
    lr_scheduler: LrScheduler = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    batch_size: int = 8
    gradient_accumulation: int = 1
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    max_length: int = 256
    seed: int = 42
    eval_every: int = field(default=50, metadata=NOT_IDENTITY)  # 0: only at the end
    eval_examples: int = 96  # eval-loss subset size; the full eval split when 0 (changes the recorded loss)
    save_every: int = field(default=50, metadata=NOT_IDENTITY)  # 0: no checkpoints
    keep_checkpoints: int = field(default=2, metadata=NOT_IDENTITY)
    run_dir: str = field(default="runs/default", metadata=NOT_IDENTITY)  # checkpoints and the per-run log
    output_dir: str = field(default="lora", metadata=NOT_IDENTITY)  # the final adapter
    results_dir: str = field(default="experiments", metadata=NOT_IDENTITY)  # training_logs.txt, plots/loss_curve.png
    plot_loss: bool = field(default=True, metadata=NOT_IDENTITY)  # study trials and benchmarks skip the plot
    # Speed techniques, on by default; each can be switched off (benchmarks/train_throughput.py --ablation).
    length_bucketing: bool = True  # batch examples of similar length together (less padding: other batches)
    # Apply the output head only where the next token is labelled: the same loss, faster.
    answer_only_logits: bool = field(default=True, metadata=NOT_IDENTITY)
    # With answer_only_logits, how the head and loss run over the answer positions: chunked (logits
    # recomputed in the backward, training/chunked_ce.py: the same loss, less memory held)
    # or whole; auto: chunked where training computes in bf16 (in fp32 the recompute cost speed).
    answer_loss: AnswerLoss = field(default="auto", metadata=NOT_IDENTITY)
    # torch.compile the decoder (dynamic shapes); pays off only on long runs.
    compile: bool = field(default=False, metadata=NOT_IDENTITY)
    # transformers' attention kernel; auto: eager where training computes in bf16 on a CPU, else sdpa
    # (training/attention.py has the measurement). The same attention, other rounding.
    attention: Attention = field(default="auto", metadata=NOT_IDENTITY)
    # LoRA layers that read one input (q/k/v, gate/up) share its dropout mask and one A matmul
    # (training/fused_lora.py); the adapter is the same PEFT adapter. Off: PEFT's independent masks.
    fused_lora: bool = True
    # Experiment tracking (docs/tracking.md): [] logs to no tracker; tune, compare and domains log each
    # run as a nested run of the study. Where a run logs never changes what it learns: not identity.
    report_to: list[Tracker] = field(default_factory=list, metadata=NOT_IDENTITY)
    tracking_dir: str = field(default="", metadata=NOT_IDENTITY)  # TensorBoard; "": <run_dir>/tensorboard
    # "": $MLFLOW_TRACKING_URI when set, else sqlite:///runs/mlflow.db; or a server, http://host:5000
    mlflow_tracking_uri: str = field(default="", metadata=NOT_IDENTITY)
    experiment_name: str = field(default="loralab", metadata=NOT_IDENTITY)  # the MLflow experiment

    @property
    def log_file(self) -> str:
        return str(Path(self.results_dir) / "training_logs.txt")

    @property
    def loss_plot(self) -> str:
        """The loss-curve PNG, or "" when `plot_loss` is off."""
        return str(Path(self.results_dir) / "plots" / "loss_curve.png") if self.plot_loss else ""

    def check_ranges(self) -> None:
        self._at_least("learning_rate", 0, exclusive=True)
        self._fraction("warmup_ratio", upper_inclusive=True)
        for key in ("weight_decay", "max_grad_norm", "max_steps", "eval_every", "eval_examples", "save_every"):
            self._at_least(key, 0)
        for key in ("batch_size", "gradient_accumulation", "max_length", "keep_checkpoints"):
            self._at_least(key, 1)
        self._at_least("epochs", 0, exclusive=True)
        _check(len(set(self.report_to)) == len(self.report_to), "train.report_to", self.report_to, "name each tracker once")
        _check(bool(self.experiment_name.strip()), "train.experiment_name", self.experiment_name, "must not be empty")


@dataclass
class EvalConfig(Section):
    name: ClassVar[str] = "eval"

    split: Split = "test"
    batch_size: int = 16
    max_new_tokens: int = 64
    generation_per_task: int = 20  # examples per task type for generated-answer accuracy
    showcase_per_task: int = 2  # before/after answers shown in the report
    # The few-shot baseline: the base model prompted with k training examples of the task (as chat
    # turns), k chosen among these on the first few_shot_eval_per_task eval-split questions per task,
    # then answering the same test questions as the models. [] skips it.
    few_shot_ks: list[int] = field(default_factory=lambda: [1, 3])
    few_shot_eval_per_task: int = 10
    # The recall test: the first recall_per_task training questions per task that have a second
    # phrasing (data.paraphrase_field), asked as in training and in the new words. 0 skips it.
    recall_per_task: int = 10
    results_dir: str = "experiments"  # eval_results.json, report.md, run_summary.json, plots/

    @property
    def results_json(self) -> str:
        return str(Path(self.results_dir) / "eval_results.json")

    @property
    def report_md(self) -> str:
        return str(Path(self.results_dir) / "report.md")

    @property
    def plots_dir(self) -> str:
        return str(Path(self.results_dir) / "plots")

    @property
    def run_summary_json(self) -> str:
        """`loralab run`'s timings and headline numbers."""
        return str(Path(self.results_dir) / "run_summary.json")

    @property
    def lm_eval_results_json(self) -> str:
        """`loralab evaluate --lm-eval`'s numbers (the report shows them when present)."""
        return str(Path(self.results_dir) / "lm_eval_results.json")

    def check_ranges(self) -> None:
        for key in ("batch_size", "max_new_tokens", "generation_per_task"):
            self._at_least(key, 1)
        self._at_least("showcase_per_task", 0)
        self._at_least("few_shot_eval_per_task", 1)
        self._at_least("recall_per_task", 0)
        for k in self.few_shot_ks:
            _check(k >= 1, "eval.few_shot_ks", self.few_shot_ks, "each k must be at least 1 (k=0 is the base alone)")


@dataclass
class TuneConfig(Section):
    """`loralab tune`: an Optuna search, shared by any number of workers through its storage."""

    name: ClassVar[str] = "tune"

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
    sampler: Sampler = "tpe"  # grid: every combination of list-valued params; random: a control
    pruner: Pruner = "median"  # stop bad trials on their intermediate eval loss
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
    trial_eval_examples: int = 96  # 0: the whole eval split
    runs_dir: str = "runs/tune"  # one directory per trial
    results_dir: str = "experiments"  # metrics_comparison.json, tuning_summary.md, best_config.yaml, plots/tune/

    @property
    def results_json(self) -> str:
        return str(Path(self.results_dir) / "metrics_comparison.json")

    @property
    def summary_md(self) -> str:
        return str(Path(self.results_dir) / "tuning_summary.md")

    @property
    def best_config_yaml(self) -> str:
        return str(Path(self.results_dir) / "best_config.yaml")

    @property
    def plots_dir(self) -> str:
        return str(Path(self.results_dir) / "plots" / "tune")

    def check_ranges(self) -> None:
        for key in ("n_trials", "reports_per_trial", "trial_examples", "heartbeat_seconds"):
            self._at_least(key, 1)
        for key in ("timeout_minutes", "startup_trials", "trial_eval_examples", "max_retries"):
            self._at_least(key, 0)
        _check(self.grace_seconds > self.heartbeat_seconds, "tune.grace_seconds", self.grace_seconds,
               f"must be larger than tune.heartbeat_seconds ({self.heartbeat_seconds})")


@dataclass
class SweepConfig(Section):
    """`loralab sweep`: one factor at a time around the given config, each point on the same budget."""

    name: ClassVar[str] = "sweep"

    # section.key -> values; "x3" means 3 x the config's value.
    factors: dict[str, list] = field(
        default_factory=lambda: {
            "lora.r": [1, 2, 4, 8, 16, 32, 64],
            "train.learning_rate": ["x0.1", "x0.3", "x1", "x3", "x10"],
            "train.batch_size": [1, 2, 4, 8, 16],
        }
    )
    train_examples: int = 240  # every point, whatever its batch size
    eval_examples: int = 96  # eval-loss subset of each point's training run; 0: the whole eval split
    generation_per_task: int = 10  # eval-split questions per task for domain score
    runs_dir: str = "runs/tune/sweep"  # one directory per point, named by its run identity
    results_dir: str = "experiments"  # sensitivity.json, sensitivity.md, plots/sensitivity.png

    @property
    def results_json(self) -> str:
        return str(Path(self.results_dir) / "sensitivity.json")

    @property
    def summary_md(self) -> str:
        return str(Path(self.results_dir) / "sensitivity.md")

    @property
    def plot(self) -> str:
        return str(Path(self.results_dir) / "plots" / "sensitivity.png")

    def check_ranges(self) -> None:
        _check(bool(self.factors), "sweep.factors", self.factors, "give section.key: [values] for at least one factor")
        for key in ("train_examples", "generation_per_task"):
            self._at_least(key, 1)
        self._at_least("eval_examples", 0)


@dataclass
class ServeConfig(Section):
    name: ClassVar[str] = "serve"

    # auto: llama.cpp's llama-server fronted by loralab where llama.cpp is built (make llama-cpp) and
    # can express the model and adapters in GGUF, else the built-in torch engine (which also batches
    # requests for different adapters together); vllm: hands the same adapters to `vllm serve`.
    engine: ServeEngine = "auto"
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    # Model ids a request may name, each a LoRA adapter directory (safetensors only), loaded once at
    # start; the base model is served under its own id. Requests can never load other paths.
    adapters: dict[str, str] = field(default_factory=lambda: {"medical": "lora"})
    merged_model: str = ""  # a merged HF directory (loralab export) to serve instead of base + adapters
    int8: bool = False  # weight-only int8 Linear layers, applied at load (merged model only)
    api_key_env: str = "LORALAB_API_KEY"  # when this variable is set, every /v1 request needs the key
    max_prompt_tokens: int = 1024  # longer prompts: 413
    max_tokens_limit: int = 512  # max_tokens above this: 400
    default_max_tokens: int = 128
    max_batch: int = 16  # requests decoded together in one forward pass
    # When the engine is idle, how long it waits after a request for others sent with it, so that they
    # start together; a request that arrives while the batch decodes joins it at the next step anyway.
    batch_wait_ms: float = 5.0
    # A prompt is read in chunks of this many tokens with a decode step of the running rows between
    # chunks, so a long prompt does not stall the answers being generated.
    prefill_chunk_tokens: int = 256
    max_queue: int = 64  # waiting requests beyond this: 429, never an unbounded backlog
    request_timeout_s: float = 120.0  # 504 when a request has not finished by then
    # On SIGTERM or Ctrl-C: new connections are refused at once, requests in flight get this long to
    # finish (uvicorn's graceful shutdown) before they are cancelled.
    shutdown_grace_s: float = 120.0
    max_body_bytes: int = 1_000_000

    def check_ranges(self) -> None:
        _check(0 <= self.port <= 65535, "serve.port", self.port, "must be a TCP port (0-65535)")
        for key in ("max_prompt_tokens", "max_tokens_limit", "default_max_tokens", "max_batch", "max_queue", "max_body_bytes",
                    "prefill_chunk_tokens"):
            self._at_least(key, 1)
        self._at_least("batch_wait_ms", 0)
        self._at_least("request_timeout_s", 0, exclusive=True)
        self._at_least("shutdown_grace_s", 0)


@dataclass
class ExportConfig(Section):
    name: ClassVar[str] = "export"

    out_dir: str = "models/fine_tuned_model"  # merged/, gguf files
    formats: list[ExportFormat] = field(default_factory=lambda: ["merged", "gguf-f16", "gguf-q8_0", "gguf-q4_1", "gguf-lora"])
    evaluate: bool = True  # measure every format on the test split (perplexity, accuracy, speed)
    generation_per_task: int = 10
    speed_tokens: int = 64  # greedy tokens at batch 1 for the tokens/s column
    results_dir: str = "experiments"  # export_report.md, export_report.json

    @property
    def report_md(self) -> str:
        return str(Path(self.results_dir) / "export_report.md")

    @property
    def report_json(self) -> str:
        return str(Path(self.results_dir) / "export_report.json")

    def check_ranges(self) -> None:
        _check(bool(self.formats), "export.formats", self.formats, "name at least one format")
        for key in ("generation_per_task", "speed_tokens"):
            self._at_least(key, 1)


@dataclass
class CompareConfig(Section):
    """`loralab compare`: each method, the same data and example budget, its own learning rate."""

    name: ClassVar[str] = "compare"

    # A method, or method@int8 / method@nf4 for a base held quantized by bitsandbytes (QLoRA).
    # olora also works (tests/adapters/test_methods.py trains it) but is left out of the default list to keep the
    # full comparison near three hours of a 2-core CPU: it is pissa's sibling, another initialisation from the
    # weights; add it with --set compare.methods=[...]. Run in this order: a partial comparison has the
    # reference points first. Entries are checked against the method registry by `loralab compare`.
    methods: list[str] = field(default_factory=lambda: ["lora", "rslora", "dora", "full", "lora@nf4", "ia3", "pissa",
                                                        "loraplus", "adalora", "lora@int8"])
    seeds: list[int] = field(default_factory=lambda: [42, 43, 44])
    # Per method (an entry like lora@nf4 uses its method's list unless given its own), the learning rates tried
    # (one seed each, scored on the eval split); the best is used for every seed. Methods differ by orders of
    # magnitude here, so one shared lr would be unfair.
    learning_rates: dict[str, list[float]] = field(default_factory=lambda: {
        "lora": [1e-3, 3e-3, 1e-2], "rslora": [3e-4, 1e-3, 3e-3], "dora": [1e-3, 3e-3, 1e-2],
        "pissa": [3e-4, 1e-3, 3e-3], "olora": [3e-4, 1e-3, 3e-3], "loraplus": [3e-4, 1e-3, 3e-3],
        "adalora": [3e-3, 1e-2, 3e-2], "ia3": [3e-3, 1e-2, 3e-2], "full": [1e-5, 3e-5, 1e-4],
    })
    # When the best learning rate is the grid's largest or smallest, try up to this many more past that edge.
    lr_extensions: int = 1
    train_examples: int = 240  # every run, whatever its batch size
    eval_examples: int = 96  # eval-split examples for choosing the learning rate
    generation_per_task: int = 10  # test-split questions per task for domain score
    runs_dir: str = "runs/compare"
    # method_comparison.json/.md, plots/compare/, and compare_runs/: one JSON record per finished run
    # (committed), so a fresh clone continues the comparison without retraining.
    results_dir: str = "experiments"

    @property
    def records_dir(self) -> str:
        return str(Path(self.results_dir) / "compare_runs")

    @property
    def results_json(self) -> str:
        return str(Path(self.results_dir) / "method_comparison.json")

    @property
    def summary_md(self) -> str:
        return str(Path(self.results_dir) / "method_comparison.md")

    @property
    def plots_dir(self) -> str:
        return str(Path(self.results_dir) / "plots" / "compare")

    def check_ranges(self) -> None:
        _check(bool(self.methods), "compare.methods", self.methods, "name at least one method")
        _check(bool(self.seeds), "compare.seeds", self.seeds, "give at least one seed")
        for key in ("train_examples", "generation_per_task"):
            self._at_least(key, 1)
        for key in ("eval_examples", "lr_extensions"):
            self._at_least(key, 0)


@dataclass
class PruneConfig(Section):
    """`loralab prune`: one pruned model (with optional LoRA recovery), or `--study`: every point in
    `study_points`, measured on the test split (src/prune/)."""

    name: ClassVar[str] = "prune"

    method: PruneMethod = "wanda"
    sparsity: float = 0.5  # fraction of weights (unstructured), of heads per KV group, of MLP channels, or of layers
    source: PruneSource = "merged"  # merged: base + the adapter (--adapter, default train.output_dir); base: the base alone
    calibration_examples: int = 64  # first training examples, for Wanda's activation norms and the structured scores
    out_dir: str = "models/pruned"  # the pruned Hugging Face directory (and recovery_adapter/ with --recover)
    recover: bool = False  # then fine-tune a LoRA adapter on the pruned model (the pruned model as the base)
    recovery_examples: int = 240  # the recovery budget: compare's per-run budget, one epoch of these examples
    evaluate: bool = True  # measure source and pruned (and recovered) on the test split
    generation_per_task: int = 10  # test questions per task for domain score
    speed_tokens: int = 64  # greedy tokens at batch 1 for tokens/s
    # The study: method@sparsity points; recovery, and Q8_0 and Q4_1 GGUF, for the points listed in the next two.
    study_points: list[str] = field(default_factory=lambda: [
        "magnitude@0.3", "magnitude@0.5", "wanda@0.3", "wanda@0.5", "wanda-2:4@0.5", "heads@0.33", "mlp@0.25", "mlp@0.5",
        "layers@0.1", "layers@0.2"])
    recovery_points: list[str] = field(default_factory=lambda: ["wanda@0.5", "heads@0.33", "mlp@0.5", "layers@0.2"])
    gguf_points: list[str] = field(default_factory=lambda: ["wanda@0.5", "mlp@0.25"])
    runs_dir: str = "runs/prune"
    results_dir: str = "experiments"  # pruning_study.json/.md, plots/pruning/, prune_runs/ (one record per point)

    @property
    def records_dir(self) -> str:
        return str(Path(self.results_dir) / "prune_runs")

    @property
    def results_json(self) -> str:
        return str(Path(self.results_dir) / "pruning_study.json")

    @property
    def summary_md(self) -> str:
        return str(Path(self.results_dir) / "pruning_study.md")

    @property
    def plots_dir(self) -> str:
        return str(Path(self.results_dir) / "plots" / "pruning")

    def check_ranges(self) -> None:
        _check(0 < self.sparsity < 1, "prune.sparsity", self.sparsity, "must be between 0 and 1 (e.g. 0.5)")
        _check(self.method != "wanda-2:4" or self.sparsity == 0.5, "prune.sparsity", self.sparsity,
               "2:4 keeps 2 of every 4 weights, so its sparsity is 0.5")
        for key in ("calibration_examples", "recovery_examples", "generation_per_task", "speed_tokens"):
            self._at_least(key, 1)
        for point in self.study_points:
            parse_prune_point(point)
        for key in ("recovery_points", "gguf_points"):
            extra = [p for p in getattr(self, key) if p not in self.study_points]
            _check(not extra, f"prune.{key}", extra, "list only points that are in prune.study_points")


def parse_prune_point(point: str) -> tuple[str, float]:
    """A study point "method@sparsity" (e.g. "wanda@0.5") as (method, sparsity); one line when malformed."""
    method, _, value = str(point).partition("@")
    try:
        sparsity = float(value)
    except ValueError:
        sparsity = -1.0
    _check(method in choices(PruneMethod) and 0 < sparsity < 1, "prune.study_points", point,
           f"write method@sparsity with a method of {', '.join(choices(PruneMethod))} and 0 < sparsity < 1")
    return method, sparsity


# Model names of the domains study that a domain cannot take.
MIXTURE, BASE = "mixture", "base"


@dataclass
class DomainsConfig(Section):
    """`loralab domains`: a specialist adapter per domain, one on their mixture, cross-evaluated."""

    name: ClassVar[str] = "domains"

    # name -> dataset (a built-in or a file, as data.dataset takes); 'base' and 'mixture' are reserved.
    datasets: dict[str, str] = field(default_factory=lambda: {
        "medical": "builtin:medical", "legal": "builtin:legal", "shell": "builtin:shell"})
    train_examples: int = 240  # per specialist (one epoch); the mixture trains on all of them
    eval_examples: int = 64  # eval-split examples per adapter for its training eval loss
    generation_per_task: int = 10  # test questions per task for domain score
    general_questions: int = 200  # MMLU questions for the forgetting probe
    runs_dir: str = "runs/domains"
    results_dir: str = "experiments"  # domain_transfer.json/.md, plots/domains/

    @property
    def results_json(self) -> str:
        return str(Path(self.results_dir) / "domain_transfer.json")

    @property
    def summary_md(self) -> str:
        return str(Path(self.results_dir) / "domain_transfer.md")

    @property
    def plots_dir(self) -> str:
        return str(Path(self.results_dir) / "plots" / "domains")

    def check_ranges(self) -> None:
        _check(len(self.datasets) >= 2, "domains.datasets", self.datasets, "give at least two domains (name: dataset)")
        reserved = sorted({MIXTURE, BASE} & set(self.datasets))
        _check(not reserved, "domains.datasets", reserved,
               f"'{MIXTURE}' and '{BASE}' name the mixture adapter and the base model; rename that domain")
        for key in ("train_examples", "eval_examples", "generation_per_task", "general_questions"):
            self._at_least(key, 1)


@dataclass
class InjectConfig(Section):
    """`loralab inject`: can an adapter learn the facts it is shown? (docs/evaluation.md)"""

    name: ClassVar[str] = "inject"

    # Training questions per task (those with a second phrasing): the adapters train on these alone.
    facts_per_task: int = 15
    epochs: list[int] = field(default_factory=lambda: [1, 2, 4, 8])  # passes over the facts, the config's settings
    # What a user can change to make an adapter remember, each trained for max(epochs) passes:
    # a name -> the settings it changes ("section.key": value).
    variants: dict[str, Any] = field(default_factory=lambda: {
        "rank 32": {"lora.r": 32, "lora.alpha": 64},
        "all linear layers": {"lora.target_modules": "all-linear"},
        "learning rate 3e-3": {"train.learning_rate": 3e-3},
    })
    eval_examples: int = 32  # eval-split examples for each run's training eval loss
    general_questions: int = 100  # MMLU questions of the forgetting probe
    runs_dir: str = "runs/inject"
    results_dir: str = "experiments"  # knowledge_injection.json/.md, plots/knowledge_injection.png

    @property
    def results_json(self) -> str:
        return str(Path(self.results_dir) / "knowledge_injection.json")

    @property
    def summary_md(self) -> str:
        return str(Path(self.results_dir) / "knowledge_injection.md")

    @property
    def plot(self) -> str:
        return str(Path(self.results_dir) / "plots" / "knowledge_injection.png")

    def check_ranges(self) -> None:
        for key in ("facts_per_task", "eval_examples", "general_questions"):
            self._at_least(key, 1)
        _check(bool(self.epochs) and all(e >= 1 for e in self.epochs), "inject.epochs", self.epochs,
               "give one or more epoch counts, each at least 1")
        _check(all(isinstance(v, dict) and v for v in self.variants.values()), "inject.variants", self.variants,
               'map each name to the settings it changes, e.g. {"rank 32": {"lora.r": 32}}')


@dataclass
class UiConfig(Section):
    """`loralab ui`: the local web dashboard (docs/ui.md)."""

    name: ClassVar[str] = "ui"

    host: str = "127.0.0.1"  # loopback: the token guards every route, the bind keeps it off the network
    port: int = 0  # 0: a free port
    jobs_dir: str = "runs/ui/jobs"  # each job's config, output and state; its run under runs/ui/<job>/
    max_running_jobs: int = 1  # the rest queue, so two trainings never share the cores

    def check_ranges(self) -> None:
        _check(0 <= self.port <= 65535, "ui.port", self.port, "must be a TCP port (0-65535, 0: a free one)")
        self._at_least("max_running_jobs", 1)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    domains: DomainsConfig = field(default_factory=DomainsConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    inject: InjectConfig = field(default_factory=InjectConfig)
    ui: UiConfig = field(default_factory=UiConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        """Every section's choices and ranges (raises a one-line LoralabError); returns the config."""
        for name in _section_names():
            getattr(self, name).validate()
        return self


def outputs_under(cfg: Config, root: str | Path) -> Config:
    """Point every file a run writes at `root` (each section's output root; its file names derive
    from it), so the run never touches the committed results: what tests and `loralab ui` jobs use."""
    root = Path(root)
    cfg.data.out_dir = str(root / "data")
    cfg.train.run_dir = str(root / "run")
    cfg.train.output_dir = str(root / "lora")
    for section in (cfg.train, cfg.eval, cfg.tune, cfg.sweep, cfg.export, cfg.compare, cfg.domains, cfg.prune, cfg.inject):
        section.results_dir = str(root)
    cfg.tune.runs_dir = str(root / "tune")
    cfg.tune.storage = f"sqlite:///{root / 'tune' / 'study.db'}"
    cfg.sweep.runs_dir = str(root / "tune" / "sweep")
    cfg.compare.runs_dir = str(root / "compare")
    cfg.domains.runs_dir = str(root / "domains")
    cfg.inject.runs_dir = str(root / "inject")
    cfg.export.out_dir = str(root / "export")
    cfg.prune.runs_dir = str(root / "prune")
    cfg.prune.out_dir = str(root / "pruned")
    return cfg


def run_identity(cfg: Config) -> dict[str, dict[str, Any]]:
    """The settings that change what a run learns or the numbers it records, by section: the one
    definition behind checkpoint resume, a tuning study's settings, and the run directories of
    compare, sweep and domains. Fields marked NOT_IDENTITY (paths, the device, speed switches) are
    left out. Values are coerced to their declared types (an int set in code where a float is declared
    names the same run) and JSON-normalised."""
    identity = {}
    for section in IDENTITY_SECTIONS:
        values = getattr(cfg, section)
        hints = typing.get_type_hints(type(values))
        identity[section] = {f.name: _coerce(getattr(values, f.name), hints[f.name], f"{section}.{f.name}")
                             for f in dataclasses.fields(values) if f.metadata.get("identity", True)}
    return json.loads(json.dumps(identity, sort_keys=True, default=str))


def run_digest(cfg: Config) -> str:
    """Ten hex digits naming a run by its identity: a re-run finds (and resumes) only its own directory."""
    return hashlib.sha1(json.dumps(run_identity(cfg), sort_keys=True).encode()).hexdigest()[:10]


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check/convert a YAML value to the field's declared type; one clear error otherwise."""
    if annotation is Any:
        return value
    origin = typing.get_origin(annotation)
    if origin is Literal:
        allowed = choices(annotation)
        if value not in allowed or isinstance(value, bool):
            raise LoralabError(f"{where}={value!r}: expected one of {', '.join(map(str, allowed))}")
        return value
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
    if origin is list:
        if not isinstance(value, list):
            raise LoralabError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_coerce(v, item, where) for v in value]
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


def _apply(section_obj: Section, values: dict[str, Any], where: str) -> None:
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
    """Apply `section.key=value` strings; the value is parsed as YAML (so 1e-4, true, [a, b] work).
    Types and choices are checked here; ranges by `Config.validate` once every override is in."""
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
    """Defaults, then each YAML file in order (later files win), then `--set` overrides; validated."""
    config = Config()
    for path in paths:
        if path is not None:
            _apply_file(config, Path(path))
    return apply_overrides(config, overrides or []).validate()
