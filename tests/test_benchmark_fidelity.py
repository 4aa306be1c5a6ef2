"""Smoke test of benchmarks/sensitivity_fidelity.py on a tiny model (personal data and an Alpaca-shaped file), plus
its rank correlation against a reference formula."""

from __future__ import annotations

import json
import math

import numpy as np

from .tiny import load_benchmark, save_tiny_checkpoint


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
    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"{i} {i * 7} {i * 13}"} for i in range(40)]
    (tmp_path / "data" / "instruct").mkdir(parents=True)
    (tmp_path / "data" / "instruct" / "alpaca_5000.json").write_text(json.dumps(rows))
    out = tmp_path / "out"
    argv = ["--model", str(save_tiny_checkpoint(tmp_path / "tiny")), "--data-dir", str(tmp_path / "data")]
    argv += ["--sets", "personal:tomasz", "alpaca", "--train-rows", "24", "--eval-rows", "8", "--steps", "2"]
    argv += ["--batch-size", "4", "--max-length", "96", "--calibration", "2", "--schemes", "3", "--output", str(out)]
    result = fidelity.main(argv)
    for name in ("personal:tomasz", "alpaca"):
        proxy, model = result["sets"][name]["proxy"], result["sets"][name]["gain_model"]
        assert proxy["units"] == 4 and -1 <= proxy["spearman_adamw"] <= 1 and -1 <= proxy["spearman_sgd"] <= 1
        assert 1 <= len(model["schemes"]) <= 3 and len(model["calibration"]) >= 1
        for scheme in model["schemes"]:
            assert scheme["memory_mb"] <= model["ceiling_mb"] + 1e-6
            assert scheme["interval"][0] <= scheme["predicted"] <= scheme["interval"][1]
    assert json.loads((out / "fidelity.json").read_text()) == json.loads(json.dumps(result))
    assert (out / "fidelity.png").read_bytes()[:4] == b"\x89PNG"
    # cached tables are reused: a rerun measures nothing again
    stamp = (out / "alpaca" / "layers_measured.json").stat().st_mtime_ns
    assert fidelity.main(argv)["sets"]["alpaca"]["proxy"] == result["sets"]["alpaca"]["proxy"]
    assert (out / "alpaca" / "layers_measured.json").stat().st_mtime_ns == stamp
    # --report-only redraws the same report from fidelity.json without loading a model
    report = (out / "fidelity.md").read_text()
    (out / "fidelity.md").unlink()
    fidelity.main(["--output", str(out), "--report-only"])
    assert (out / "fidelity.md").read_text() == report
