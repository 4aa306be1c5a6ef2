"""Which dtype the frozen weights take on a device: `dtype: auto` in the recipes and `pock-eval --dtype auto`.

A Pock step is bounded by the frozen model's forward, so the frozen weights go to bfloat16 wherever the hardware
computes it fast; the deltas, their gradients and AdamW state stay float32 (PEFT upcasts adapter weights of a
bf16/fp16 base to float32, `autocast_adapter_dtype=True`, and `add_sparse_delta` casts the delta to the
activations' dtype inside the forward, so its gradient arrives in float32).

- CUDA: bfloat16 from compute capability 8.0 (Ampere, Jetson Orin, Hopper); float16 below it.
- CPU: bfloat16 with AVX512-BF16 or AMX (torch's oneDNN kernels use them); float32 elsewhere, where bf16 matmuls
  are emulated and slower than float32 (AVX2-only x86, most ARM builds).
- MPS: float32 (bf16 autocast is not supported there by the recipes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")
AUTO = "auto"


@dataclass(frozen=True)
class Precision:
    """The frozen-weight dtype chosen for a device, and the capability that decided it (for logs and reports)."""

    dtype: torch.dtype
    capability: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def cpu_capability() -> dict[str, bool | str]:
    """The CPU's vector ISA as torch reports it and whether it has the bf16 instructions torch's kernels use."""

    def supported(probe: str) -> bool:
        check = getattr(torch.cpu, probe, None)  # private probes; absent on some builds
        return bool(check()) if check is not None else False

    return {
        "isa": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": supported("_is_avx512_bf16_supported"),
        "amx": supported("_is_amx_tile_supported"),
    }


def describe_cpu(capability: dict[str, bool | str]) -> str:
    """A one-line summary, e.g. "CPU AVX2 (no AVX512-BF16, no AMX)"."""
    flags = [("AVX512-BF16", capability["avx512_bf16"]), ("AMX", capability["amx"])]
    return f"CPU {capability['isa']} ({', '.join(name if has else f'no {name}' for name, has in flags)})"


def fastest_precision(device: torch.device | str) -> Precision:
    """The fastest frozen-weight dtype whose matmuls `device` computes natively (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        dtype = torch.bfloat16 if major >= 8 else torch.float16
        return Precision(dtype, f"CUDA compute capability {major}.{minor}")
    if device.type == "cpu":
        capability = cpu_capability()
        fast = capability["avx512_bf16"] or capability["amx"]
        return Precision(torch.bfloat16 if fast else torch.float32, describe_cpu(capability))
    return Precision(torch.float32, f"{device.type} (float32 only)")


def resolve_dtype(name: str, device: torch.device | str) -> Precision:
    """`name` ("auto" or one of `DTYPE_NAMES`) as a dtype for `device`; a named dtype is taken as given.

    Raises:
        ValueError: `name` is neither "auto" nor a supported dtype name.
    """
    if name == AUTO:
        return fastest_precision(device)
    if name not in DTYPE_NAMES:
        raise ValueError(f"Unknown dtype {name!r}; choose {AUTO!r} or one of {', '.join(DTYPE_NAMES)}.")
    return Precision(getattr(torch, name), "given")
