"""Smoke test of benchmarks/sensitivity_fidelity.py on a tiny model and tiny commonsense-shaped data, plus its rank
correlation against a reference formula."""

from __future__ import annotations

import json
import math

import numpy as np

from .tiny import load_benchmark, save_tiny_checkpoint, write_commonsense


def test_spearman_matches_pearson_of_ranks_with_ties():
    fidelity = load_benchmark("sensitivity_fidelity")
    assert fidelity.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert fidelity.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # ties share their mean rank: ranks (0.5, 0.5, 2, 3) against (0, 1, 2, 3)
    expected = np.corrcoef([0.5, 0.5, 2, 3], [0, 1, 2, 3])[0, 1]
    assert math.isclose(fidelity.spearman([5, 5, 7, 9], [1, 2, 3, 4]), expected)
    assert math.isnan(fidelity.spearman([1, 1], [1, 2])) and math.isnan(fidelity.spearman([1], [2]))


def test_fidelity_benchmark_end_to_end(tmp_path):
    fidelity = load_benchmark("sensitivity_fidelity")
    write_commonsense(tmp_path / "data", rows=20)
    out = tmp_path / "out"
    argv = ["--model", str(save_tiny_checkpoint(tmp_path / "tiny")), "--data-dir", str(tmp_path / "data")]
    argv += ["--per-set", "12", "--eval-per-set", "4", "--steps", "1", "--batch-size", "4", "--depths", "1", "2", "9"]
    argv += ["--compare-steps", "2", "--output", str(out)]
    result = fidelity.main(argv)
    assert result["units"] == 4 and -1.0 <= result["spearman_measured_vs_proxy"] <= 1.0
    planned = [row for row in result["schemes"] if row["planned"]]
    assert [row["k"] for row in planned] == [1, 2, 4]  # depth 9 is clipped to the model's 4 layers
    gains = {row["layer"]: row["gain"] for row in json.loads((out / "measured.json").read_text())["rows"]}
    for row in result["schemes"]:  # the additive model: a scheme's predicted gain is the sum of its layers' gains
        assert row["predicted_memory_mb"] <= row["budget_mb"] + 1e-9
        assert math.isclose(row["predicted_gain"], sum(gains[layer] for layer in row["layers"]), rel_tol=1e-9)
        assert row["planned"] or row["layers"] == list(range(4 - row["k"], 4))
    assert json.loads((out / "fidelity.json").read_text())["schemes"] == result["schemes"]
    assert (out / "fidelity.png").read_bytes()[:4] == b"\x89PNG" and (out / "measured.json").exists()
    assert (out / "fidelity.md").read_text().count("\n| ") == len(result["schemes"]) + 1
    # cached tables and costs are reused: a rerun measures nothing again and reports the same schemes
    stamp = (out / "measured.json").stat().st_mtime_ns
    assert fidelity.main(argv)["schemes"] == result["schemes"] and (out / "measured.json").stat().st_mtime_ns == stamp
    # --report-only redraws the same table from fidelity.json without loading a model
    table = (out / "fidelity.md").read_text()
    (out / "fidelity.md").unlink()
    assert (
        fidelity.main(["--output", str(out), "--report-only"]) == result and (out / "fidelity.md").read_text() == table
    )
