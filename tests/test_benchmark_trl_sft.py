"""Smoke test of benchmarks/trl_sft.py on a tiny model: every setup trains under SFTTrainer and the outputs are well
formed (no timing assertions: the numbers are the benchmark's business)."""

from __future__ import annotations

import json

import pytest

from .tiny import load_benchmark, tiny_benchmark_args


@pytest.fixture
def tiny_run(tmp_path) -> list[str]:
    return [*tiny_benchmark_args(tmp_path), "--threads", "1"]


def test_every_setup_trains_and_reports(tiny_run):
    trl_sft = load_benchmark("trl_sft")
    results = [trl_sft.run_one(trl_sft.parse_args([*tiny_run, "--setup", setup])) for setup in trl_sft.SETUPS]
    by = {r["setup"]: r for r in results}
    assert by["pock"]["cut_layer"] == by["pock_label_only"]["cut_layer"] == 2
    assert by["pock"]["trainable_params"] == by["pock_label_only"]["trainable_params"] > 0
    assert by["lora"]["trainable_params"] > 0
    # the same rows in the same order: each setup timed a step over the same non-padding tokens
    assert len({r["tokens_per_step"] for r in results}) == 1 and results[0]["tokens_per_step"] > 0
    assert all(r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in results)
    markdown = trl_sft.table(results)
    assert markdown.count("\n") == len(results) + 1 and "| 1.00x | 1.00x | 1.00 |" in markdown  # LoRA against itself


def test_command_writes_json_and_markdown(tiny_run, tmp_path):
    trl_sft = load_benchmark("trl_sft")
    trl_sft.main([*tiny_run, "--setups", "lora,pock_label_only", "--no-gradient-checkpointing"])
    report = json.loads((tmp_path / "out" / "trl_sft.json").read_text())
    assert [r["setup"] for r in report["results"]] == ["lora", "pock_label_only"]
    assert report["settings"]["gradient_checkpointing"] is False
    assert "PockSFTTrainer" in (tmp_path / "out" / "trl_sft.md").read_text()


def test_unknown_setup_is_refused(tiny_run):
    with pytest.raises(SystemExit):
        load_benchmark("trl_sft").parse_args([*tiny_run, "--setups", "lora,nonsense"])
