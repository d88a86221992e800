"""Weight-only int8 for serving (`loralab serve --set serve.int8=true`), applied at load time.

Why not torch's dynamic quantization: it also rounds activations to int8 with one scale per tensor,
and small LLMs have activation outliers that make that scale useless (measured: mean KL 1.85 on
SmolLM2). Weight-only keeps the quality and a quarter of the Linear memory. It is not an export
format: nothing else loads it back, so the files people deploy are the merged model and its GGUFs.
"""

from __future__ import annotations

import torch


class WeightOnlyInt8Linear(torch.nn.Module):
    """int8 weights with one fp32 scale per output row; activations stay in floating point."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.register_buffer("weight_int8", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.scale.dtype)
        if flat.shape[0] <= 64:  # decoding: torch's int8 weight-only CPU kernel
            out = torch._weight_int8pack_mm(flat, self.weight_int8, self.scale)
        else:  # a long prompt: that kernel is slow at many rows, so dequantize once
            out = flat @ (self.weight_int8.to(flat.dtype) * self.scale[:, None]).T
        out = out.reshape(*x.shape[:-1], -1).to(x.dtype)
        return out if self.bias is None else out + self.bias


def quantize_int8(model):
    """Every Linear layer but the output head (the tied embedding) as weight-only int8."""
    head = model.get_output_embeddings()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not head:
                setattr(module, name, WeightOnlyInt8Linear(child))
    return model
