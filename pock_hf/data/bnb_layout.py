"""bitsandbytes' NF4 weight layout on CPUs with AVX512-BF16, for loading (`data.default_model`) and for
`tuner.quantize`: both keep the standard layout (see `tuner/quantize.py`'s docstring for why)."""

from __future__ import annotations

from torch import nn


def keep_standard_layout(module: nn.Module) -> None:
    """Turn off bitsandbytes' packed AVX512-BF16 CPU layout for an NF4 layer (see `tuner/quantize.py`), restoring the
    standard layout first when an earlier inference forward already packed it; a no-op for other layers."""
    if type(module).__name__ != "Linear4bit":
        return
    module.support_avx512bf16_for_cpu = False
    weight = module.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
