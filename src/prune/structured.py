"""Structured pruning: remove whole attention heads, MLP channels or decoder layers, leaving a smaller
dense model of the same architecture that transformers loads from its config alone.

Scores (from calibration.py): a head or an MLP channel scores the summed Wanda score |W| * ||X|| of the
output-projection columns it feeds (o_proj for a head, down_proj for a channel), so "unimportant"
means the same thing as in unstructured pruning; a layer scores its block influence.
Every layer loses the same number of heads (per KV group) and channels: transformers' configs hold
one head count and one intermediate size for all layers, and a uniform model needs no custom code
to load. Why by hand: torch-pruning 1.6.1 (the maintained structural-dependency library) had not
finished tracing a 2-layer transformers 5.24 Llama after 10 minutes; the three removals below are
index slicing of known Llama-family modules, exact and tested against masked equivalents.
"""

from __future__ import annotations

import torch

from loralab.prune.calibration import Calibration, decoder_layers
from loralab.util.errors import LoralabError

STRUCTURES = {"heads": ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
              "mlp": ("mlp", ("gate_proj", "up_proj", "down_proj"))}


def check_architecture(model: torch.nn.Module, method: str) -> None:
    """One line, before anything is changed or written, when the model lacks what `method` removes."""
    try:
        layers = decoder_layers(model)
    except AttributeError:
        raise LoralabError(f"prune.method={method}: {type(model).__name__} has no decoder layers "
                           "(model.get_decoder().layers); use magnitude or wanda") from None
    if method not in STRUCTURES:
        return
    block, names = STRUCTURES[method]
    for layer in layers:
        part = getattr(layer, block, None)
        if part is None or not all(isinstance(getattr(part, n, None), torch.nn.Linear) for n in names):
            raise LoralabError(f"prune.method={method}: {type(model).__name__}'s decoder layers have no "
                               f"{block}.{'/'.join(names)}; use magnitude or wanda")


def _sliced(linear: torch.nn.Linear, dim: int, keep: torch.Tensor) -> torch.nn.Linear:
    """A new Linear keeping `keep` output rows (dim 0) or input columns (dim 1)."""
    weight = linear.weight.detach().index_select(dim, keep).clone()
    out = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None,
                          dtype=weight.dtype, device=weight.device)
    out.weight.data.copy_(weight)
    if linear.bias is not None:
        out.bias.data.copy_(linear.bias.detach() if dim == 1 else linear.bias.detach()[keep])
    return out


def _column_scores(linear: torch.nn.Linear, input_norm: torch.Tensor) -> torch.Tensor:
    return (linear.weight.detach().abs().float() * input_norm.float()[None, :]).sum(0)


def head_plan(config, sparsity: float) -> tuple[int, int]:
    """(query heads per KV group, how many of them each group loses); one line when none or all would go."""
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    group = heads // kv_heads
    drop = round(sparsity * group)
    if not 1 <= drop < group:
        options = ", ".join(f"{d / group:.2f}" for d in range(1, group)) or "none: one query head per KV group"
        raise LoralabError(f"prune.sparsity={sparsity}: heads removes whole query heads from each KV group of "
                           f"{group}; possible sparsities: {options}")
    return group, drop


def mlp_keep(config, sparsity: float) -> int:
    size = config.intermediate_size
    keep = size - round(sparsity * size)
    if keep < 1:
        raise LoralabError(f"prune.sparsity={sparsity}: would remove every MLP channel; use at most {1 - 1 / size:.3f}")
    return keep


def layers_to_drop(config, sparsity: float) -> int:
    total = config.num_hidden_layers
    drop = round(sparsity * total)
    if not 1 <= drop < total:
        raise LoralabError(f"prune.sparsity={sparsity}: removes {drop} of {total} decoder layers; "
                           f"give between {1 / total:.3f} and {(total - 1) / total:.3f}")
    return drop


def check_sparsity(config, method: str, sparsity: float) -> None:
    """The structure-specific limits of `sparsity`, checked before calibration or any write."""
    {"heads": head_plan, "mlp": mlp_keep, "layers": layers_to_drop}.get(method, lambda c, s: None)(config, sparsity)


@torch.no_grad()
def remove_heads(model: torch.nn.Module, sparsity: float, calib: Calibration) -> dict:
    config = model.config
    group, drop = head_plan(config, sparsity)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for index, layer in enumerate(decoder_layers(model)):
        attn = layer.self_attn
        scores = _column_scores(attn.o_proj, calib.input_norms[f"{index}.self_attn.o_proj"])
        per_head = scores.reshape(-1, group, head_dim).sum(-1)  # (kv groups, heads per group)
        kept = torch.topk(per_head, group - drop, dim=1).indices.sort(dim=1).values  # keep the group order
        heads = (kept + torch.arange(per_head.shape[0])[:, None] * group).reshape(-1)
        columns = (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
        attn.q_proj = _sliced(attn.q_proj, 0, columns)
        attn.o_proj = _sliced(attn.o_proj, 1, columns)
        for name, value in (("num_heads", len(heads)), ("num_key_value_groups", group - drop)):
            if hasattr(attn, name):
                setattr(attn, name, value)
    config.head_dim = head_dim  # explicit: hidden_size / heads no longer gives it
    config.num_attention_heads = per_head.shape[0] * (group - drop)
    return {"query_heads_per_layer": config.num_attention_heads, "removed_per_kv_group": drop}


@torch.no_grad()
def remove_mlp_channels(model: torch.nn.Module, sparsity: float, calib: Calibration) -> dict:
    keep_n = mlp_keep(model.config, sparsity)
    for index, layer in enumerate(decoder_layers(model)):
        mlp = layer.mlp
        scores = _column_scores(mlp.down_proj, calib.input_norms[f"{index}.mlp.down_proj"])
        keep = torch.topk(scores, keep_n).indices.sort().values
        mlp.gate_proj, mlp.up_proj = _sliced(mlp.gate_proj, 0, keep), _sliced(mlp.up_proj, 0, keep)
        mlp.down_proj = _sliced(mlp.down_proj, 1, keep)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = keep_n
    model.config.intermediate_size = keep_n
    return {"intermediate_size": keep_n}


@torch.no_grad()
def remove_layers(model: torch.nn.Module, sparsity: float, calib: Calibration) -> dict:
    layers = decoder_layers(model)
    drop = layers_to_drop(model.config, sparsity)
    removed = sorted(sorted(range(len(layers)), key=lambda i: calib.layer_influence[i])[:drop])
    kept = [i for i in range(len(layers)) if i not in removed]
    model.get_decoder().layers = torch.nn.ModuleList(layers[i] for i in kept)
    for new_index, layer in enumerate(model.get_decoder().layers):
        layer.self_attn.layer_idx = new_index  # the KV cache is indexed by it
    config = model.config
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in kept]
    return {"removed_layers": removed, "block_influence": [round(v, 5) for v in calib.layer_influence]}


REMOVERS = {"heads": remove_heads, "mlp": remove_mlp_channels, "layers": remove_layers}
