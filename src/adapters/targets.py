"""Which modules of a model an adapter wraps: the attention projections of known architectures,
every linear layer, or names the user gives (checked against the model)."""

from __future__ import annotations

import torch

from loralab.util.errors import LoralabError

ATTENTION_TARGETS = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),  # Llama, Mistral, Qwen, Gemma, SmolLM
    ("c_attn", "c_proj"),  # GPT-2 (Conv1D); c_proj is restricted to attention below
    ("query_key_value", "dense"),  # GPT-NeoX, Falcon
    ("Wqkv", "out_proj"),  # MPT / Phi-style
)


def _adaptable_leaves(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Linear and GPT-2 Conv1D leaves, excluding the output head."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head
    }


def find_target_modules(model: torch.nn.Module, spec) -> list[str]:
    """Module-name suffixes for LoRA. spec: "auto" (attention), "all-linear", or explicit names
    (a list, or one comma-separated string)."""
    leaves = _adaptable_leaves(model)
    suffixes = {name.rsplit(".", 1)[-1] for name in leaves}
    if spec == "all-linear":
        return sorted(suffixes)
    if spec == "auto":
        for family in ATTENTION_TARGETS:
            if set(family) <= suffixes:
                if family[0] == "c_attn":  # GPT-2's c_proj also names an MLP layer: attention only
                    return ["attn.c_attn", "attn.c_proj"]
                return list(family)
        raise LoralabError(
            f"no known attention projections in {type(model).__name__}; "
            f"set lora.target_modules to some of {sorted(suffixes)}"
        )
    # A comma-separated string ("q_proj,v_proj") lets a search space offer module sets as choices.
    names = None
    if isinstance(spec, str):
        names = [n.strip() for n in spec.split(",") if n.strip()]
    elif isinstance(spec, (list, tuple)):
        names = list(spec)
    if not names or not all(isinstance(n, str) for n in names):
        raise LoralabError(f"lora.target_modules={spec!r}: expected auto, all-linear, or a list of module names")
    missing = [n for n in names if not any(full == n or full.endswith("." + n) for full in leaves)]
    if missing:
        raise LoralabError(
            f"lora.target_modules: {missing} not found in {type(model).__name__} (available: {sorted(suffixes)})"
        )
    return names


def uses_conv1d(model: torch.nn.Module, targets: list[str]) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(
        isinstance(module, Conv1D) and any(name == t or name.endswith("." + t) for t in targets)
        for name, module in _adaptable_leaves(model).items()
    )
