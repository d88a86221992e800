"""A PEFT LoRA adapter as a llama.cpp GGUF adapter (`llama-server --lora`, Ollama's ADAPTER), and back.

The file is what llama.cpp's convert_lora_to_gguf.py writes: general.type "adapter", adapter.type
"lora", adapter.lora.alpha, and per adapted matrix `blk.N.<name>.weight.lora_a` (PEFT's lora_A,
r x in) and `.lora_b` (lora_B, out x r), with Q and K rows permuted as in the base GGUF. llama.cpp
scales each pair by alpha / rank (rank read from the tensor). Why by hand: that converter is not on
any registry and needs the base model's HF directory; this needs only the adapter.

Only what llama.cpp can apply exactly is written: plain LoRA (rsLoRA and per-module ranks or alphas
folded into lora_b), PiSSA/OLoRA once saved converted. DoRA's magnitudes, IA3, LoHa, LoKr and an
unconverted AdaLoRA are refused with one line (export the merged GGUF for those).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from loralab.deploy.gguf import HF_TO_GGUF, permute_qk
from loralab.util.errors import LoralabError

TENSOR_TYPES = ("f32", "f16")


def read_peft_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, tensors) of a PEFT adapter directory, refusing what llama.cpp cannot apply."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    kind = config.get("peft_type", "?")
    if kind != "LORA":
        raise LoralabError(f"{adapter_dir}: a {kind} adapter has no llama.cpp LoRA form (export gguf-f16, the merged model)")
    if config.get("use_dora"):
        raise LoralabError(f"{adapter_dir}: DoRA's magnitude vectors have no llama.cpp form (export gguf-f16, the merged model)")
    if config.get("modules_to_save") or config.get("bias", "none") != "none":
        raise LoralabError(f"{adapter_dir}: modules_to_save or trained biases have no llama.cpp adapter form (export gguf-f16)")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise LoralabError(f"{weights}: missing (save the adapter with safe_serialization, as loralab does)")
    return config, load_file(str(weights))


def _scaling(config: dict, module_key: str, rank: int) -> float:
    """PEFT's scale for one module: alpha / r (alpha / sqrt(r) for rsLoRA), alpha_pattern applied."""
    alpha = next((value for key, value in (config.get("alpha_pattern") or {}).items()
                  if re.match(rf"(.*\.)?({key})$", module_key)), config["lora_alpha"])  # PEFT's own matching rule
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


LoraPair = tuple[str, torch.Tensor, torch.Tensor, float]  # GGUF base name, A, B, scale


def lora_pairs(config: dict, tensors: dict[str, torch.Tensor], model_config) -> list[LoraPair]:
    """(GGUF base name, A, B, scale) per adapted matrix, B's rows permuted like the base GGUF's Q/K."""
    pairs = []
    for key, a in sorted(tensors.items()):
        if not key.endswith("lora_A.weight"):
            continue
        module_key = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        parts = module_key.split(".")  # model.layers.N.self_attn.q_proj
        if len(parts) != 5 or parts[:2] != ["model", "layers"] or parts[-1] not in HF_TO_GGUF:
            raise LoralabError(f"adapter module {module_key!r}: llama.cpp adapters cover the decoder's linear layers only "
                               f"({', '.join(HF_TO_GGUF)}); export gguf-f16, the merged model")
        b = tensors[key.replace("lora_A", "lora_B")]
        gguf_name = f"blk.{parts[2]}.{HF_TO_GGUF[parts[-1]]}.weight"
        if parts[-1] in ("q_proj", "k_proj"):
            heads = model_config.num_attention_heads if parts[-1] == "q_proj" else model_config.num_key_value_heads
            b = torch.from_numpy(permute_qk(b.float().numpy(), heads))
        pairs.append((gguf_name, a.float(), b.float(), _scaling(config, module_key, a.shape[0])))
    if not pairs:
        raise LoralabError("the adapter has no lora_A/lora_B weights")
    return pairs


def write_gguf_lora(adapter_dir: str | Path, model_config, path: str | Path, tensor_type: str = "f32") -> Path:
    """Write the adapter at `adapter_dir` (for a base with `model_config`) as a llama.cpp GGUF adapter."""
    import gguf

    if getattr(model_config, "model_type", "") != "llama":
        raise LoralabError(f"GGUF adapters support the llama architecture; this base is {model_config.model_type!r}")
    if tensor_type not in TENSOR_TYPES:
        raise LoralabError(f"GGUF adapter tensor type {tensor_type!r}: expected one of {', '.join(TENSOR_TYPES)}")
    config, tensors = read_peft_adapter(adapter_dir)
    pairs = lora_pairs(config, tensors, model_config)
    uniform = len({(a.shape[0], scale) for _, a, _, scale in pairs}) == 1
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(staging), "llama")
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        # One alpha for the whole file: llama.cpp scales by alpha / rank. Where modules differ (rsLoRA
        # is uniform too; rank or alpha patterns are not), the scale goes into lora_b and alpha is 0,
        # which llama.cpp reads as "scale 1".
        rank, scale = pairs[0][1].shape[0], pairs[0][3]
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(scale * rank) if uniform else 0.0)
        dtype = np.float16 if tensor_type == "f16" else np.float32
        for name, a, b, module_scale in pairs:
            writer.add_tensor(f"{name}.lora_a", a.numpy().astype(dtype))
            writer.add_tensor(f"{name}.lora_b", (b if uniform else b * module_scale).numpy().astype(dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    except BaseException:
        writer.close()
        staging.unlink(missing_ok=True)
        raise
    os.replace(staging, path)  # never half a file under the final name
    return path


def read_gguf_lora(path: str | Path, model_config) -> dict[str, torch.Tensor]:
    """The deltas (out x in, scale applied, Q/K rows back in HF order) per HF weight name: what the
    file makes llama.cpp add to each base matrix. Used to verify a written adapter."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    alpha = float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents())
    tensors = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)) for t in reader.tensors}
    to_hf = {v: k for k, v in HF_TO_GGUF.items()}
    deltas = {}
    for name, a in tensors.items():
        if not name.endswith(".lora_a"):
            continue
        base = name.removesuffix(".lora_a")
        b = tensors[f"{base}.lora_b"]
        delta = b @ a * (alpha / a.shape[0] if alpha else 1.0)
        _, layer, gguf_module, _ = base.split(".")
        hf = to_hf[gguf_module]
        if hf in ("q_proj", "k_proj"):  # undo the permutation (its inverse is the same reshape, transposed)
            heads = model_config.num_attention_heads if hf == "q_proj" else model_config.num_key_value_heads
            delta = torch.from_numpy(unpermute_qk(delta.numpy(), heads))
        group = "self_attn" if hf.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
        deltas[f"model.layers.{layer}.{group}.{hf}.weight"] = delta
    return deltas


def unpermute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    return weight.reshape(n_head, weight.shape[0] // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
