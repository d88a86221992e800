"""What pruning scores need from real inputs: activation norms per Linear input channel (Wanda) and
how much each decoder layer changes its hidden state (the layer-removal score).

Calibration rows are the first `n` training examples, chat-formatted as training sees them (Wanda
uses 128 C4 sequences; a domain model is pruned for its domain). One forward pass of the unpruned
model gives every layer's statistics at once: the one-shot variant, not Wanda's layer-by-layer
pass through the already-pruned prefix, which the Wanda paper reports as close to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loralab.data.chat import collate, encode_chat


@dataclass
class Calibration:
    input_norms: dict[str, torch.Tensor]  # Linear name -> L2 norm of each input channel over all tokens
    layer_influence: list[float]  # per decoder layer: mean 1 - cos(hidden in, hidden out) over tokens
    tokens: int


def calibration_batches(tokenizer, rows: list[dict], max_length: int, batch_size: int = 8) -> list[dict]:
    encoded = [e for e in (encode_chat(tokenizer, row["messages"], max_length) for row in rows) if e is not None]
    return [collate(encoded[i : i + batch_size], tokenizer.pad_token_id) for i in range(0, len(encoded), batch_size)]


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.get_decoder().layers


@torch.no_grad()
def calibrate(model: torch.nn.Module, batches: list[dict]) -> Calibration:
    """Sum of squared inputs per channel of every Linear in the decoder layers (padding excluded), and
    each layer's block influence (ShortGPT, Men et al. 2024: 1 - cosine of its input and output)."""
    layers = decoder_layers(model)
    squares: dict[str, torch.Tensor] = {}
    influence = [0.0] * len(layers)
    mask: list[torch.Tensor] = []  # the current batch's real-token mask, flattened
    hooks = []

    def on_linear(name: str):
        def hook(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])[mask[0]].float()
            squares[name] = squares.get(name, 0) + (x * x).sum(0)
        return hook

    def on_layer(index: int):
        def hook(module, inputs, output):
            before = inputs[0].reshape(-1, inputs[0].shape[-1])[mask[0]].float()
            after = (output[0] if isinstance(output, tuple) else output).reshape(-1, before.shape[-1])[mask[0]].float()
            influence[index] += float((1 - torch.nn.functional.cosine_similarity(before, after, dim=-1)).sum())
        return hook

    for index, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(on_layer(index)))
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                hooks.append(module.register_forward_hook(on_linear(f"{index}.{name}")))
    tokens = 0
    try:
        model.eval()
        for batch in batches:
            mask[:] = [batch["attention_mask"].reshape(-1).bool()]
            tokens += int(mask[0].sum())
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for hook in hooks:
            hook.remove()
    return Calibration({name: s.sqrt() for name, s in squares.items()}, [v / max(tokens, 1) for v in influence], tokens)
