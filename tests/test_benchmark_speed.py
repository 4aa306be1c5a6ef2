"""Smoke test of benchmarks/speed.py on a tiny model: every setup runs and the outputs are well formed (no timing
assertions: the numbers are the benchmark's business)."""

from __future__ import annotations

import json
import subprocess

import pytest

from .tiny import BENCHMARKS, load_benchmark, tiny_benchmark_args


@pytest.fixture
def tiny_run(tmp_path):
    # the tiny model's 32-wide layers cannot take SHiRA's default rank
    return [*tiny_benchmark_args(tmp_path), "--shira-r", "4"]


def test_every_setup_runs_and_reports(tiny_run):
    speed = load_benchmark("speed")
    results = [speed.run_one(speed.parse_args([*tiny_run, "--setup", setup])) for setup in speed.SETUPS]
    by = {r["setup"]: r for r in results}
    assert by["full"]["trainable_params"] > by["last_k"]["trainable_params"] > by["pock"]["trainable_params"] > 0
    assert by["pock"]["cut_layer"] == 2 and by["pock_nf4"]["trainable_params"] == by["pock"]["trainable_params"]
    assert all(r["step_s"] > 0 and r["peak_memory_mb"] > 0 for r in results)
    assert by["shira"]["trainable_params"] > 0 and by["supertuning"]["trainable_params"] > 0
    # the same rows, padded or packed: the real tokens per step agree, packing drops only padding
    real = {setup: by[setup]["tokens_per_s"] * by[setup]["step_s"] for setup in ("pock", "pock_packed")}
    assert real["pock_packed"] == pytest.approx(real["pock"])
    markdown = speed.table(results)
    assert markdown.count("\n") == len(results) + 1 and "| full fine-tuning |" in markdown


def test_command_writes_json_markdown_and_chart(tiny_run, tmp_path):
    speed = load_benchmark("speed")
    speed.main([*tiny_run, "--setups", "lora,pock", "--profile"])
    out = tmp_path / "out"
    assert "aten::" in (out / "profile_pock.txt").read_text()
    report = json.loads((out / "speed.json").read_text())
    assert [r["setup"] for r in report["results"]] == ["lora", "pock"]
    assert (out / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "1.00x" in (out / "speed.md").read_text()  # LoRA against itself


def test_unknown_setup_is_refused(tiny_run):
    with pytest.raises(SystemExit):
        load_benchmark("speed").parse_args([*tiny_run, "--setups", "full,nonsense"])


def test_random_architecture_path_builds_the_named_shape(tmp_path):
    """What benchmarks/gpu.sh runs on a GPU, here on the CPU with the smallest architecture of the table."""
    speed = load_benchmark("speed")
    args = speed.parse_args(
        ["--architecture", "SmolLM2-135M-Instruct", "--batch", "1", "--max-length", "16", "--steps", "1"]
        + ["--last-k", "1", "--setup", "pock", "--output", str(tmp_path)]
    )
    row = speed.run_one(args)
    assert row["cut_layer"] == 29 and row["trainable_params"] > 0
    with pytest.raises(SystemExit, match="unknown --architecture"):
        speed.run_one(speed.parse_args(["--architecture", "nonsense", "--setup", "pock"]))


def test_gpu_script_runs_with_cpu_overrides(tmp_path):
    """benchmarks/gpu.sh itself: its --small branch and the pass-through of later arguments, shrunk to a CPU run."""
    out = tmp_path / "gpu"
    overrides = ["--device", "cpu", "--dtype", "float32", "--architecture", "SmolLM2-135M-Instruct", "--batch", "1"]
    overrides += ["--max-length", "16", "--warmup", "0", "--steps", "1", "--last-k", "1", "--setups", "pock"]
    command = ["bash", str(BENCHMARKS / "gpu.sh"), "--small", *overrides, "--output", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    report = json.loads((out / "speed.json").read_text())
    assert report["settings"]["architecture"] == "SmolLM2-135M-Instruct" and report["settings"]["batch"] == 1
    assert [row["setup"] for row in report["results"]] == ["pock"] and report["results"][0]["cut_layer"] == 29
