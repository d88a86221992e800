"""Write a merged Llama-architecture model as GGUF (F16, Q8_0, Q4_1, Q4_0) with its tokenizer and chat
template, for llama.cpp and Ollama.

Why by hand: the converter people use (llama.cpp's convert_hf_to_gguf.py) is not on any package
registry. The `gguf` package (from llama.cpp) provides the file writer and the quantizers; this
module maps tensor names, applies llama.cpp's Q/K row permutation, and writes the metadata the
runtime needs (architecture hyperparameters, BPE vocabulary, merges, special ids, template).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from loralab.util.errors import LoralabError

QUANT_TYPES = ("f16", "q8_0", "q4_1", "q4_0")


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta or getattr(config, "rope_theta", 10000.0))


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores Q and K rows interleaved per head for its RoPE kernel (as its converter does);
    transformers undoes this when it loads a GGUF."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def tensor_map(model) -> list[tuple[str, torch.Tensor, str]]:
    """(GGUF name, tensor, kind) for a LlamaForCausalLM; kind is "norm", "embed" or "linear"."""
    config = model.config
    state = model.state_dict()
    out = [("token_embd.weight", state["model.embed_tokens.weight"], "embed")]
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for layer in range(config.num_hidden_layers):
        for hf, gg in names.items():
            tensor = state[f"model.layers.{layer}.{hf}.weight"]
            out.append((f"blk.{layer}.{gg}.weight", tensor, "norm" if gg.endswith("norm") else "linear"))
    out.append(("output_norm.weight", state["model.norm.weight"], "norm"))
    if not config.tie_word_embeddings:
        out.append(("output.weight", state["lm_head.weight"], "embed"))
    return out


def _tokenizer_fields(tokenizer, vocab_size: int) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LoralabError("GGUF export needs a fast (tokenizer.json) tokenizer")
    spec = json.loads(backend.to_str())
    if spec["model"]["type"] != "BPE":
        raise LoralabError(f"GGUF export supports byte-level BPE tokenizers; this one is {spec['model']['type']}")
    id_to_token = {i: t for t, i in spec["model"]["vocab"].items()}
    types = {i: 1 for i in id_to_token}  # 1 normal
    for added in spec.get("added_tokens", []):
        id_to_token[added["id"]] = added["content"]
        types[added["id"]] = 3 if added.get("special") else 4  # 3 control, 4 user-defined
    size = max(vocab_size, max(id_to_token) + 1)
    tokens = [id_to_token.get(i, f"[PAD{i}]") for i in range(size)]
    token_types = [types.get(i, 5) for i in range(size)]  # 5 unused
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return {"tokens": tokens, "types": token_types, "merges": merges}


HF_TO_GGUF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def write_gguf(model, tokenizer, path: str | Path, qtype: str, name: str, pre_tokenizer: str = "default",
               adapted: set[str] = frozenset()) -> Path:
    """Write `model` (a merged LlamaForCausalLM) as one GGUF file of `qtype` (f16, q8_0, q4_1, q4_0).

    `adapted`: the module names the adapter changed (q_proj, ...). In 4-bit files they stay Q8_0.
    Why: the bundled base is itself Q4_1, so its untouched matrices re-quantize to Q4_1 exactly,
    while a merged LoRA delta is off that grid and 4-bit rounding erases much of what was learned
    (measured on SmolLM2: mean KL 1.0 from base + adapter with every matrix at Q4_1)."""
    import gguf

    config = model.config
    if getattr(config, "model_type", "") != "llama":
        raise LoralabError(f"GGUF export supports the llama architecture; this model is {config.model_type!r} "
                           f"(export the merged safetensors directory and convert it with llama.cpp's converter)")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}  # v5 name, v4 name
    if (rope.get("rope_type") or rope.get("type") or "default") != "default":
        raise LoralabError("GGUF export does not write RoPE scaling yet; this model uses it (export the merged directory)")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        raise LoralabError("GGUF export needs head_dim x heads == hidden_size; this model differs (export the merged directory)")
    if qtype not in QUANT_TYPES:
        raise LoralabError(f"GGUF type {qtype!r}: expected one of {', '.join(QUANT_TYPES)}")
    G = gguf.GGMLQuantizationType
    # 4-bit: Q4_1 (a scale and a minimum per 32 weights) by default, as in the bundled GGUF itself;
    # Q4_0 (scale only) loses much more on a model this small (see experiments/export_report.md).
    # The k-quants need rows of 256 and this model's rows are 576 wide, so they do not apply.
    linear_type = {"f16": G.F16, "q8_0": G.Q8_0, "q4_1": G.Q4_1, "q4_0": G.Q4_0}[qtype]
    embed_type = G.F16 if qtype == "f16" else G.Q8_0  # the tied embedding is also the output head: keep it precise
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype]

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(staging), "llama")
    try:
        adapted_gguf = {HF_TO_GGUF[m] for m in adapted if m in HF_TO_GGUF} if qtype.startswith("q4") else set()
        _write(writer, model, tokenizer, name, pre_tokenizer, linear_type, embed_type, file_type, head_dim, adapted_gguf)
    except BaseException:
        writer.close()
        staging.unlink(missing_ok=True)
        raise
    os.replace(staging, path)  # a killed export never leaves half a GGUF under the final name
    return path


def _write(writer, model, tokenizer, name: str, pre_tokenizer: str, linear_type, embed_type, file_type, head_dim: int,
           keep_q8: set[str]) -> None:
    import gguf

    G = gguf.GGMLQuantizationType
    config = model.config
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)

    vocab = _tokenizer_fields(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    for setter, value in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_pad_token_id, tokenizer.pad_token_id), (writer.add_unk_token_id, tokenizer.unk_token_id)):
        if value is not None:
            setter(value)
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)

    for gguf_name, tensor, kind in tensor_map(model):
        data = tensor.detach().float().cpu().numpy()
        if gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_attention_heads if "attn_q" in gguf_name else config.num_key_value_heads
            data = permute_qk(data, heads)
        target = G.F32 if kind == "norm" else embed_type if kind == "embed" else linear_type
        if kind == "linear" and gguf_name.split(".")[2] in keep_q8:
            target = G.Q8_0
        if target == G.F32:
            writer.add_tensor(gguf_name, data.astype(np.float32))
        elif target == G.F16:
            writer.add_tensor(gguf_name, data.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, target), raw_dtype=target)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def load_gguf(path: str | Path):
    """Load a GGUF back through transformers (dequantized to fp32): (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    path = Path(path)
    kwargs = {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path.parent, quantization_config=GgufConfig(dequantize=True),
                                                 dtype=torch.float32, **kwargs)
    return model.eval(), tokenizer
