"""A LoRA's frozen base in 4 bits (QLoRA): the Linear layers of the denoiser's blocks replaced
by bitsandbytes' NF4 ones, which dequantize to the compute dtype on the fly. The adapters that
peft adds on top train in full precision; the base never changes, so nothing is lost but the
rounding of its weights (a quarter of bf16's memory: 0.5 byte a weight, plus a 4-byte scale per
64 weights). Embeddings, norms and the final projection stay as they are: they are small.

    quantize_blocks(pipe.transformer, torch.bfloat16)   # before add_lora; on its device

It runs on a CPU as on a GPU (bitsandbytes quantizes where the weight is).
"""

from __future__ import annotations

import torch
from torch import nn


def quantize_blocks(denoiser: nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace every nn.Linear inside the denoiser's repeated blocks (its ModuleLists) by an
    NF4 Linear4bit holding the same weights; returns how many were replaced."""
    import bitsandbytes as bnb

    count = 0
    for blocks in [m for m in denoiser.modules() if isinstance(m, nn.ModuleList)]:
        for parent in list(blocks.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not nn.Linear:  # already replaced, or not a Linear
                    continue
                device = child.weight.device
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features,
                                          bias=child.bias is not None,
                                          compute_dtype=compute_dtype, quant_type="nf4",
                                          device="meta")
                # Quantized where it lands: .to() on the weight's own device does it.
                layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                                 quant_type="nf4").to(device)
                if child.bias is not None:
                    layer.bias = nn.Parameter(child.bias.data.to(compute_dtype),
                                              requires_grad=False)
                setattr(parent, name, layer)
                count += 1
    return count
