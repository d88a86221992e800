"""What `loralab serve` serves: the base model loaded once (through loralab.model_utils) with every
configured adapter on it, or one merged model; then the engine that decodes for them."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from loralab.config import Config, ServeConfig
from loralab.data.chat import ensure_chat_template
from loralab.deploy.serve.engine import Engine
from loralab.deploy.serve.int8 import quantize_int8
from loralab.deploy.serve.protocol import Limits
from loralab.model_utils import load_base_model, resolve_autocast_dtype, resolve_device
from loralab.util.errors import LoralabError


@dataclass
class Served:
    engine: Engine
    tokenizer: object
    base_id: str  # the model id that means "no adapter"
    adapters: list[str]
    settings: ServeConfig
    api_key: str | None

    @property
    def model_ids(self) -> list[str]:
        return [self.base_id, *self.adapters]

    def limits(self) -> Limits:
        return Limits(model_ids=tuple(self.model_ids), control_tokens=tuple(self.tokenizer.all_special_tokens),
                      max_tokens_limit=self.settings.max_tokens_limit,
                      default_max_tokens=self.settings.default_max_tokens)


def model_id(path: str) -> str:
    return Path(path.rstrip("/")).name


def _load_merged(cfg: Config, device):
    s = cfg.serve
    loaded = load_base_model(dataclasses.replace(cfg.model, name_or_path=s.merged_model), device)
    model = loaded.model
    if s.int8:
        model = quantize_int8(model)  # weight-only int8
    return model, loaded.tokenizer, model_id(s.merged_model), []


def _load_with_adapters(cfg: Config, device):
    """The base model, then each adapter onto it under its model id (safetensors only: no pickles)."""
    from peft import PeftModel

    s = cfg.serve
    if s.int8:
        raise LoralabError("serve.int8 needs serve.merged_model: LoRA layers cannot sit on dynamically quantized Linear layers")
    loaded = load_base_model(cfg.model, device)
    model, base_id = loaded.model, model_id(cfg.model.name_or_path)
    for index, (name, directory) in enumerate(s.adapters.items()):
        if index == 0:
            model = PeftModel.from_pretrained(model, directory, adapter_name=name)
        else:
            model.load_adapter(directory, adapter_name=name)
    return model, loaded.tokenizer, base_id, list(s.adapters)


def _check_adapter_names(cfg: Config) -> None:
    """Before any engine loads: every adapter a safetensors directory under a name that is not the base's."""
    if cfg.serve.merged_model:
        return
    for name, directory in cfg.serve.adapters.items():
        if name == model_id(cfg.model.name_or_path):
            raise LoralabError(f"serve.adapters: '{name}' is the base model's id; pick another name")
        weights = Path(directory) / "adapter_model.safetensors"
        if not weights.is_file():
            raise LoralabError(f"serve.adapters.{name}: {weights} not found (only safetensors adapters are served)")


def _torch_engine(cfg: Config, device) -> tuple[Engine, object, str, list[str]]:
    s = cfg.serve
    if s.int8 and device.type != "cpu":
        raise LoralabError("serve.int8 is PyTorch dynamic quantization, which runs on the CPU only: set model.device=cpu")
    model, tokenizer, base_id, adapters = (_load_merged if s.merged_model else _load_with_adapters)(cfg, device)
    ensure_chat_template(tokenizer)
    # Weights cast once to bf16 where the CPU has native bf16 (fp32 where it would be emulated). Not
    # autocast: that re-casts every weight on every decoding step, which at batch 1 costs more than
    # the matmuls themselves.
    dtype = resolve_autocast_dtype(cfg.model.precision, device) if not s.int8 else None
    if dtype is not None:
        model = model.to(dtype)
    engine = Engine(model, tokenizer, adapters, s.max_batch, s.max_queue, batch_wait_s=s.batch_wait_ms / 1000,
                    prefill_chunk=s.prefill_chunk_tokens)
    return engine, tokenizer, base_id, adapters


def _gateway_engine(cfg: Config, device) -> tuple[object, object, str, list[str]]:
    from loralab.deploy.serve.llama_gateway import load_llama_cpp

    s = cfg.serve
    engine, tokenizer = load_llama_cpp(cfg, device)
    ensure_chat_template(tokenizer)
    adapters = [] if s.merged_model else list(s.adapters)
    return engine, tokenizer, model_id(s.merged_model or cfg.model.name_or_path), adapters


def load_served(cfg: Config, say=print) -> Served:
    """Load what cfg.serve names on the engine it asks for (`auto`: llama.cpp where it is built and
    can express the model and adapters, otherwise torch, after one line saying why), not yet started."""
    s = cfg.serve
    device = resolve_device(cfg.model.device)
    _check_adapter_names(cfg)
    if s.engine == "vllm":
        raise LoralabError("serve.engine=vllm is launched by `loralab serve`, not loaded in-process")
    built = None
    if s.engine in ("auto", "llama.cpp"):
        try:
            built = _gateway_engine(cfg, device)
            say("engine: llama.cpp (llama-server, fronted by loralab)")
        except LoralabError as why:
            if s.engine == "llama.cpp":
                raise LoralabError(f"serve.engine=llama.cpp: {why}") from None
            say(f"engine: torch, because llama.cpp cannot serve this here: {why}")
    if built is None:
        built = _torch_engine(cfg, device)
        if s.engine == "torch":
            say("engine: torch")
    engine, tokenizer, base_id, adapters = built
    return Served(engine, tokenizer, base_id, adapters, s, os.environ.get(s.api_key_env) or None)
