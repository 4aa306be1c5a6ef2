"""Frozen linear weights held in bitsandbytes 8-bit (LLM.int8) or 4-bit NF4, as QLoRA holds LoRA's base model.

Only frozen weights are quantized: the Pock deltas, their gradients and optimizer state stay in full precision
and are added to the quantized layer's output (`tuner/layer.py`). Merging follows PEFT's bitsandbytes LoRA layers:
dequantize, add the delta in float32, quantize again — so a merged model differs from the adapter model by the
requantization error of the updated rows (the untouched rows round-trip unchanged).

bitsandbytes quantizes a parameter when it is moved from the CPU to a device, so every quantization here builds
the parameter on the CPU and moves it to the layer's device (the CPU included; bitsandbytes >= 0.45 has a CPU
backend).

On CPUs with AVX512-BF16, bitsandbytes rewrites an NF4 layer's weight in place into a packed inference layout on
the layer's first no-grad forward in eval mode, rounding its block scales to bfloat16, and that layout only takes
in_features a multiple of the 64-wide block and out_features a multiple of 32. Pock keeps every NF4 layer it
quantizes or wraps on the standard layout (`keep_standard_layout`): the same layer then computes the same thing in
training and in evaluation, on every CPU, and merging and saving read the weight they quantized.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data.bnb_layout import keep_standard_layout

NF4_BLOCKSIZE = 64


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` is a bitsandbytes 8-bit or 4-bit linear layer."""
    return type(module).__name__ in ("Linear8bitLt", "Linear4bit")


def frozen_weight(module: nn.Linear) -> torch.Tensor:
    """The (out x in) weight of a plain or bitsandbytes linear layer, dequantized to float32 when quantized."""
    if not is_quantized(module):
        return module.weight.detach()
    import bitsandbytes as bnb

    weight = module.weight
    if type(module).__name__ == "Linear4bit":
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    # before its first forward the scales sit on the parameter, afterwards on the layer's matmul state
    scales = module.state.SCB if module.state.SCB is not None else weight.SCB
    return weight.data.float() * (scales.float().unsqueeze(1) / 127.0)


def _quantized_parameter(weight: torch.Tensor, kind: str, like: nn.Parameter | None = None) -> nn.Parameter:
    import bitsandbytes as bnb

    device = weight.device
    if kind == "int8":
        parameter = bnb.nn.Int8Params(weight.detach().to("cpu"), requires_grad=False, has_fp16_weights=False)
    else:
        blocksize = getattr(like, "blocksize", NF4_BLOCKSIZE) if like is not None else NF4_BLOCKSIZE
        parameter = bnb.nn.Params4bit(
            weight.detach().to("cpu"), requires_grad=False, quant_type="nf4", blocksize=blocksize
        )
    return parameter.to(device)


def quantize_linear(linear: nn.Linear, kind: str) -> nn.Module:
    """A bitsandbytes copy of `linear` with its weight quantized (`kind` "int8" or "nf4"); the bias stays as is.

    NF4 computes in the original weight's dtype; int8 uses LLM.int8 without outlier decomposition (threshold 0).
    """
    import bitsandbytes as bnb

    has_bias = linear.bias is not None
    if kind == "int8":
        quantized = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=0.0,
            device="meta",
        )
    elif kind == "nf4":
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=linear.weight.dtype,
            quant_type="nf4",
            device="meta",
        )
    else:
        raise ValueError(f"Unknown quantization {kind!r}; valid values are 'int8' and 'nf4'.")
    quantized.weight = _quantized_parameter(linear.weight, kind)
    keep_standard_layout(quantized)
    if has_bias:
        quantized.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    quantized.requires_grad_(False)
    return quantized


def set_frozen_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Replace the weight of a plain or bitsandbytes linear layer with `weight` (out x in), quantizing it again
    the same way when the layer is quantized."""
    if not is_quantized(module):
        module.weight.data = weight.to(module.weight.dtype)
        return
    if type(module).__name__ == "Linear4bit":
        module.weight = _quantized_parameter(weight.float(), "nf4", like=module.weight)
        return
    module.weight = _quantized_parameter(weight.float(), "int8")
    # the layer reads its scales from the matmul state once set: clear it so the next forward takes the new ones
    module.state.CB, module.state.SCB = None, None


def quantize_frozen_linears(root: nn.Module, kind: str) -> int:
    """Replace every plain, frozen `nn.Linear` under `root` (including the base layers inside Pock layers) by a
    quantized copy; returns how many were replaced. Trainable linears are left alone."""
    targets = [
        (parent, name, child)
        for parent in root.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and not any(p.requires_grad for p in child.parameters())
    ]
    for parent, name, child in targets:
        setattr(parent, name, quantize_linear(child, kind))
    return len(targets)
