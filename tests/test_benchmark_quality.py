"""Smoke test of benchmarks/quality.py on a tiny model and tiny commonsense-shaped data: it plans, trains every
method, evaluates and writes well-formed outputs (no assertion on the accuracies themselves)."""

from __future__ import annotations

import json

from .tiny import COMMONSENSE_OPTIONS, load_benchmark, save_tiny_checkpoint, write_commonsense


def test_quality_benchmark_end_to_end(tmp_path):
    quality = load_benchmark("quality")
    write_commonsense(tmp_path / "data", rows=24)
    out = tmp_path / "out"
    # on a tiny model step times are noise (a Pock step can cost more than a full one): a generous time budget
    report = quality.main(
        ["--model", str(save_tiny_checkpoint(tmp_path / "tiny")), "--data-dir", str(tmp_path / "data")]
        + ["--steps", "3", "--batch", "2", "--max-length", "256", "--budgets", "50", "--sensitivity-steps", "1"]
        + ["--validation-rows", "8", "--limit", "6", "--eval-batch", "4", "--output", str(out)]
    )
    systems = [row["system"] for row in report["results"]]
    assert (
        systems[0] == "base" and systems[1].startswith("pock (budget 50") and "full" in systems and "lora" in systems
    )
    for row in report["results"][1:]:  # the plan's predictions travel with Pock rows only
        assert (row.get("predicted") is not None) == row["system"].startswith("pock"), row["system"]
    for row in report["results"]:
        for task in COMMONSENSE_OPTIONS:
            assert 0.0 <= row["eval"][task]["value"] <= 1.0 and 0.0 < row["eval"][task]["majority"] <= 1.0
    assert json.loads((out / "quality.json").read_text())["results"][0]["system"] == "base"
    assert (out / "quality.png").read_bytes()[:4] == b"\x89PNG" and (out / "sensitivity.json").exists()
    assert (out / "quality.md").read_text().count("\n") == len(systems) + 3
    # --report-only redraws the same table from quality.json without loading a model
    table = (out / "quality.md").read_text()
    (out / "quality.md").unlink()
    assert (
        quality.main(["--output", str(out), "--report-only"]) == report and (out / "quality.md").read_text() == table
    )
