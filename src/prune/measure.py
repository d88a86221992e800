"""What a pruned model is worth: test-split quality, parameters, file size, peak memory and greedy
tokens/s, each model measured in its own process so its peak memory is its own; and LoRA recovery.
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path

import torch

from loralab.config import Config
from loralab.studies.records import RunRecord
from loralab.studies.runner import adapter_megabytes, in_fresh_process, run_trial
from loralab.studies.space import Budget
from loralab.util.resources import PeakRss

SPEED_REPEATS = 5


def _quality(cfg: Config, model, tokenizer) -> dict:
    from loralab.data.prepare import load_split
    from loralab.deploy.export import greedy_tokens_per_s
    from loralab.metrics.evaluate import measure_quality

    rows = load_split(cfg.data.out_dir, cfg.eval.split)
    quality = measure_quality(cfg, model, tokenizer, rows, cfg.prune.generation_per_task, torch.device("cpu"), None)
    return {"test_perplexity": quality["perplexity"], "domain_accuracy": quality["domain_accuracy"],
            "domain_accuracy_se": quality["domain_accuracy_se"], "generation_examples": quality["generation_examples"],
            "tokens_per_s_batch1": round(greedy_tokens_per_s(model, tokenizer, cfg.prune.speed_tokens), 1),
            "parameters": sum(p.numel() for p in model.parameters())}


def _load(cfg: Config, model_dir: str | None, adapter_dir: str | None, merge: bool, gguf: str | None):
    from loralab.data.chat import ensure_chat_template
    from loralab.model_utils import load_adapter, load_base_model

    if gguf is not None:
        from loralab.deploy.gguf import load_gguf

        model, tokenizer = load_gguf(gguf)
    else:
        loaded = load_base_model(cfg.model if model_dir is None else pruned_config(cfg, model_dir).model, torch.device("cpu"))
        model, tokenizer = loaded.model, loaded.tokenizer
        if adapter_dir is not None:
            model = load_adapter(model, adapter_dir)
            model = model.merge_and_unload() if merge else model
    ensure_chat_template(tokenizer)
    return model.eval(), tokenizer


def _measure_in_process(cfg: Config, model_dir: str | None, adapter_dir: str | None, merge: bool, gguf: str | None) -> dict:
    with PeakRss() as rss:
        model, tokenizer = _load(cfg, model_dir, adapter_dir, merge, gguf)
        result = _quality(cfg, model, tokenizer)
    return {**result, "peak_rss_mb": round(rss.peak_mb, 1)}


def _speeds_in_process(cfg: Config, variants: dict[str, dict[str, str | None]]) -> dict[str, dict]:
    from loralab.deploy.export import greedy_tokens_per_s

    models = {name: _load(cfg, where.get("model_dir"), where.get("adapter_dir"), True, where.get("gguf"))
              for name, where in variants.items()}  # adapters merged, as they would be deployed
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(SPEED_REPEATS):
        for name, (model, tokenizer) in models.items():
            runs[name].append(round(greedy_tokens_per_s(model, tokenizer, cfg.prune.speed_tokens), 2))
    return {name: {"tokens_per_s_batch1": round(statistics.median(r), 1), "runs": r} for name, r in runs.items()}


def measure_speeds(cfg: Config, variants: dict[str, dict[str, str | None]]) -> dict[str, dict]:
    """Greedy tokens/s at batch 1 of every variant (name -> model_dir / adapter_dir / gguf), all loaded in one
    fresh process and measured in SPEED_REPEATS interleaved rounds; the median per variant. Why interleaved:
    on a shared 2-core machine the speed drifts by 30 % over minutes (measured: one pruned model at 10.1
    tokens/s in the study, 16.1 alone ten minutes later), so models measured minutes apart do not compare."""
    return in_fresh_process(_speeds_in_process, cfg, variants)


def pruned_config(cfg: Config, pruned_dir: str | Path) -> Config:
    """The same settings with the pruned directory as the base model (for recovery and evaluation)."""
    out = copy.deepcopy(cfg)
    out.model.name_or_path = str(pruned_dir)
    return out


def measure_directory(cfg: Config, model_dir: str | Path, adapter_dir: str | Path | None = None) -> dict:
    """A pruned directory (with a recovery adapter on top, unmerged, when given)."""
    result = in_fresh_process(_measure_in_process, cfg, str(model_dir), str(adapter_dir) if adapter_dir else None, False, None)
    return {**result, "size_mb": adapter_megabytes(model_dir)}  # model*.safetensors: the whole model


def measure_source(cfg: Config, adapter_dir: str | Path | None) -> dict:
    """The unpruned reference: base + adapter merged (prune.source=merged), or the base."""
    adapter = None if cfg.prune.source == "base" else str(adapter_dir or cfg.train.output_dir)
    return in_fresh_process(_measure_in_process, cfg, None, adapter, True, None)


def measure_gguf(cfg: Config, gguf_path: str | Path) -> dict:
    result = in_fresh_process(_measure_in_process, cfg, None, None, False, str(gguf_path))
    return {**result, "size_mb": round(Path(gguf_path).stat().st_size / 2**20, 2)}


def recover(cfg: Config, pruned_dir: str | Path, root: Path) -> RunRecord:
    """A LoRA adapter trained on the pruned model (as its base) with `prune.recovery_examples` examples,
    the training settings of `cfg` otherwise; resumed if a previous recovery run was interrupted."""
    return in_fresh_process(_recover_in_process, pruned_config(cfg, pruned_dir), root,
                            Budget(cfg.prune.recovery_examples, cfg.train.eval_examples))


def _recover_in_process(cfg: Config, root: Path, budget: Budget) -> RunRecord:
    record, _ = run_trial(cfg, {}, root, budget, reports=1, resume=True)
    return record
