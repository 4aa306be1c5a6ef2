"""Smoke test of benchmarks/personalization.py on a tiny model: every system runs the recipe in its own process, the
planners get the hand-made scheme's measured peak as their ceiling, and the summary aggregates over the runs."""

from __future__ import annotations

import json
import random

import pytest

from .tiny import load_benchmark, save_tiny_checkpoint


@pytest.mark.slow
def test_personalization_benchmark_end_to_end(tmp_path):
    bench = load_benchmark("personalization")
    out = tmp_path / "out"
    argv = ["--model", str(save_tiny_checkpoint(tmp_path / "tiny")), "--layers", "4", "--profiles", "tomasz"]
    argv += ["--seeds", "0", "--systems", "hand", "planned", "curve", "additive", "random", "full_time"]
    # the planning process holds more than the hand-made run's (its table, measurements): on a tiny model that is
    # more than its training needs, so the planners get headroom or no candidate's own peak would fit
    argv += ["--random", "1", "--headroom-mb", "300"]
    argv += ["--steps", "2", "--output", str(out), "--set", "pock.profile_depths=2", "train.batch_size=4"]
    result = bench.main(argv)
    runs = result["runs"]["tomasz/0"]
    assert set(runs) == {"hand", "planned", "curve", "additive", "random", "full", "full_time"}
    ceiling = runs["hand"][0]["peak_memory_mb"] + 300
    planned = json.loads((out / "tomasz_seed0" / "planned" / "scheme.json").read_text())
    # the plan's own ceiling is the benchmark's, less what the planned run's prefix cache may hold beside it
    report = json.loads((out / "tomasz_seed0" / "planned" / "report.json").read_text())
    reserved = report["prefix_cache"]["bound_mb"]
    assert reserved > 0  # the demo config caches the frozen prefix
    assert planned["budget_mb"] == pytest.approx(ceiling - reserved, abs=0.1) and planned["selection"] == "measured"
    curve = json.loads((out / "tomasz_seed0" / "curve" / "scheme.json").read_text())
    assert curve["gain_model"] is not None and curve["selection"] == "predicted"
    additive = json.loads((out / "tomasz_seed0" / "additive" / "scheme.json").read_text())
    assert additive["gain_model"] is None and additive["spend"] == "budget"
    for system, reports in runs.items():
        for values in reports:
            assert 0 <= values["fact_recall"] <= 1 and values["peak_memory_mb"] > 0, system
    assert result["summary"]["planned"]["pairs"] == 1
    assert (out / "personalization.png").read_bytes()[:4] == b"\x89PNG"
    assert "| planned | 1 |" in (out / "personalization.md").read_text()


def test_random_schemes_fill_the_planned_memory_and_no_more(tmp_path):
    from pock_hf.planning.costs import CostProfile
    from pock_hf.planning.planner import make_plan

    from .test_planner import random_instance

    bench = load_benchmark("personalization")
    table, costs = random_instance(5, layers=5, modules=3, exact=False)
    plan = make_plan(table, costs, budget_mb=70, spend="budget")
    table.to_json(tmp_path / "sensitivity.json")
    costs.to_json(tmp_path / "costs.json")
    plan.to_json(tmp_path / "scheme.json")
    for seed in range(5):
        scheme = bench.random_scheme(tmp_path, random.Random(seed))
        units = {(int(name.split(".")[2]), name.split(".", 3)[3], ratio) for name, ratio in scheme.items()}
        cut = min(layer for layer, _, _ in units)
        memory = CostProfile.from_json(tmp_path / "costs.json").base_memory_mb(cut)
        memory += sum(costs.unit_memory_mb(module, ratio) for _, module, ratio in units)
        assert 0 < memory <= plan.predicted_memory_mb
