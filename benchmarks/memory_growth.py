"""Does a training run's memory grow beyond one step? The process's peak over `--steps` Pock steps of one length
against the same number of steps whose lengths vary (as a real run's batches do), in a given dtype, with torch's
per-shape kernel caches as pock_hf caps them and with torch's default 1,024 entries each.

    python benchmarks/memory_growth.py --dtype bfloat16      # each case in its own process, about 3 min on 2 cores
    python benchmarks/memory_growth.py --dtype float32

The scheme is the MLPs of layers 24-29 of SmolLM2-135M-Instruct at 100% of their channels, checkpointing above the cut,
batches of 8 random rows (labels on the second half): one length is 128 tokens, varying lengths cycle through 48-127.
The cost profile predicts from one step; where the varying case peaks well above the fixed one, so does a run above
its plan (`engine.memory.bound_kernel_caches` says why the caps matter). Prints one JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from pock_hf.engine.memory import KERNEL_CACHE_VARIABLES

SCHEME = {
    f"model.layers.{layer}.mlp.{m}": 1.0 for layer in range(24, 30) for m in ("gate_proj", "up_proj", "down_proj")
}


CASES = (("fixed", None), ("varying", None), ("varying", 1024))  # (lengths, kernel cache entries; None: pock_hf's)


def run_case(dtype: str, steps: int, vary: bool) -> dict:
    """One case in this process: load the model, train `steps` steps, report the peak above the loaded model (MB)."""
    import torch

    from pock_hf import PockConfig
    from pock_hf.data.default_model import load_model_and_tokenizer
    from pock_hf.engine.memory import current_memory_mb, peak_memory_mb, start_measured_phase
    from pock_hf.planning.sensitivity import train_scheme

    cpu = torch.device("cpu")
    model, _ = load_model_and_tokenizer(None, dtype=getattr(torch, dtype))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (8, 128), generator=generator)
    labels = ids.clone()
    labels[:, :64] = -100
    full = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    lengths = [48 + (i * 37) % 80 for i in range(steps)] if vary else [128] * steps
    batches = [{k: v[:, :n].contiguous() for k, v in full.items()} for n in lengths]
    start_measured_phase(cpu)
    loaded = current_memory_mb(cpu)
    started = time.perf_counter()
    train_scheme(model, PockConfig(scheme=SCHEME, gradient_checkpointing=True), batches, 1e-3, 0)
    return {
        "dtype": dtype,
        "lengths": "varying 48-127" if vary else "128",
        "steps": steps,
        "kernel_cache_entries": int(os.environ[KERNEL_CACHE_VARIABLES[0]]),
        "loaded_mb": round(loaded),
        "peak_mb": round(peak_memory_mb(cpu)),
        "growth_mb": round(peak_memory_mb(cpu) - loaded),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--case", choices=["fixed", "varying"], help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.dtype, args.steps, args.case == "varying")))
        return
    for case, entries in CASES:
        command = [sys.executable, __file__, "--dtype", args.dtype, "--steps", str(args.steps), "--case", case]
        env = os.environ if entries is None else {**os.environ, **dict.fromkeys(KERNEL_CACHE_VARIABLES, str(entries))}
        done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
        print(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
