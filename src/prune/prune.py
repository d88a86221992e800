"""`loralab prune`: one pruned model as a plain Hugging Face directory, its report, and optionally a
LoRA adapter trained on it to recover what pruning lost (the pruned model as the adapter's base).

Every check that can fail (method, sparsity for this architecture, the adapter, the data) runs
before calibration, and the directory is written atomically: bad input leaves nothing behind.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from loralab.config import Config
from loralab.data.chat import ensure_chat_template
from loralab.data.prepare import load_split
from loralab.model_utils import count_parameters, load_adapter, load_base_model, merge_adapter, resolve_model_dir
from loralab.prune.calibration import calibrate, calibration_batches
from loralab.prune.measure import measure_directory, measure_source, recover
from loralab.prune.structured import REMOVERS, check_architecture, check_sparsity
from loralab.prune.unstructured import decoder_linears, prune_unstructured
from loralab.util import atomic_io, provenance
from loralab.util.errors import LoralabError

REPORT_FILE = "prune_report.json"
RECOVERY_ROOT = "recovery"  # the recovery run: recovery/run (checkpoints) and recovery/adapter


def load_source(cfg: Config, adapter_dir: str | Path | None):
    """The model to prune: base + adapter merged (prune.source=merged) or the base; and its tokenizer."""
    loaded = load_base_model(cfg.model, torch.device("cpu"))
    ensure_chat_template(loaded.tokenizer)
    if cfg.prune.source == "base":
        return loaded.model.eval(), loaded.tokenizer, loaded.base_name
    adapter_dir = Path(adapter_dir or cfg.train.output_dir)  # its presence is checked first (check_before_loading)
    return merge_adapter(load_adapter(loaded.model, adapter_dir)).eval(), loaded.tokenizer, f"{loaded.base_name}+{adapter_dir}"


def check_adapter(cfg: Config, adapter_dir: str | Path | None) -> None:
    if cfg.prune.source == "merged" and not (Path(adapter_dir or cfg.train.output_dir) / "adapter_config.json").is_file():
        raise LoralabError(f"{adapter_dir or cfg.train.output_dir}: no adapter_config.json (train first, pass --adapter, "
                           "or prune the base with --source base)")


def check_before_loading(cfg: Config, adapter_dir: str | Path | None) -> None:
    """What the model's config and the file system alone decide, before the weights are read."""
    from transformers import AutoConfig

    check_adapter(cfg, adapter_dir)
    model_dir, _ = resolve_model_dir(cfg.model)
    check_sparsity(AutoConfig.from_pretrained(model_dir), cfg.prune.method, cfg.prune.sparsity)


def prune_identity(cfg: Config, adapter_dir: str | Path | None) -> dict:
    """What decides the pruned weights: a directory written with the same identity is reused, so that
    running the command again after a killed recovery resumes the recovery instead of starting over."""
    import hashlib

    p = cfg.prune
    adapter = Path(adapter_dir or cfg.train.output_dir) / "adapter_model.safetensors"
    digest = hashlib.sha1(adapter.read_bytes()).hexdigest()[:12] if p.source == "merged" else None
    return {"model": cfg.model.name_or_path, "adapter_sha1": digest, "method": p.method, "sparsity": p.sparsity,
            "calibration_examples": p.calibration_examples, "data": cfg.data.out_dir, "max_length": cfg.train.max_length}


def _reusable(out: Path, identity: dict) -> dict | None:
    report_file = out / REPORT_FILE
    if (out / "config.json").is_file() and report_file.is_file():
        report = json.loads(report_file.read_text())
        if report.get("identity") == identity:
            return report
    return None


