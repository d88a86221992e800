"""loralab's forward for plain LoRA layers: a cheaper dropout, and one cast, mask and A matmul per input.

A hand profile of the default training step (q/k/v/o, r=8, batch 8, bf16 autocast, AVX-512 CPU; not
committed) found its largest cost after the matmuls in `bernoulli_` (PEFT's LoRA dropout: PyTorch's
CPU generator is serial), and more in casts; `benchmarks/train_throughput.py --ablation` measures the
effect end to end. PEFT treats each LoRA layer alone: it casts the layer's input to fp32, draws a dropout mask
of the input's size, saves that mask as an fp32 tensor for the backward, and runs its own thin A
matmul. Here:
- layers that read the same input tensor (q/k/v_proj, gate/up_proj) form a group: the first one
  computes dropout(x) once and x_dropped @ [A_q; A_k; A_v]^T as one matmul for the whole group;
- the mask is a bool drawn as `rand >= p` (faster than `bernoulli_`, 1 byte saved per element
  instead of 4), applied in x's own dtype: under autocast the fp32 copy PEFT makes is cast back to
  bf16 by the matmul anyway, and x * scale rounds to the same bf16 value either way;
- each layer then adds its own B(...) * scaling to the frozen layer's output, as PEFT does.
What differs from PEFT: the layers of a group see one dropout mask instead of independent ones (the
same rate, so the same expected regularisation), and the masks come from another random stream.
Without dropout, or in eval mode, the output equals PEFT's (tests/training/test_speed_paths.py). The
weights, their names and what PEFT saves are unchanged: the adapter loads in plain PEFT.

Only vanilla LoRA Linear layers (no DoRA or other variant, one active adapter, unmerged, no bias in
A) take this path; every other layer keeps PEFT's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Sibling modules that receive the same input tensor in the decoders transformers ships
# (Llama, Mistral, Qwen, SmolLM, Gemma, Phi-3 style): attention projections, gated-MLP inputs.
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))


def dropout_bool_mask(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout with a bool mask: the same distribution as F.dropout, a quarter of its saved bytes."""
    if not training or p == 0.0:
        return x
    keep = torch.rand(x.shape, device=x.device) >= p
    return torch.where(keep, x * (1.0 / (1.0 - p)), 0.0)


class SharedInputGroup:
    """The LoRA layers that read one input, and the hidden products of the input they last saw."""

    def __init__(self, layers: list[torch.nn.Module], adapter: str, p: float):
        self.layers, self.adapter, self.p = layers, adapter, p
        self._input: torch.Tensor | None = None
        self._hidden: tuple[torch.Tensor, ...] = ()
        self._pending: set[int] = set()

    def hidden(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """dropout(x) @ A_index^T, computed for every layer of the group on the first call with `x`."""
        if self._input is not x or index not in self._pending:
            self._compute(x)
        self._pending.discard(index)
        out = self._hidden[index]
        if not self._pending:  # every layer has its share: hold no reference between forwards
            self._input, self._hidden = None, ()
        return out

    def _compute(self, x: torch.Tensor) -> None:
        a_weights = [layer.lora_A[self.adapter].weight for layer in self.layers]
        # Under autocast the matmul casts its input (to bf16) itself; else x meets A in A's dtype, as in PEFT.
        cast = x if torch.is_autocast_enabled(x.device.type) else x.to(a_weights[0].dtype)
        dropped = dropout_bool_mask(cast, self.p, self.layers[0].training)
        weight = a_weights[0] if len(a_weights) == 1 else torch.cat(a_weights)
        hidden = F.linear(dropped, weight)
        self._hidden = tuple(hidden.split([w.shape[0] for w in a_weights], dim=-1))
        self._input, self._pending = x, set(range(len(self.layers)))


def plain_lora_adapter(layer: torch.nn.Module) -> str | None:
    """The layer's one active adapter when it is a plain, unmerged LoRA Linear without bias in A; else None."""
    adapters = getattr(layer, "active_adapters", None)
    if not hasattr(layer, "lora_A") or not adapters or len(adapters) != 1 or getattr(layer, "merged", True):
        return None
    name = adapters[0]
    lora_a = layer.lora_A[name] if name in layer.lora_A else None
    if (not isinstance(lora_a, torch.nn.Linear) or lora_a.bias is not None or name in getattr(layer, "lora_variant", {})
            or getattr(layer, "use_dora", {}).get(name, False)):
        return None
    return name


def _settings(layer: torch.nn.Module | None) -> tuple[str, float] | None:
    """(adapter, dropout rate) of a plain LoRA layer whose dropout this module knows; None for any other module."""
    adapter = plain_lora_adapter(layer) if layer is not None else None
    if adapter is None:
        return None
    dropout = layer.lora_dropout[adapter]
    if isinstance(dropout, torch.nn.Dropout):
        return adapter, dropout.p
    return (adapter, 0.0) if isinstance(dropout, torch.nn.Identity) else None


def _grouped_forward(layer: torch.nn.Module, group: SharedInputGroup, index: int):
    peft_forward = layer.forward

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or layer.disable_adapters or layer.merged:  # anything unusual: PEFT's own path
            return peft_forward(x, *args, **kwargs)
        result = layer.base_layer(x)
        lora_b = layer.lora_B[group.adapter]
        # As PEFT's Linear.forward: result + lora_B(lora_A(dropout(x))) * scaling, in the result's dtype.
        return (result + lora_b(group.hidden(x, index)) * layer.scaling[group.adapter]).to(result.dtype)

    return forward


def _groups(model: torch.nn.Module) -> list[tuple[list[torch.nn.Module], str, float]]:
    """(layers, adapter, dropout rate): siblings that share an input, one adapter and one rate together (one
    shared mask needs one rate); every other plain LoRA layer alone."""
    grouped: list[tuple[list[torch.nn.Module], str, float]] = []
    taken: set[int] = set()
    for parent in model.modules():
        for names in SHARED_INPUT_GROUPS:
            layers = [getattr(parent, n, None) for n in names]
            settings = {_settings(layer) for layer in layers}
            if len(settings) == 1 and None not in settings:
                grouped.append((layers, *settings.pop()))
                taken.update(id(layer) for layer in layers)
    singles = [([m], *settings) for m in model.modules()
               if id(m) not in taken and (settings := _settings(m)) is not None]
    return grouped + singles


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Give every plain LoRA layer of `model` loralab's forward (module docstring); returns the number of
    groups, single layers included. The forward is replaced on the instances only."""
    groups = _groups(model)
    for layers, adapter, rate in groups:
        group = SharedInputGroup(layers, adapter, rate)
        for index, layer in enumerate(layers):
            layer.forward = _grouped_forward(layer, group, index)  # an instance attribute: nn.Module calls it
    return len(groups)
