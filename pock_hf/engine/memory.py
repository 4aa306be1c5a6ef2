"""Process memory, as a budget means it: peak and current memory of this process, MB.

On CUDA these are the bytes the caching allocator handed out (`torch.cuda.max_memory_allocated`); elsewhere the
process's resident set (RSS) from `/proc/self/status`, whose peak (VmHWM) Linux lets a process reset by writing "5" to
`/proc/self/clear_refs`, so the peak of one phase (a profiled step, a measurement) can be read on its own. Where
`/proc` is missing the peak since the process started (`getrusage`) stands in, and resetting does nothing.

Freed CPU memory does not always leave the process: after large temporary tensors glibc raises its mmap threshold,
and later mid-sized buffers come from heap arenas it keeps when they are freed (measured here: 1.1 GB of freed
activations still resident). `release_free_memory` hands it back (`malloc_trim`), so one phase (a sensitivity
measurement) does not leave its peak standing under the next (training).

Nor does a CPU run's memory stay where one profiled step put it unless torch's kernel caches are bounded: oneDNN
(the bf16 matmuls on AVX512-BF16/AMX CPUs) keeps compiled kernels per input shape in two caches of 1,024 entries
each, and batches of varying length add entries every step. `bound_kernel_caches` (run when pock_hf is imported)
caps them; `benchmarks/memory_growth.py` measures the difference.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource
from functools import cache
from pathlib import Path

import torch

MB = 2**20
PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")
# oneDNN's primitive cache and ideep's LRU cache of matmul kernels, both read once, at the first oneDNN matmul
KERNEL_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
# a step of a Llama needs a few dozen kernels; measured on SmolLM2 in bf16 (AVX512-BF16, benchmarks/memory_growth.py),
# 32 entries keep a run of varying lengths at 1,374 MB against 1,651 MB uncapped, at no cost in step time
KERNEL_CACHE_CAPACITY = 32


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory (MB) since the process started or since the last `reset_peak_memory`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MB
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_memory_mb(device: torch.device) -> float:
    """Memory (MB) the process holds now."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / MB
    current = _status_mb("VmRSS")
    return current if current is not None else peak_memory_mb(device)


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak at the current memory; False where the platform cannot (the peak then keeps counting)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        PROC_CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _status_mb(field: str) -> float | None:
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def release_free_memory(device: torch.device) -> None:
    """Give memory the process has freed back to the system: collect garbage, and on glibc trim the heap; on CUDA
    return the caching allocator's unused blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def bound_kernel_caches(capacity: int = KERNEL_CACHE_CAPACITY) -> None:
    """Cap torch's per-shape matmul kernel caches at `capacity` entries each, unless the environment already sets
    them (a user's own setting wins). It takes effect only before the process's
    first oneDNN matmul, which is why importing pock_hf runs it; with the default 1,024 entries a bf16 run whose
    batches vary in length grows by about 6.5 MB per new length on SmolLM2, past what its profiled step predicts."""
    for name in KERNEL_CACHE_VARIABLES:
        os.environ.setdefault(name, str(capacity))


def start_measured_phase(device: torch.device) -> bool:
    """Begin a phase whose peak is its own: release what earlier work freed, then start a new peak there. Returns what
    `reset_peak_memory` returns (False: the peak keeps counting from before)."""
    release_free_memory(device)
    return reset_peak_memory(device)


@cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None on other C libraries."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