def prune_model(model: torch.nn.Module, tokenizer, method: str, sparsity: float, calibration_rows: list[dict],
                max_length: int) -> dict:
    """Prune `model` in place; returns what was done (achieved sparsity, parameters, structure)."""
    check_architecture(model, method)
    check_sparsity(model.config, method, sparsity)
    _, params_before = count_parameters(model)
    started = time.perf_counter()
    calib = None
    if method != "magnitude":
        if not calibration_rows:
            raise LoralabError("prune: the training split is empty; run `loralab prepare` first")
        calib = calibrate(model, calibration_batches(tokenizer, calibration_rows, max_length))
    report: dict = {"method": method, "requested_sparsity": sparsity}
    if method in REMOVERS:
        report["structure"] = REMOVERS[method](model, sparsity, calib)
    else:
        per_layer = prune_unstructured(model, method, sparsity, calib.input_norms if calib else None)
        report["per_layer_sparsity"] = {"min": min(per_layer.values()), "max": max(per_layer.values())}
    _, params_after = count_parameters(model)
    weights = [m.weight for m in decoder_linears(model).values()]
    report.update({
        "parameters_before": params_before, "parameters_after": params_after,
        "decoder_linear_sparsity": float(sum((w == 0).sum() for w in weights) / sum(w.numel() for w in weights)),
        "calibration_tokens": calib.tokens if calib else 0,
        "prune_seconds": round(time.perf_counter() - started, 2),
    })
    _check_config_reloads(model)
    return report


def _check_config_reloads(model: torch.nn.Module) -> None:
    """transformers validates a config when it loads it (e.g. hidden_size divisible by the head count):
    find out now, before anything is written, rather than from a directory that will not load."""
    config = model.config
    try:
        type(config).from_dict(config.to_dict())
    except Exception as exc:  # noqa: BLE001
        raise LoralabError(f"prune: the pruned {type(model).__name__} would not load ({exc}); "
                           "choose another sparsity or method") from None


def save_pruned(model: torch.nn.Module, tokenizer, out_dir: str | Path, report: dict) -> Path:
    with atomic_io.staged_dir(out_dir) as staged:
        model.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)
        atomic_io.write_json(staged / REPORT_FILE, report)
    return Path(out_dir)


def prune_to_directory(cfg: Config, adapter_dir: str | Path | None, method: str, sparsity: float, out: str | Path,
                       extra: dict) -> dict:
    """Load the source, prune it, write the directory (with `extra` in its report); the verb and the study."""
    model, tokenizer, source_name = load_source(cfg, adapter_dir)
    rows = load_split(cfg.data.out_dir, "train")[: cfg.prune.calibration_examples] if method != "magnitude" else []
    report = {"source": source_name, **extra, **prune_model(model, tokenizer, method, sparsity, rows, cfg.train.max_length)}
    save_pruned(model, tokenizer, out, report)
    return report


def prune(cfg: Config, adapter_dir: str | Path | None = None) -> dict:
    """The verb: load, prune, write; then recovery and the test-split measurements when configured."""
    p = cfg.prune
    check_before_loading(cfg, adapter_dir)
    identity, out = prune_identity(cfg, adapter_dir), Path(p.out_dir)
    report = _reusable(out, identity)
    if report is None:
        report = prune_to_directory(cfg, adapter_dir, p.method, p.sparsity, out, {"identity": identity})
    else:
        print(f"{out}/ already holds this pruning; reusing it", flush=True)
    print(f"pruned {p.method} at {p.sparsity}: {report['parameters_before']:,} -> {report['parameters_after']:,} "
          f"parameters, decoder Linear sparsity {100 * report['decoder_linear_sparsity']:.1f}% -> {out}/", flush=True)
    if p.recover:
        record = recover(cfg, out, out / RECOVERY_ROOT)
        report["recovery"] = {"adapter": str(out / RECOVERY_ROOT / "adapter"), "eval_loss": record.eval_loss,
                              "train_examples": record.trial_examples, "wall_seconds": record.wall_seconds}
    if p.evaluate:
        report["quality"] = {"source": measure_source(cfg, adapter_dir), "pruned": measure_directory(cfg, out)}
        if p.recover:
            report["quality"]["recovered"] = measure_directory(cfg, out, out / RECOVERY_ROOT / "adapter")
    report["provenance"] = provenance.record(cfg.to_dict())
    atomic_io.write_json(out / REPORT_FILE, report)
    return report
