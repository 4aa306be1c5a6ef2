"""Planner: within budget, monotone in budget, equal to brute force on exact fractional costs, stops where measured
gain saturates, weighs damage, honest about what cannot fit."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re

import numpy as np
import pytest

from pock_hf.planning.costs import CostProfile
from pock_hf.planning.gain_model import SchemeMeasurement
from pock_hf.planning.planner import Plan, gain_vs_budget, make_plan, plan_report, plan_scheme, plot_gain_vs_budget
from pock_hf.planning.table import WHOLE_LAYER, SensitivityRow, SensitivityTable
from pock_hf.tuner import PockConfig

MODULES = ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj")
FINGERPRINT = {"digest": "0123abcd", "config": {"model_type": "llama"}}
# 65536 inputs x 4 bytes x 4 copies = 1 MB per selected output channel: unit memory is a whole number of MB (the
# synthetic profiles count four copies of a trained value; the profiler's AdamW count is tested in test_costs)
INPUTS_FOR_ONE_MB_PER_CHANNEL = 65536


def random_instance(seed: int, layers: int = 4, modules: int = 2, whole_layer: bool = False, exact: bool = True):
    """A random (table, costs) pair. With `exact`, every cost is a whole MB and every time and gain a multiple of
    1/8 (so float sums are exact); otherwise memory costs are fractional (a module costs an odd fraction of a MB per
    channel, the weights a fractional MB)."""
    rng = np.random.default_rng(seed)
    names = MODULES[:modules]
    inputs = INPUTS_FOR_ONE_MB_PER_CHANNEL if exact else int(rng.integers(40000, 90000))
    shapes = {name: [2 * int(rng.integers(1, 5)), inputs] for name in names}  # even rows: ratio 0.5 is exact
    # deeper cuts (higher index) keep fewer activations and backpropagate less
    activation = np.cumsum(rng.integers(1, 6, layers))[::-1].astype(float)
    step = np.cumsum(rng.integers(1, 5, layers))[::-1] / 8
    costs = CostProfile(
        device="synthetic",
        model_fingerprint=dict(FINGERPRINT),
        batch_size=1,
        seq_len=8,
        num_layers=layers,
        weights_mb=float(rng.integers(20, 40)) if exact else float(rng.uniform(20, 40)),
        forward_s=0.5,
        full_step_s=float(step[0] + 1),
        step_s_by_cut=[float(s) for s in step],
        activation_mb_by_cut=[float(a) for a in activation],
        module_shapes=shapes,
        unit_extra_s={name: int(rng.integers(1, 4)) / 8 for name in names},
        trained_value_copies=4,
    )
    units = [WHOLE_LAYER] if whole_layer else list(names)
    rows = [
        SensitivityRow(layer, module, ratio, int(rng.integers(-3, 12)) / 8, "measured", 4, "loss")
        for layer in range(layers)
        for module in units
        for ratio in (0.5, 1.0)
    ]
    table = SensitivityTable(rows=rows, model_fingerprint=dict(FINGERPRINT), data_fingerprint="data0")
    return table, costs


def all_schemes(table: SensitivityTable, costs: CostProfile):
    """(gain, memory MB, step s) of every non-empty scheme, enumerated: one ratio or none per unit."""
    by_unit = {}
    for row in table.rows:
        by_unit.setdefault((row.layer, row.module), []).append(row)
    results = []
    for picks in itertools.product(*[[None, *rows] for rows in by_unit.values()]):
        chosen = [row for row in picks if row is not None]
        if not chosen:
            continue
        cut = min(row.layer for row in chosen)
        memory = costs.base_memory_mb(cut) + sum(costs.unit_memory_mb(r.module, r.ratio) for r in chosen)
        step = costs.step_s_by_cut[cut] + sum(costs.unit_time_s(r.module, r.ratio) for r in chosen)
        results.append((sum(row.gain for row in chosen), memory, step))
    return np.array(results)


def brute_force_gain(schemes: np.ndarray, budget_mb=None, budget_time_ratio=None, full_step_s=1.0) -> float | None:
    fits = np.ones(len(schemes), bool)
    if budget_mb is not None:
        fits &= schemes[:, 1] <= budget_mb
    if budget_time_ratio is not None:
        fits &= schemes[:, 2] <= budget_time_ratio * full_step_s
    # the empty scheme is not a plan: without a fitting unit of positive gain the planner refuses
    best = schemes[fits, 0].max(initial=0.0)
    return best if best > 0 else None


def memory_range(schemes: np.ndarray) -> tuple[float, float]:
    return float(schemes[:, 1].min()), float(schemes[:, 1].max())


def within_budget(plan: Plan, costs: CostProfile) -> bool:
    memory_ok = plan.budget_mb is None or plan.predicted_memory_mb <= plan.budget_mb
    time_ok = plan.budget_time_ratio is None or plan.predicted_step_s <= plan.budget_time_ratio * costs.full_step_s
    return memory_ok and time_ok


# --- correctness -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exact", [True, False], ids=["whole-MB", "fractional"])
@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_on_small_instances(seed, exact):
    """Memory, time and both budgets at once, on whole-MB and on fractional costs: the plan at the ceiling is the
    brute-force optimum (optimal on the real costs, not on a grid) and never over a budget."""
    table, costs = random_instance(seed, layers=3 + seed % 2, modules=2, whole_layer=seed % 5 == 0, exact=exact)
    schemes = all_schemes(table, costs)
    low, high = memory_range(schemes)
    rng = np.random.default_rng(1000 + seed)
    memory = [float(m) for m in rng.uniform(low - 2, high + 2, 4)]
    ratios = [float(r) for r in rng.uniform(0.2, 1.2, 4)]
    budgets = [{"budget_mb": m} for m in memory] + [{"budget_time_ratio": r} for r in ratios]
    budgets += [{"budget_mb": m, "budget_time_ratio": r} for m, r in zip(memory, ratios)]
    # budgets exactly at a scheme's cost: the tightest case for a solver's tolerances
    budgets += [{"budget_mb": float(m)} for m in rng.choice(schemes[:, 1], 3)]
    for budget in budgets:
        expected = brute_force_gain(schemes, full_step_s=costs.full_step_s, **budget)
        if expected is None:
            with pytest.raises(ValueError, match="smallest feasible"):
                make_plan(table, costs, **budget)
            continue
        plan = make_plan(table, costs, spend="budget", **budget)
        assert plan.predicted_gain == pytest.approx(expected, abs=1e-12), budget  # gains are multiples of 1/8
        assert within_budget(plan, costs)


def test_optimal_within_a_thousandth_of_the_budget_where_a_grid_is_not():
    """A unit of 0.42 MB counted as 1 MB on a 1 MB grid loses the scheme that fills the budget with such units;
    on the real costs the plan is the optimum."""
    q = MODULES[0]
    gains = {(layer, m): 1.0 for layer in (0, 1) for m in MODULES}
    # one row of a 0.42 MB-per-row module: 0.42 MB of parameter, gradient and AdamW state
    table, costs = handmade(
        gains, dict.fromkeys(MODULES, 1), dict.fromkeys(MODULES, 0), inputs=round(0.42 * 2**20 / 16)
    )
    unit_mb = costs.unit_memory_mb(q, 1.0)
    budget = costs.base_memory_mb(1) + 3 * unit_mb + 1e-6  # the three units of layer 1, within 0.1% of the budget
    plan = make_plan(table, costs, budget_mb=budget, spend="budget")
    assert len(plan.units) == 3 and plan.predicted_memory_mb <= budget
    assert math.ceil(unit_mb) * 3 + costs.base_memory_mb(1) > budget  # a 1 MB grid would have fitted one unit only


@pytest.mark.parametrize("seed", range(4))
def test_more_budget_never_gains_less(seed):
    table, costs = random_instance(200 + seed, layers=6, modules=3, exact=seed % 2 == 0)
    low, high = memory_range(all_schemes_upper_bound(costs))
    budgets = list(np.linspace(low - 5, high + 5, 40))
    gains = [plan.predicted_gain if plan else 0.0 for plan in gain_vs_budget(table, costs, budgets)]
    assert gains == sorted(gains) and gains[-1] > 0
    # the shared programme answers exactly as a plan made for each budget alone
    for budget, gain in list(zip(budgets, gains))[::7]:
        if gain > 0:
            assert make_plan(table, costs, budget_mb=budget).predicted_gain == gain
    time_gains = []
    for ratio in np.linspace(0.1, 1.5, 15):
        try:
            time_gains.append(make_plan(table, costs, budget_time_ratio=float(ratio)).predicted_gain)
        except ValueError:
            time_gains.append(0.0)
    assert time_gains == sorted(time_gains)


def all_schemes_upper_bound(costs: CostProfile) -> np.ndarray:
    """Memory of the cheapest imaginable scheme (top cut, nothing else) and the most expensive (everything, cut 0)."""
    everything = sum(costs.unit_memory_mb(module, 1.0) for module in costs.module_shapes) * costs.num_layers
    top = costs.base_memory_mb(costs.num_layers - 1)
    return np.array([[0, top, 0], [0, costs.base_memory_mb(0) + everything, 0]])


def test_cut_is_the_deepest_updated_layer():
    table, costs = random_instance(7, layers=6, modules=3)
    for budget_mb in (60, 80, 120):
        plan = make_plan(table, costs, budget_mb=budget_mb)
        assert plan.cut_layer == min(layer for layer, _, _ in plan.units)
        layers_in_scheme = [int(re.match(r"model\.layers\.(\d+)\.", name).group(1)) for name in plan.scheme]
        assert min(layers_in_scheme) == plan.cut_layer
        # the exact cost is the one at the real cut
        expected = costs.base_memory_mb(plan.cut_layer) + sum(
            costs.unit_memory_mb(module, ratio) for _, module, ratio in plan.units
        )
        assert plan.predicted_memory_mb == pytest.approx(expected)
        assert plan.predicted_gain == pytest.approx(sum(plan.unit_gains))


def handmade(
    gains: dict[tuple[int, str], float],
    rows_of: dict[str, int],
    extra_eighths: dict[str, int],
    inputs: int = INPUTS_FOR_ONE_MB_PER_CHANNEL,
):
    """Two layers, ratio 1 only; a module with k rows costs k MB (with the default `inputs` per row) and
    extra_eighths/8 s. Weights 10 MB, activations 4 MB (cut 0) and 2 MB (cut 1); steps 1/2 s and 1/4 s."""
    costs = CostProfile(
        device="synthetic",
        model_fingerprint=dict(FINGERPRINT),
        batch_size=1,
        seq_len=8,
        num_layers=2,
        weights_mb=10.0,
        forward_s=0.25,
        full_step_s=1.0,
        step_s_by_cut=[0.5, 0.25],
        activation_mb_by_cut=[4.0, 2.0],
        module_shapes={name: [rows, inputs] for name, rows in rows_of.items()},
        unit_extra_s={name: eighths / 8 for name, eighths in extra_eighths.items()},
        trained_value_copies=4,
    )
    rows = [SensitivityRow(layer, module, 1.0, gain, "measured", 4, "loss") for (layer, module), gain in gains.items()]
    return SensitivityTable(rows=rows, model_fingerprint=dict(FINGERPRINT), data_fingerprint="data0"), costs


def test_ties_go_to_the_lower_cost_then_fewer_units():
    q, up, down = MODULES
    # the same gain from layer 0 or layer 1: layer 1 is the deeper, cheaper cut
    table, costs = handmade({(0, q): 1.0, (1, q): 1.0}, {q: 2}, {q: 1})
    assert make_plan(table, costs, budget_mb=100).units == [(0, q, 1.0), (1, q, 1.0)]  # both fit: more gain wins
    plan = make_plan(table, costs, budget_mb=100, budget_time_ratio=0.7)  # one only (0.75 s for both)
    assert plan.units == [(1, q, 1.0)] and plan.predicted_memory_mb == 14 and plan.predicted_step_s == 0.375
    # gain 2 from one 4 MB unit or from two 2 MB units, same memory and time: fewer units
    table, costs = handmade(
        {(1, q): 2.0, (1, up): 1.0, (1, down): 1.0}, {q: 4, up: 2, down: 2}, {q: 2, up: 1, down: 1}
    )
    plan = make_plan(table, costs, budget_mb=16)
    assert plan.predicted_gain == 2.0 and plan.units == [(1, q, 1.0)]


# --- errors ----------------------------------------------------------------------------------------------------------


def test_infeasible_budget_names_the_smallest_feasible_one():
    table, costs = random_instance(3, layers=4, modules=2)
    positive = [row for row in table.rows if row.gain > 0]
    smallest_mb = min(costs.base_memory_mb(r.layer) + costs.unit_memory_mb(r.module, r.ratio) for r in positive)
    smallest_ratio = min(costs.step_s_by_cut[r.layer] + costs.unit_time_s(r.module, r.ratio) for r in positive)
    smallest_ratio /= costs.full_step_s
    with pytest.raises(ValueError, match=re.escape(f"{smallest_mb:.2f} MB")):
        make_plan(table, costs, budget_mb=smallest_mb - 1)
    assert make_plan(table, costs, budget_mb=smallest_mb).predicted_memory_mb == smallest_mb
    with pytest.raises(ValueError, match=re.escape(f"{np.ceil(smallest_ratio * 1e4) / 1e4:.4f}")):
        make_plan(table, costs, budget_time_ratio=smallest_ratio * 0.99)
    assert make_plan(table, costs, budget_time_ratio=smallest_ratio).units


def test_input_errors():
    table, costs = random_instance(4)
    with pytest.raises(ValueError, match="Give a budget"):
        make_plan(table, costs)
    other = random_instance(4)[1]
    other.model_fingerprint = {"digest": "ffff0000"}
    with pytest.raises(ValueError, match="0123abcd.*ffff0000"):
        make_plan(table, other, budget_mb=100)
    mixed = SensitivityTable(
        rows=[*table.rows, SensitivityRow(0, WHOLE_LAYER, 1.0, 1.0, "measured", 4, "loss")],
        model_fingerprint=dict(FINGERPRINT),
        data_fingerprint="data0",
    )
    with pytest.raises(ValueError, match="one granularity"):
        make_plan(mixed, costs, budget_mb=100)
    duplicated = SensitivityTable(
        rows=[*table.rows, table.rows[0]], model_fingerprint=dict(FINGERPRINT), data_fingerprint="d"
    )
    with pytest.raises(ValueError, match="two rows"):
        make_plan(duplicated, costs, budget_mb=100)
    with pytest.raises(ValueError, match="budget_mb"):
        make_plan(table, costs, budget_mb=-1.0)


# --- files, config, plot, report -------------------------------------------------------------------------------------


def test_plan_json_round_trip_and_config(tmp_path):
    table, costs = random_instance(5, layers=5, modules=3)
    plan = make_plan(table, costs, budget_mb=80, budget_time_ratio=0.9)
    path = plan.to_json(tmp_path / "plan.json")
    assert Plan.from_json(path) == plan
    assert json.loads(path.read_text())["predicted_gain"] == plan.predicted_gain
    assert PockConfig(scheme=str(path)).scheme == plan.scheme
    config = plan.to_config(channel_selection="first")
    assert config.scheme == plan.scheme and config.channel_axis == "out"
    config = plan_scheme(table, costs, budget_mb=80, budget_time_ratio=0.9, axis="in", train_norms=True)
    assert config.channel_axis == "in" and config.train_norms
    (tmp_path / "bad.json").write_text(json.dumps({**plan.to_dict(), "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        Plan.from_json(tmp_path / "bad.json")


def test_plot_and_report(tmp_path):
    table, costs = random_instance(6, layers=5, modules=3)
    plan = make_plan(table, costs, budget_mb=70)
    png = plot_gain_vs_budget(plan, tmp_path / "gain.png", table=table)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = plan_report(plan, costs)
    for layer, module, ratio in plan.units:
        assert f"| {layer} | `{module}` | {ratio:g} |" in report
    assert f"Cut layer: {plan.cut_layer}" in report and "70.0 MB ceiling" in report
    assert "no measured schemes" in report  # an additive prediction says it is an upper bound


# --- the gain model: stop where measured gain saturates, weigh damage ------------------------------------------------


def uniform_instance(layers: int = 4, damage: dict | None = None, gains: dict | None = None):
    """`layers` x 3 modules, every unit gain 1 alone (or `gains[(layer, module)]`) at ratio 1 and 1 MB (one row of
    65536 inputs); base memory 10 MB + 1 MB of activations per layer below the top; `damage` maps (layer, module) to
    its damage alone."""
    shapes = {name: [1, INPUTS_FOR_ONE_MB_PER_CHANNEL] for name in MODULES}
    costs = CostProfile(
        device="synthetic",
        model_fingerprint=dict(FINGERPRINT),
        batch_size=1,
        seq_len=8,
        num_layers=layers,
        weights_mb=10.0,
        forward_s=0.25,
        full_step_s=1.0,
        step_s_by_cut=[0.5 - 0.05 * c for c in range(layers)],
        activation_mb_by_cut=[float(layers - 1 - c) for c in range(layers)],
        module_shapes=shapes,
        unit_extra_s=dict.fromkeys(shapes, 0.01),
        trained_value_copies=4,
    )
    damage, gains = damage or {}, gains or {}
    rows = [
        SensitivityRow(
            layer,
            m,
            1.0,
            gains.get((layer, m), 1.0),
            "measured",
            4,
            "loss",
            damage.get((layer, m), 0.0 if damage else None),
        )
        for layer in range(layers)
        for m in MODULES
    ]
    return SensitivityTable(rows=rows, model_fingerprint=dict(FINGERPRINT), data_fingerprint="d"), costs


def measured(table: SensitivityTable, sizes_and_gains, se: float = 0.02, damages=None):
    """Measured schemes: the top `size` units (from the top layer down) with their measured gains."""
    order = sorted(table.rows, key=lambda row: (-row.layer, row.module))
    damages = damages or [None] * len(sizes_and_gains)
    return [
        SchemeMeasurement(
            [(r.layer, r.module, r.ratio) for r in order[:size]], gain, se, dmg, None if dmg is None else se, 4, 0.0
        )
        for (size, gain), dmg in zip(sizes_and_gains, damages)
    ]


def test_stops_at_the_smallest_scheme_within_noise_of_the_best():
    table, costs = uniform_instance()
    table.schemes = measured(table, [(1, 0.5), (2, 0.8), (4, 0.95), (8, 0.97)], se=0.02)
    ceiling = costs.base_memory_mb(0) + 12.5  # every unit fits
    everything = make_plan(table, costs, budget_mb=ceiling, spend="budget")
    plan = make_plan(table, costs, budget_mb=ceiling)
    assert len(everything.units) == 12 and len(plan.units) < 12
    assert plan.predicted_memory_mb < everything.predicted_memory_mb
    model = plan.gain_model
    assert model is not None and model.saturates
    # within one noise of the best, and the next smaller rung is not
    assert plan.predicted_gain >= everything.predicted_gain - model.noise
    smaller = [rung for rung in plan.ladder if rung.memory_mb < plan.predicted_memory_mb]
    assert smaller and max(rung.predicted_gain for rung in smaller) < everything.predicted_gain - model.noise
    low, high = plan.predicted_gain_interval
    assert low < plan.predicted_gain < high and plan.predicted_gain < plan.additive_gain
    assert "within noise" in plan.stop_reason
    gains = [rung.predicted_gain for rung in plan.ladder]
    assert gains == sorted(gains)
    report = plan_report(plan, costs)
    assert "fitted on 4 measured schemes" in report and "| chosen |" in report


def test_spends_the_ceiling_while_measured_gain_keeps_growing():
    table, costs = uniform_instance()
    table.schemes = measured(table, [(1, 0.1), (2, 0.2), (4, 0.4), (8, 0.8)], se=0.001)
    ceiling = costs.base_memory_mb(0) + 12.5
    plan = make_plan(table, costs, budget_mb=ceiling)
    assert len(plan.units) == 12 and not plan.gain_model.saturates
    assert "still grows" in plan.stop_reason


def test_damage_is_weighed_against_gain():
    # the layer-3 q_proj gains most alone but does more damage than up_proj; a layer-3 unit is the cheapest cut
    q, up, down = MODULES
    table, costs = uniform_instance(damage={(3, q): 0.6, (3, up): 0.1, (3, down): 1.5}, gains={(3, q): 1.2})
    budget = costs.base_memory_mb(3) + 1.0  # one unit of the top layer
    ignoring = make_plan(table, costs, budget_mb=budget, damage_weight=0.0)
    weighing = make_plan(table, costs, budget_mb=budget)
    assert weighing.units == [(3, up, 1.0)] and weighing.predicted_damage == pytest.approx(0.1)
    assert weighing.predicted_gain - weighing.predicted_damage == pytest.approx(0.9)
    assert ignoring.units == [(3, q, 1.0)] and ignoring.predicted_damage == pytest.approx(0.6)
    # damage above the gain: never worth choosing
    wide = make_plan(table, costs, budget_mb=costs.base_memory_mb(0) + 12.5, spend="budget")
    assert (3, down, 1.0) not in wide.units and len(wide.units) == 11


def test_measured_damage_of_schemes_is_fitted_and_predicted():
    # unit damage grows with depth from the top; measured scheme damage is 0.2 x the summed unit damage
    damage = {(layer, m): 0.05 * (4 - layer) for layer in range(4) for m in MODULES}
    table, costs = uniform_instance(damage=damage)
    order = sorted(table.rows, key=lambda row: (-row.layer, row.module))
    sizes = [1, 2, 4, 8]
    measured_damage = [0.2 * sum(damage[r.layer, r.module] for r in order[:size]) for size in sizes]
    table.schemes = measured(table, list(zip(sizes, [0.5, 0.8, 0.95, 1.0])), damages=measured_damage)
    plan = make_plan(table, costs, budget_mb=costs.base_memory_mb(0) + 12.5)
    model = plan.gain_model
    assert model.damage_per_score == pytest.approx(0.2, abs=1e-6) and model.damage_per_gain == pytest.approx(
        0, abs=1e-6
    )
    summed = sum(damage[layer, module] for layer, module, _ in plan.units)
    assert plan.predicted_damage == pytest.approx(0.2 * summed, abs=1e-6)


def test_damage_that_grows_with_the_scheme_makes_the_plan_stop_earlier():
    """Unit damages that say nothing (all zero) while measured damage grows with the scheme: the fit puts it on the
    additive score, and gain - damage peaks before the ceiling."""
    table, costs = uniform_instance(damage={(layer, m): 0.0 for layer in range(4) for m in MODULES})
    sizes = [1, 2, 4, 8]
    table.schemes = measured(table, list(zip(sizes, [0.5, 0.8, 0.95, 1.0])), damages=[0.05 * s for s in sizes])
    ceiling = costs.base_memory_mb(0) + 12.5
    weighed = make_plan(table, costs, budget_mb=ceiling)
    ignored = make_plan(table, costs, budget_mb=ceiling, damage_weight=0.0)
    assert weighed.gain_model.damage_per_gain == pytest.approx(0.05, abs=1e-6)
    assert len(weighed.units) < len(ignored.units)
    assert weighed.predicted_damage == pytest.approx(0.05 * weighed.additive_gain, abs=1e-6)


def test_plan_with_a_gain_model_round_trips(tmp_path):
    table, costs = uniform_instance()
    table.schemes = measured(table, [(1, 0.5), (2, 0.8), (4, 0.95), (8, 1.0)])
    plan = make_plan(table, costs, budget_mb=costs.base_memory_mb(0) + 12.5)
    assert Plan.from_json(plan.to_json(tmp_path / "plan.json")) == plan
    path = table.to_json(tmp_path / "table.json")
    assert SensitivityTable.from_json(path) == table
    png = plot_gain_vs_budget(plan, tmp_path / "ladder.png", table=table)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_measured_scheme_with_a_unit_missing_from_the_table_is_refused():
    table, costs = uniform_instance()
    table.schemes = measured(table, [(1, 0.5), (2, 0.8)])
    table.schemes.append(SchemeMeasurement([(0, "mlp.gate_proj", 1.0)], 0.3, 0.01, None, None, 4, 0.0))
    with pytest.raises(ValueError, match="gate_proj"):
        make_plan(table, costs, budget_mb=100)


# --- depth candidates: planned on what they measured -----------------------------------------------------------------


def depth_candidates(table: SensitivityTable, candidates, se: float = 0.02):
    """Measured depth candidates: (label, units, gain, damage) each, with paired errors `se`."""
    return [
        SchemeMeasurement(units, gain, se, damage, se, 4, 0.0, step_se=se, label=label)
        for label, units, gain, damage in candidates
    ]


def test_depth_candidates_are_chosen_on_what_they_measured(tmp_path):
    table, costs = uniform_instance()
    shallow = [(3, module, 1.0) for module in MODULES]
    deep = [(layer, module, 1.0) for layer in (1, 2, 3) for module in MODULES]
    mid = [(layer, MODULES[0], 1.0) for layer in (1, 2, 3)]
    # the deep scheme's additive score is the largest, but the middle one measured as much for less memory
    table.schemes = depth_candidates(
        table,
        [
            ("all, layers 3-3", shallow, 0.5, 0.0),
            ("all, layers 1-3", deep, 0.9, 0.1),
            ("a, layers 1-3", mid, 0.79, 0.0),
        ],
    )
    table.settings["scheme_candidates"] = "depths"
    ceiling = costs.base_memory_mb(0) + 12.5
    plan = make_plan(table, costs, budget_mb=ceiling)
    assert plan.selection == "measured" and sorted(plan.units) == sorted(mid)
    assert plan.predicted_gain == 0.79 and plan.predicted_damage == 0.0
    assert plan.predicted_gain_interval == pytest.approx((0.79 - 1.96 * 0.02, 0.79 + 1.96 * 0.02))
    expected_memory = costs.base_memory_mb(1) + sum(costs.unit_memory_mb(m, r) for _, m, r in mid)
    assert plan.predicted_memory_mb == pytest.approx(expected_memory)
    assert [rung.label for rung in plan.ladder] == ["all, layers 3-3", "a, layers 1-3", "all, layers 1-3"]
    assert "within noise (0.02)" in plan.stop_reason
    # spend="budget" takes the best one, even by a hair; damage counts: with it ignored, the deep one is clearly best
    assert sorted(make_plan(table, costs, budget_mb=ceiling, spend="budget").units) == sorted(deep)
    assert sorted(make_plan(table, costs, budget_mb=ceiling, damage_weight=0.0).units) == sorted(deep)
    # a ceiling the deep candidates do not fit leaves the shallow one; none fitting is an error naming the ceiling
    assert sorted(make_plan(table, costs, budget_mb=costs.base_memory_mb(3) + 3).units) == sorted(shallow)
    with pytest.raises(ValueError, match="None of the table's measured depth candidates fits"):
        make_plan(table, costs, budget_mb=costs.base_memory_mb(3) + 1)
    report = plan_report(plan, costs)
    assert "Measured gain: 0.79" in report and "| a, layers 1-3, chosen |" in report
    assert plot_gain_vs_budget(plan, tmp_path / "plan.png", table=table).read_bytes()[:4] == b"\x89PNG"


def test_a_depth_candidate_whose_own_training_went_over_the_ceiling_is_not_chosen():
    table, costs = uniform_instance()
    shallow = [(3, module, 1.0) for module in MODULES]
    mid = [(layer, MODULES[0], 1.0) for layer in (1, 2, 3)]
    candidates = depth_candidates(table, [("all, layers 3-3", shallow, 0.5, 0.0), ("a, layers 1-3", mid, 0.8, 0.0)])
    ceiling = costs.base_memory_mb(0) + 12.5
    predicted_mid = costs.scheme_cost(mid)[0]
    assert predicted_mid < ceiling  # the cost model says it fits
    peaks = {"all, layers 3-3": costs.scheme_cost(shallow)[0] - 1.0, "a, layers 1-3": ceiling + 5.0}
    table.schemes = [dataclasses.replace(c, peak_memory_mb=peaks[c.label], step_s=0.5) for c in candidates]
    table.settings["scheme_candidates"] = "depths"
    # peaks measured on another device say nothing about this one: the cost model decides alone
    table.settings["schemes_device"] = "cuda:elsewhere"
    assert sorted(make_plan(table, costs, budget_mb=ceiling).units) == sorted(mid)
    table.settings["schemes_device"] = costs.device
    plan = make_plan(table, costs, budget_mb=ceiling)
    assert sorted(plan.units) == sorted(shallow)  # the better candidate measured a peak over the ceiling
    assert plan.predicted_memory_mb == pytest.approx(costs.scheme_cost(shallow)[0])  # its peak was below prediction
    # a measured peak above the prediction is the memory the plan states
    plan = make_plan(table, costs, budget_mb=ceiling + 10)
    assert sorted(plan.units) == sorted(mid) and plan.predicted_memory_mb == ceiling + 5.0
    report = plan_report(plan, costs)
    assert f"| {ceiling + 5.0:.1f} | 0.5 |" in report and "measured peak (MB)" in report
    # every candidate the cost model fits having peaked above the ceiling is an error that says so
    over = [dataclasses.replace(c, peak_memory_mb=ceiling + 1.0) for c in table.schemes]
    with pytest.raises(ValueError, match=r"peaked above it while it trained \(the lowest at"):
        make_plan(dataclasses.replace(table, schemes=over), costs, budget_mb=ceiling)


def test_cheapest_is_judged_at_the_memory_noise_of_the_measured_peaks():
    """Two candidates within noise of each other's gain - damage, one a little cheaper by prediction: where the
    measured peaks stray from the predictions by more than that difference, they cost the same and the better one
    is chosen; where the peaks match the predictions (or none were measured), the cheaper one is."""
    table, costs = uniform_instance()
    cheaper = [(layer, MODULES[0], 1.0) for layer in (2, 3)]
    better = [(layer, MODULES[1], 1.0) for layer in (1, 2, 3)]
    candidates = depth_candidates(table, [("a, layers 2-3", cheaper, 0.80, 0.0), ("b, layers 1-3", better, 0.81, 0.0)])
    table.settings["scheme_candidates"] = "depths"
    table.settings["schemes_device"] = costs.device
    predicted = {c.label: costs.scheme_cost(c.units)[0] for c in candidates}
    assert predicted["a, layers 2-3"] < predicted["b, layers 1-3"]
    ceiling = max(predicted.values()) + 20
    table.schemes = candidates
    assert make_plan(table, costs, budget_mb=ceiling).units == sorted(cheaper)  # no peaks: the cheaper one
    exact = [dataclasses.replace(c, peak_memory_mb=predicted[c.label]) for c in candidates]
    assert make_plan(dataclasses.replace(table, schemes=exact), costs, budget_mb=ceiling).units == sorted(cheaper)
    # peaks 5 MB under and over their predictions: a memory noise of 7 MB, more than the 2 MB between the two
    assert predicted["b, layers 1-3"] - predicted["a, layers 2-3"] < 5
    shifts = {"a, layers 2-3": -5.0, "b, layers 1-3": 5.0}
    noisy = [dataclasses.replace(c, peak_memory_mb=predicted[c.label] + shifts[c.label]) for c in candidates]
    plan = make_plan(dataclasses.replace(table, schemes=noisy), costs, budget_mb=ceiling)
    assert plan.units == sorted(better) and "memory noise (7.07 MB)" in plan.stop_reason


def test_of_the_candidates_that_gain_alike_the_one_in_reply_agreement_with_the_base_model_is_chosen():
    """Reply agreement guards the choice among candidates within noise of the best gain - damage: the cheapest of
    them changed the base model's replies beyond noise, so the one that kept them is chosen; a candidate that keeps
    everything but gains little is never in the running, and with damage ignored (or agreement unmeasured) the
    cheapest within noise wins as before."""
    table, costs = uniform_instance()
    cheap = [(3, module, 1.0) for module in MODULES]
    kept = [(layer, MODULES[0], 1.0) for layer in (1, 2, 3)]
    idle = [(2, MODULES[1], 1.0)]
    agreements = {"all, layers 3-3": (0.40, 0.05), "a, layers 1-3": (0.80, 0.05), "b, layers 2-2": (1.0, 0.0)}
    candidates = depth_candidates(
        table,
        [("all, layers 3-3", cheap, 0.80, 0.0), ("a, layers 1-3", kept, 0.81, 0.0), ("b, layers 2-2", idle, 0.1, 0.0)],
    )
    table.settings["scheme_candidates"] = "depths"
    ceiling = costs.base_memory_mb(0) + 12.5
    assert costs.scheme_cost(cheap)[0] < costs.scheme_cost(kept)[0] <= ceiling
    table.schemes = candidates
    assert sorted(make_plan(table, costs, budget_mb=ceiling).units) == sorted(cheap)  # unmeasured: the cheapest
    table.schemes = [dataclasses.replace(c, agreement=a, agreement_se=se) for c, (a, se) in
                     zip(candidates, agreements.values())]  # fmt: skip
    plan = make_plan(table, costs, budget_mb=ceiling)
    assert sorted(plan.units) == sorted(kept)
    assert "reply agreement with the base model is within noise of the best among those (0.80 +- 0.05" in (
        plan.stop_reason
    )
    assert [rung.measured_agreement for rung in plan.ladder] == [1.0, 0.40, 0.80]  # cheapest first
    assert "| reply agreement |" in plan_report(plan, costs) and " 0.40 |" in plan_report(plan, costs)
    assert sorted(make_plan(table, costs, budget_mb=ceiling, damage_weight=0.0).units) == sorted(cheap)
    # within the noise of the most agreeing one, the cheaper candidate is kept, and chosen
    close = [dataclasses.replace(c, agreement=0.77) if c.label == "all, layers 3-3" else c for c in table.schemes]
    assert sorted(make_plan(dataclasses.replace(table, schemes=close), costs, budget_mb=ceiling).units) == sorted(
        cheap
    )
