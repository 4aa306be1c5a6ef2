"""Peak process memory while a model loads: in full precision against quantized as it loads (NF4, int8).

    python benchmarks/loading_memory.py                       # the embedded SmolLM2-135M-Instruct
    python benchmarks/loading_memory.py --model path/to/ckpt --modes none,nf4 --dtype bfloat16

Each mode loads in a process of its own through `load_model_and_tokenizer(..., quantize=mode)`, the recipe's
loader. Two peaks are reported, each as growth over the process before loading:

- anonymous memory (`RssAnon`, sampled every 2 ms): what the process itself holds. transformers maps safetensors
  files and, on the CPU, keeps same-dtype weights as views of that mapping, so a full-precision load can show
  little here: the weights are file pages then.
- resident memory (`VmHWM`, the kernel's exact high-water mark): anonymous plus file pages mapped in, so it also
  counts the mapped checkpoint while it is read.

Writes `loading.json` and `loading.md` to `--output`. The numbers describe this machine; tests never assert them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

MODES = ("none", "nf4", "int8")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def probe(model: str | None, mode: str, dtype: str) -> dict:
    """Load once in this process and return its loading peaks (MB) and seconds; see the module docstring."""
    import torch

    from pock_hf.data.default_model import load_model_and_tokenizer

    before_anon, before_resident = _status_mb("RssAnon"), _status_mb("VmHWM")
    peak, done = [before_anon], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _status_mb("RssAnon"))
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    loaded, _ = load_model_and_tokenizer(model, dtype=getattr(torch, dtype), quantize=None if mode == "none" else mode)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return {
        "mode": mode,
        "dtype": dtype,
        "seconds": seconds,
        "anon_peak_mb": max(peak[0], _status_mb("RssAnon")) - before_anon,
        "anon_after_mb": _status_mb("RssAnon") - before_anon,
        "resident_peak_mb": _status_mb("VmHWM") - before_resident,
        "parameters": sum(p.numel() for p in loaded.parameters()),
    }


def measure(model: str | None, mode: str, dtype: str = "float32", timeout_s: float = 900) -> dict:
    """`probe` in a fresh process, so each mode's peak is its own."""
    command = [sys.executable, __file__, "--probe", "--modes", mode, "--dtype", dtype]
    if model is not None:
        command += ["--model", str(model)]
    # a fixed mmap threshold: glibc otherwise raises it after freeing big blocks and keeps later ones in its heap, so
    # RSS would show memory the loader already released
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**16)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"loading with {mode} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown(results: list[dict], machine: str) -> str:
    reference = next((r for r in results if r["mode"] == "none"), None)
    lines = [
        f"Loading peaks on {machine} (growth over the process before loading).",
        "",
        (
            "| mode | dtype | anon peak (MB) | anon after (MB) | resident peak (MB) | seconds | "
            "anon peak / full precision |"
        ),
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        full = reference["anon_peak_mb"] if reference else 0
        ratio = f"{r['anon_peak_mb'] / full:.2f}" if full else ""
        lines.append(
            f"| {r['mode']} | {r['dtype']} | {r['anon_peak_mb']:,.0f} | {r['anon_after_mb']:,.0f} | "
            f"{r['resident_peak_mb']:,.0f} | {r['seconds']:.1f} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder or hub id (default: embedded SmolLM2)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--output", type=Path, default=Path("runs/loading"))
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    if args.probe:
        print(json.dumps(probe(args.model, modes[0], args.dtype)))
        return 0
    from pock_hf.engine.precision import cpu_capability, describe_cpu

    results = [measure(args.model, mode, args.dtype) for mode in modes]
    machine = describe_cpu(cpu_capability())
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "loading.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    table = markdown(results, machine)
    (args.output / "loading.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
