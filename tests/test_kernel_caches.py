"""Importing pock_hf caps torch's per-shape matmul kernel caches, so a run whose batches vary in length stays near
the memory one profiled step predicts (the planner's budget is the process's peak). Each case runs in its own
process: the caches read their capacity once, at the process's first oneDNN matmul."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pock_hf.engine.memory import KERNEL_CACHE_CAPACITY, KERNEL_CACHE_VARIABLES
from pock_hf.engine.precision import fastest_precision

# bf16 linear forward and backward over 120 lengths, the shape of a SmolLM2 MLP projection; prints the resident
# memory it kept (MB) after handing freed memory back
GROWTH = """
import pock_hf, torch
from pock_hf.engine.memory import current_memory_mb, release_free_memory
cpu = torch.device("cpu")
weight = torch.randn(1536, 576, dtype=torch.bfloat16)
x = torch.randn(8, 400, 576, dtype=torch.bfloat16, requires_grad=True)
release_free_memory(cpu)
start = current_memory_mb(cpu)
for length in range(40, 400, 3):
    torch.nn.functional.linear(x[:, :length], weight).sum().backward()
release_free_memory(cpu)
print(current_memory_mb(cpu) - start)
"""


def run(code: str, **environment: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_CACHE_VARIABLES} | environment
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_importing_pock_hf_caps_the_caches_and_keeps_a_users_own_setting():
    report = "import os, pock_hf; print([os.environ[name] for name in {names!r}])".format(names=KERNEL_CACHE_VARIABLES)
    assert run(report) == str([str(KERNEL_CACHE_CAPACITY)] * len(KERNEL_CACHE_VARIABLES))
    own = dict.fromkeys(KERNEL_CACHE_VARIABLES, "7")
    assert run(report, **own) == str(["7"] * len(KERNEL_CACHE_VARIABLES))


@pytest.mark.skipif(
    fastest_precision(torch.device("cpu")).dtype != torch.bfloat16,
    reason="the capped caches hold the oneDNN kernels torch runs bf16 matmuls with on CPUs with AVX512-BF16 or AMX; "
    "this CPU has neither, so its bf16 matmuls fill no such cache and there is no growth to compare",
)
def test_matmuls_of_varying_lengths_keep_less_memory_than_with_torchs_default_caches():
    capped = float(run(GROWTH))
    uncapped = float(run(GROWTH, **dict.fromkeys(KERNEL_CACHE_VARIABLES, "1024")))
    # measured on an AVX512-BF16 EPYC: 35 MB capped against 160 MB with the default 1,024 entries each
    assert uncapped - capped > 60, (capped, uncapped)
