"""benchmarks/scheme_shapes.py on a tiny model: every shape trains from the same frozen model and is scored on what the
planner sees (validation loss) and what the user sees (recall, retention, held-out loss)."""

from __future__ import annotations

import json

from .tiny import load_benchmark, save_tiny_checkpoint


def test_shapes_reach_their_upper_layers_only():
    bench = load_benchmark("scheme_shapes")
    scheme = bench.shape_scheme(bench.MLP, 0.4, 0.25, num_layers=30)
    assert {int(name.split(".")[2]) for name in scheme} == set(range(18, 30))
    assert len(scheme) == 36 and set(scheme.values()) == {0.25}
    assert {int(name.split(".")[2]) for name in bench.shape_scheme(("mlp.down_proj",), 0.01, 1.0, 4)} == {3}


def test_every_shape_is_trained_and_scored(tmp_path):
    bench = load_benchmark("scheme_shapes")
    model = save_tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "out"
    results = bench.main(
        ["--model", str(model), "--steps", "2", "--batch", "4", "--eval-rows", "8", "--output", str(out)]
    )
    assert [r["shape"] for r in results] == list(bench.SHAPES)
    for row in results:
        assert 0 <= row["fact_recall"] <= 1 and 0 <= row["general_retention"] <= 1
        assert row["validation_loss"] > 0 and row["heldout_loss"] > 0 and row["trainable_params"] > 0
    assert json.loads((out / "scheme_shapes.json").read_text())["results"] == results
    assert "Spearman" in (out / "scheme_shapes.md").read_text()
