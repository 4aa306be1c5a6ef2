"""The planner: the smallest scheme whose predicted gain (minus damage) is as good as any under a budget ceiling.

A scheme is a set of units (layer, module, ratio), at most one ratio per (layer, module). Its cost depends on its
cut c, the deepest (lowest-index) updated layer, because every layer above c runs backward:

    memory_mb(S) = costs.base_memory_mb(c) + sum of costs.unit_memory_mb(module, ratio, axis)
    step_s(S)    = costs.step_s_by_cut[c]  + sum of costs.unit_time_s(module, ratio)

What it is worth comes from the table. Its rows give each unit's gain alone (and its damage on replay data); their
sum over a scheme, the *additive score*, over-predicts large schemes because units overlap. Where the table holds
measured schemes (`table.schemes`, see `planning.calibration`), a saturation curve fitted through them
(`planning.gain_model`) turns the additive score into a predicted gain with an interval, and damage into a predicted
loss increase on replay data. The planner then:

1. For a ladder of budgets from the smallest feasible one up to the ceiling (`budget_mb` and/or `budget_time_ratio`,
   scaled together), finds the scheme of highest value: sum over units of (gain - `damage_weight` x damage), the
   first-order value of each unit under the fitted curves. This is a 0/1 programme, solved exactly on the real
   costs (no grid) by HiGHS through `scipy.optimize.milp`: one binary per unit option and per cut depth, one
   option per unit, the cut at the deepest chosen layer, both budgets as linear constraints. Ties go to the lower
   cost (the budgeted one first), then to fewer units.
2. Predicts each rung's gain - damage with the fitted curves, and returns the cheapest rung within `noise` (one
   standard deviation of a measured scheme gain) of the best one: the budget is a ceiling, not a target.
   `spend="budget"` returns the top rung instead; so does a table without measured schemes, whose additive score
   cannot say where gain saturates (the report says so).

A table whose measured schemes span depth rather than budget (`planning.calibration`, `depths`) is planned on what
they measured instead: the plan is the cheapest measured scheme under the ceiling whose measured gain - damage is
within noise of the best one and, where the candidates' reply agreement was measured (`planning.agreement`), whose
agreement is within noise of the best among those (`spend="budget"`: the best gain - damage), and the report lists
every candidate.

Typical use:

    plan = make_plan(table, costs, budget_mb=DEVICE_BUDGETS_MB["gpu-24gb"])
    print(plan_report(plan, costs))
    model = get_pock_model(model, plan.to_config())
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from ..io.files import atomic_write_text, check_format_version, dataclass_from_json, read_json_object, save_figure
from ..tuner import PockConfig
from ..tuner.config import CHANNEL_AXES
from .gain_model import GainModel, fit_gain_model, measurement_noise
from .table import WHOLE_LAYER, SensitivityTable

if TYPE_CHECKING:
    from .costs import CostProfile

PLAN_FORMAT_VERSION = 2
SPEND_MODES = ("gain", "budget")
# budgets on the ladder from the smallest feasible one to the ceiling (geometric)
LADDER_RUNGS = 12
# Values closer than this fraction of the summed positive value are ties (then: lower cost, then fewer units), so
# float rounding in sums taken in different orders cannot decide between equal schemes.
VALUE_TIE_TOLERANCE = 1e-9
# HiGHS keeps constraints to about 1e-7; a solution over budget by that much is solved again, tighter
SOLVER_TOLERANCE = 1e-7
BUDGET_RETRIES = 4
SOLVER_TIME_LIMIT_S = 60.0


@dataclass
class LadderRung:
    """One budget on the way to the ceiling: the best scheme there, its cost (MB, s), additive score and predicted
    gain and damage (metric units); for a measured candidate, its measured peak (MB), step (s) and reply agreement
    (0..1, `planning.agreement`)."""

    memory_mb: float
    step_s: float
    units: int
    cut_layer: int
    additive_gain: float
    predicted_gain: float
    predicted_damage: float
    label: str = ""
    measured_peak_mb: float | None = None
    measured_step_s: float | None = None
    measured_agreement: float | None = None


@dataclass
class Plan:
    """A chosen scheme with what it is predicted to gain and cost.

    `units` are (layer, module, ratio) with `module` a path inside a decoder layer or `"*"`, sorted by layer;
    `unit_gains` and `unit_damages` their table values. `scheme` maps full module names to ratios (what `PockConfig`
    takes). `cut_layer` is the deepest updated layer: backward runs through layers `cut_layer` and above only.
    `additive_gain` is the summed unit gain; `predicted_gain` the gain the fitted curve predicts (the additive sum
    where the table has no measured schemes, `gain_model` None), with a 95% `predicted_gain_interval`;
    `predicted_damage` the predicted loss increase on replay data (0 without damage data), all in the table's
    `metric`. `predicted_memory_mb` (MB) and `predicted_step_s` (s) are the cost model's memory and training-step
    time. `budget_mb` (MB) and `budget_time_ratio` (fraction of `full_step_s`, the full fine-tuning step in s) are the
    ceilings (None: not constrained); `spend` says whether the plan stopped where gain stopped growing (`"gain"`) or
    spent the ceiling (`"budget"`), `ladder` holds the budgets it compared and `stop_reason` why it chose this one.
    `selection` is `"predicted"` (gains from the fitted curve) or `"measured"` (the scheme was one of the table's
    measured depth candidates: `predicted_gain` and `predicted_damage` are what it measured, and the ladder lists
    the candidates).
    `axis` is the channel axis the unit memory was counted for; the fingerprints and `device` say which model, data
    and device it belongs to.
    """

    units: list[tuple[int, str, float]]
    scheme: dict[str, float]
    cut_layer: int
    predicted_gain: float
    predicted_memory_mb: float
    predicted_step_s: float
    budget_mb: float | None
    budget_time_ratio: float | None
    metric: str
    model_fingerprint: dict
    data_fingerprint: str
    additive_gain: float = 0.0
    predicted_gain_interval: tuple[float, float] | None = None
    predicted_damage: float = 0.0
    unit_gains: list[float] = field(default_factory=list)
    unit_damages: list[float] = field(default_factory=list)
    damage_weight: float = 1.0
    spend: str = "gain"
    gain_model: GainModel | None = None
    ladder: list[LadderRung] = field(default_factory=list)
    stop_reason: str = ""
    full_step_s: float | None = None
    axis: str = "out"
    device: str = ""
    selection: str = "predicted"
    format_version: int = PLAN_FORMAT_VERSION

    def to_config(self, **pock_config_kwargs) -> PockConfig:
        """A `PockConfig` with this scheme; `channel_axis` defaults to the axis the memory was planned for."""
        pock_config_kwargs.setdefault("channel_axis", self.axis)
        return PockConfig(scheme=dict(self.scheme), **pock_config_kwargs)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["units"] = [list(unit) for unit in self.units]
        if self.predicted_gain_interval is not None:
            data["predicted_gain_interval"] = list(self.predicted_gain_interval)
        # the scheme first, so the file reads as a scheme with metadata
        return {"scheme": data.pop("scheme"), **data}

    @classmethod
    def from_dict(cls, data: dict, source: str = "plan") -> Plan:
        """The plan in `data` (what `to_dict` gives), every field type-checked.

        Raises:
            ValueError: naming `source` and the field: another format version, a missing, unknown or mistyped field.
        """
        check_format_version(data, PLAN_FORMAT_VERSION, "plan", source, "plan again with this version")
        return dataclass_from_json(cls, data, source)

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON (atomically): `{"scheme": {...}, "predicted_gain": ..., ...}`.

        `PockConfig(scheme=path)` reads the scheme from it.
        """
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Plan:
        return cls.from_dict(read_json_object(path, "Plan"), source=os.fspath(path))


# --- public entry points ---------------------------------------------------------------------------------------------


def make_plan(
    table: SensitivityTable,
    costs: CostProfile,
    *,
    budget_mb: float | None = None,
    budget_time_ratio: float | None = None,
    axis: str = "out",
    spend: str = "gain",
    damage_weight: float = 1.0,
) -> Plan:
    """The cheapest scheme whose predicted gain - `damage_weight` x damage is within noise of the best one whose
    memory (MB) is at most `budget_mb` and whose training step (s) is at most `budget_time_ratio` x
    `costs.full_step_s` (give one ceiling or both). `spend="budget"` returns the best scheme at the ceiling itself.

    `axis` is the channel axis the scheme will train (it changes unit memory). `damage_weight` 0 ignores damage.
    Each scheme on the way is optimal on the exact costs.

    Raises:
        ValueError: no budget, a non-positive budget, an unknown axis or spend mode, a negative damage weight; table
            and costs from different models (both digests named); a malformed table (mixed `"*"` and per-module rows
            in a layer, duplicate units, unknown modules or layers, mixed metrics, no unit worth choosing); or a
            budget too small for even one unit (the message states the smallest feasible budget).
    """
    if spend not in SPEND_MODES:
        raise ValueError(f"`spend` is {spend!r}; valid values are {SPEND_MODES}.")
    if table.schemes and table.settings.get("scheme_candidates") == "depths":
        return _measured_plan(table, costs, budget_mb, budget_time_ratio, axis, spend, damage_weight)
    planner = _Planner(table, costs, axis, damage_weight)
    budget_s = planner.check_budgets(budget_mb, budget_time_ratio)
    ladder = planner.ladder(budget_mb, budget_s)
    if not ladder:
        raise ValueError(planner.infeasible_message(budget_mb, budget_time_ratio))
    (rung_mb, rung_s, _), reason = planner.choose(ladder, spend, budget_mb, budget_s)
    chosen = planner.best(rung_mb, rung_s, tie_break=True)
    return planner.to_plan(chosen, [scheme for _, _, scheme in ladder], reason, budget_mb, budget_time_ratio, spend)


def plan_scheme(
    table: SensitivityTable,
    costs: CostProfile,
    *,
    budget_mb: float | None = None,
    budget_time_ratio: float | None = None,
    axis: str = "out",
    spend: str = "gain",
    damage_weight: float = 1.0,
    **config_kwargs,
) -> PockConfig:
    """`make_plan(...)` as a `PockConfig` (with `channel_axis=axis` and the other `config_kwargs`)."""
    plan = make_plan(
        table,
        costs,
        budget_mb=budget_mb,
        budget_time_ratio=budget_time_ratio,
        axis=axis,
        spend=spend,
        damage_weight=damage_weight,
    )
    return plan.to_config(channel_axis=axis, **config_kwargs)


def gain_vs_budget(
    table: SensitivityTable, costs: CostProfile, budgets_mb: list[float], axis: str = "out", damage_weight: float = 1.0
) -> list[Plan | None]:
    """The best plan spending each memory budget (MB), None where not even one unit fits (no ladder: each plan is
    the top rung of its own budget)."""
    planner = _Planner(table, costs, axis, damage_weight)
    plans = []
    for budget in budgets_mb:
        scheme = planner.best(float(budget), None, tie_break=True) if budget > 0 else None
        reason = "spend='budget': the best scheme under the ceiling"
        plans.append(None if scheme is None else planner.to_plan(scheme, [scheme], reason, budget, None, "budget"))
    return plans


def plot_gain_vs_budget(plan: Plan, path: str | os.PathLike, table: SensitivityTable | None = None) -> Path:
    """A PNG of the plan's ladder: predicted gain (with its interval), damage and additive score against memory (MB),
    the measured schemes of `table` (with their standard errors), and the chosen scheme marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    memory = [rung.memory_mb for rung in plan.ladder]
    figure, ax = plt.subplots(figsize=(6.8, 4.2))
    predicted = np.array([rung.predicted_gain for rung in plan.ladder])
    measured = plan.selection == "measured"
    # measured candidates are separate schemes, not points on a curve: markers only, each named
    style = {"marker": "o" if measured else ".", "linestyle": "none" if measured else "-"}
    label = "measured gain" if measured else "predicted gain" if plan.gain_model else "additive gain"
    ax.plot(memory, predicted, label=label, **style)
    for rung in plan.ladder if measured else []:
        ax.annotate(rung.label, (rung.memory_mb, rung.predicted_gain), fontsize=6, rotation=20)
    if plan.gain_model is not None:
        noise = 1.96 * plan.gain_model.noise
        ax.fill_between(memory, predicted - noise, predicted + noise, alpha=0.15, label="95% interval")
        ax.plot(memory, [rung.additive_gain for rung in plan.ladder], ":", color="grey", label="additive score")
    damage = [rung.predicted_damage for rung in plan.ladder]
    if any(damage):
        what = "measured" if measured else "predicted"
        ax.plot(memory, damage, color="C2", label=f"{what} damage (replay loss increase)", **style)
    if table is not None and table.schemes and not measured:
        ax.errorbar(
            [s.memory_mb for s in table.schemes],
            [s.gain for s in table.schemes],
            yerr=[1.96 * s.gain_se for s in table.schemes],
            fmt="o",
            color="C1",
            label="measured schemes",
        )
    ax.plot(
        [plan.predicted_memory_mb],
        [plan.predicted_gain],
        marker="*",
        markersize=14,
        linestyle="none",
        color="C3",
        label=f"chosen: {len(plan.units)} units, cut at layer {plan.cut_layer}",
    )
    if plan.budget_mb is not None:
        ax.axvline(plan.budget_mb, color="black", linewidth=0.8, linestyle="--", label="memory ceiling")
    ax.set(xlabel="memory (MB)", ylabel=f"{plan.metric} improvement")
    ax.set_title(f"Pock plans on {plan.device}: {plan.stop_reason}", fontsize=8, wrap=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(figure, path)


def plan_report(plan: Plan, costs: CostProfile) -> str:
    """A short Markdown report: chosen units, predicted gain (interval) and damage, memory against the ceiling, step
    time against a full fine-tuning step, the cut layer, and the gain-vs-budget ladder with where it stopped."""
    _check_fingerprints(plan.model_fingerprint, costs.model_fingerprint, "plan")
    lines = [
        "# Pock plan",
        "",
        (
            f"Model `{plan.model_fingerprint.get('digest')}`, data `{plan.data_fingerprint}`, "
            f"device `{costs.device}`, channel axis `{plan.axis}`."
        ),
        "",
        "| layer | module | ratio | gain alone | damage alone |",
        "|---:|---|---:|---:|---:|",
    ]
    damages = plan.unit_damages or [0.0] * len(plan.units)
    gains = plan.unit_gains or [math.nan] * len(plan.units)
    lines += [
        f"| {layer} | `{module}` | {ratio:g} | {gain:.4g} | {damage:.4g} |"
        for (layer, module, ratio), gain, damage in zip(plan.units, gains, damages)
    ]
    memory_budget = f"a {plan.budget_mb:.1f} MB ceiling" if plan.budget_mb is not None else "no memory ceiling"
    time_budget = f"ceiling {plan.budget_time_ratio:.1%}" if plan.budget_time_ratio is not None else "no time ceiling"
    measured = plan.selection == "measured"
    if measured and plan.predicted_gain_interval is not None:
        low, high = plan.predicted_gain_interval
        gain_line = (
            f"- Measured gain: {plan.predicted_gain:.4g} [{low:.4g}, {high:.4g}] ({plan.metric} improvement of this "
            f"very scheme, trained as the run trains, chosen among {len(plan.ladder)} measured candidates; additive "
            f"score {plan.additive_gain:.4g} over {len(plan.units)} units)"
        )
    elif plan.gain_model is not None and plan.predicted_gain_interval is not None:
        low, high = plan.predicted_gain_interval
        gain_line = (
            f"- Predicted gain: {plan.predicted_gain:.4g} [{low:.4g}, {high:.4g}] ({plan.metric} improvement, "
            f"fitted on {plan.gain_model.points} measured schemes; additive score {plan.additive_gain:.4g} "
            f"over {len(plan.units)} units)"
        )
    else:
        gain_line = (
            f"- Predicted gain: {plan.predicted_gain:.4g} ({plan.metric} improvement, sum over {len(plan.units)} "
            "units alone: an upper bound, the table has no measured schemes)"
        )
    lines += [
        "",
        gain_line,
        (
            f"- Predicted damage (loss increase on replay data): {plan.predicted_damage:.4g} "
            f"(weighted {plan.damage_weight:g} in the objective)"
        ),
        f"- Predicted memory: {plan.predicted_memory_mb:.1f} MB of {memory_budget}"
        + (" (the larger of the cost model's and the peak measured while the candidate trained)" if measured else ""),
        (
            f"- Predicted step time: {plan.predicted_step_s:.4g} s = {plan.predicted_step_s / costs.full_step_s:.1%} "
            f"of a full fine-tuning step ({costs.full_step_s:.4g} s); {time_budget}"
        ),
        f"- Cut layer: {plan.cut_layer} (backward runs through layers {plan.cut_layer}..{costs.num_layers - 1} only)",
        f"- Stopped: {plan.stop_reason}",
        "",
    ]
    what = "measured" if measured else "predicted"
    extra = " measured peak (MB) | measured step (s) | reply agreement |" if measured else ""
    lines += [
        f"| memory (MB) | step (s) | units | cut | additive score | {what} gain | {what} damage |{extra} |",
        "|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * extra.count("|") + "---|",
    ]
    for rung in plan.ladder:
        chosen = math.isclose(rung.memory_mb, plan.predicted_memory_mb) and rung.units == len(plan.units)
        mark = ", ".join(part for part in (rung.label, "chosen" if chosen else "") if part)
        costs_measured = (
            f" {_or_dash(rung.measured_peak_mb, '.1f')} | {_or_dash(rung.measured_step_s, '.3g')} |"
            f" {_or_dash(rung.measured_agreement, '.2f')} |"
            if measured
            else ""
        )
        lines.append(
            f"| {rung.memory_mb:.1f} | {rung.step_s:.3g} | {rung.units} | {rung.cut_layer} | {rung.additive_gain:.4g} "
            f"| {rung.predicted_gain:.4g} | {rung.predicted_damage:.4g} |{costs_measured} {mark} |"
        )
    lines.append("")
    return "\n".join(lines)


def _or_dash(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _measured_plan(
    table: SensitivityTable,
    costs: CostProfile,
    budget_mb: float | None,
    budget_time_ratio: float | None,
    axis: str,
    spend: str,
    damage_weight: float,
) -> Plan:
    """The plan among the table's measured depth candidates (see the module docstring): exact costs from `costs`,
    gains and damage as measured, noise the typical paired standard error between two candidates. A candidate's
    memory is the larger of the cost model's and the peak measured while it trained on this device (the table's
    `settings["schemes_device"]` is `costs.device`): one that went over the ceiling in its own training is not
    chosen, whatever the cost model said. "Cheapest" is judged at the memory noise, the standard deviation of the
    candidates' measured peaks from their predictions: among the candidates within noise of the best gain - damage,
    those within that noise of the cheapest cost the same, and the best of them is chosen (depth candidates are each
    the best scheme at the ceiling for their depth, so their memory differs by less than the measurement can tell)."""
    planner = _Planner(dataclasses.replace(table, schemes=[]), costs, axis, damage_weight)  # checks, costs
    budget_s = planner.check_budgets(budget_mb, budget_time_ratio)
    rows = {(row.layer, row.module, row.ratio): row for row in table.rows}
    same_device = table.settings.get("schemes_device") == costs.device  # a peak measured elsewhere says nothing here
    candidates, over_by_peak, misses = [], [], []
    for measurement in table.schemes:
        units = sorted(tuple(unit) for unit in measurement.units)
        predicted, step = costs.scheme_cost(units, axis)
        if same_device and measurement.peak_memory_mb is not None:
            misses.append(measurement.peak_memory_mb - predicted)
        memory = max(predicted, measurement.peak_memory_mb or 0.0) if same_device else predicted
        if (budget_mb is None or memory <= budget_mb) and (budget_s is None or step <= budget_s):
            value = measurement.gain - damage_weight * (measurement.damage or 0.0)
            candidates.append((memory, step, value, units, measurement))
        elif budget_mb is not None and predicted <= budget_mb < memory and (budget_s is None or step <= budget_s):
            over_by_peak.append(memory)
    if not candidates and over_by_peak:
        raise ValueError(
            f"Every depth candidate that the cost model fits under the {budget_mb:.0f} MB ceiling peaked above it "
            f"while it trained (the lowest at {min(over_by_peak):.0f} MB): this process needs more than the ceiling. "
            "Raise the ceiling, or measure and plan in another process (`pock sensitivity`, `pock plan`) and train "
            "the plan's scheme file."
        )
    if not candidates:
        raise ValueError(
            "None of the table's measured depth candidates fits the ceiling "
            f"(budget_mb={budget_mb}, budget_time_ratio={budget_time_ratio}): measure them under this ceiling."
        )
    candidates.sort(key=lambda candidate: candidate[0])
    noise = measurement_noise(table.schemes)
    best = max(candidates, key=lambda candidate: (candidate[2], -candidate[0]))
    if spend == "budget":
        chosen, reason = best, "spend='budget': the best measured candidate under the ceiling"
    else:
        within = [candidate for candidate in candidates if candidate[2] >= best[2] - noise]
        reason = (
            f"cheapest measured candidate within noise ({noise:.3g}) of the best measured gain - damage "
            f"({best[2]:.4g}: {best[4].label})"
        )
        if damage_weight:
            within, kept = _most_agreeing(within)
            reason += kept
        memory_noise = statistics.stdev(misses) if len(misses) >= 2 else 0.0
        as_cheap = [candidate for candidate in within if candidate[0] <= within[0][0] + memory_noise]
        chosen = max(as_cheap, key=lambda candidate: (candidate[2], -candidate[0]))
        if memory_noise:
            reason += f", the best of those within the memory noise ({memory_noise:.3g} MB) of the cheapest"
    memory, step, _, units, measurement = chosen
    ladder = [
        LadderRung(
            mb, s, len(u), u[0][0], math.fsum(rows[unit].gain for unit in u), m.gain, m.damage or 0.0, m.label,
            m.peak_memory_mb, m.step_s, m.agreement,
        )
        for mb, s, _, u, m in candidates
    ]  # fmt: skip
    return Plan(
        units=units,
        scheme={name: ratio for layer, module, ratio in units for name in table.module_names(layer, module)},
        cut_layer=units[0][0],
        predicted_gain=measurement.gain,
        predicted_memory_mb=memory,
        predicted_step_s=step,
        budget_mb=budget_mb,
        budget_time_ratio=budget_time_ratio,
        metric=table.rows[0].metric,
        model_fingerprint=dict(table.model_fingerprint),
        data_fingerprint=table.data_fingerprint,
        additive_gain=math.fsum(rows[unit].gain for unit in units),
        predicted_gain_interval=(
            measurement.gain - 1.96 * measurement.gain_se,
            measurement.gain + 1.96 * measurement.gain_se,
        ),
        predicted_damage=measurement.damage or 0.0,
        unit_gains=[rows[unit].gain for unit in units],
        unit_damages=[rows[unit].damage or 0.0 for unit in units],
        damage_weight=damage_weight,
        spend=spend,
        ladder=ladder,
        stop_reason=reason,
        full_step_s=costs.full_step_s,
        axis=axis,
        device=costs.device,
        selection="measured",
    )


def _most_agreeing(candidates: list) -> tuple[list, str]:
    """Of measured candidates (memory, step, value, units, measurement) that gain alike, those whose reply agreement
    (`planning.agreement`) is within its noise (the standard error of the most agreeing one) of the most agreeing
    one's, in the same order, and a clause saying so for the stop reason; all of them where any is unmeasured. Only
    candidates that gain as much as the best are compared: a scheme that learns little keeps the most behaviour."""
    if any(candidate[4].agreement is None for candidate in candidates):
        return candidates, ""
    most = max(candidates, key=lambda candidate: candidate[4].agreement)[4]
    floor = most.agreement - (most.agreement_se or 0.0)
    kept = [candidate for candidate in candidates if candidate[4].agreement >= floor]
    return kept, (
        f", whose reply agreement with the base model is within noise of the best among those "
        f"({most.agreement:.2f} +- {most.agreement_se or 0.0:.2f}: {most.label})"
    )


# --- units and their exact costs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Option:
    """One ratio of a unit with its table gain and damage, its value in the objective, and its exact extra cost:
    memory (MB) and step time (s)."""

    ratio: float
    gain: float
    damage: float
    value: float
    memory_mb: float
    step_s: float


@dataclass(frozen=True)
class _Unit:
    layer: int
    module: str
    options: tuple[_Option, ...]


@dataclass
class _Scheme:
    """A candidate scheme with its exact cost at its real cut and its summed table values."""

    chosen: list[tuple[_Unit, _Option]]
    cut: int
    additive_gain: float
    damage_score: float
    memory_mb: float
    step_s: float


def _unit_keys(scheme: _Scheme) -> list[tuple[int, str, float]]:
    return sorted((unit.layer, unit.module, option.ratio) for unit, option in scheme.chosen)


def _check_fingerprints(expected: dict, actual: dict, what: str) -> None:
    if expected.get("digest") != actual.get("digest"):
        raise ValueError(
            f"The {what} belongs to model fingerprint {expected.get('digest')!r} but the cost profile to "
            f"{actual.get('digest')!r}: profile costs (and measure sensitivity) on the same model."
        )


def _check_table(table: SensitivityTable, costs: CostProfile) -> None:
    """The table against the profile: same model, one metric, known layers and modules, one row per unit, one
    granularity per layer."""
    _check_fingerprints(table.model_fingerprint, costs.model_fingerprint, "sensitivity table")
    metrics = {row.metric for row in table.rows}
    if len(metrics) > 1:
        raise ValueError(f"The table mixes metrics {sorted(metrics)}: their gains cannot be summed.")
    seen, granularity = set(), {}
    for row in table.rows:
        if not 0 <= row.layer < costs.num_layers:
            raise ValueError(
                f"Table row at layer {row.layer}: the profiled model has layers 0..{costs.num_layers - 1}."
            )
        if row.module != WHOLE_LAYER and row.module not in costs.module_shapes:
            raise ValueError(
                f"Table row module {row.module!r} is not profiled; valid: {sorted(costs.module_shapes)} or '*'."
            )
        if not 0 < row.ratio <= 1:
            raise ValueError(f"Table row {row.layer}/{row.module}: ratio {row.ratio!r} is outside (0, 1].")
        key = (row.layer, row.module, row.ratio)
        if key in seen:
            raise ValueError(f"The table has two rows for unit {key}: keep one gain per unit.")
        seen.add(key)
        whole = row.module == WHOLE_LAYER
        if granularity.setdefault(row.layer, whole) != whole:
            raise ValueError(
                f"Layer {row.layer} has both '*' (whole-layer) and per-module rows: a table has one granularity."
            )


def table_gain_model(table: SensitivityTable) -> GainModel | None:
    """The saturation curve fitted on the table's measured schemes; None with fewer than two."""
    if len(table.schemes) < 2:
        return None
    gains = {(row.layer, row.module, row.ratio): row for row in table.rows}
    scores, damage_scores = [], []
    for measurement in table.schemes:
        rows = [gains.get(tuple(unit)) for unit in measurement.units]
        if any(row is None for row in rows):
            missing = next(unit for unit, row in zip(measurement.units, rows) if row is None)
            raise ValueError(f"A measured scheme of the table has unit {tuple(missing)}, which has no table row.")
        scores.append(math.fsum(row.gain for row in rows))
        damage_scores.append(math.fsum(row.damage or 0.0 for row in rows))
    has_damage = any(row.damage is not None for row in table.rows)
    return fit_gain_model(scores, table.schemes, damage_scores if has_damage else None)


# --- the planner -----------------------------------------------------------------------------------------------------


class _Planner:
    """Checks the inputs, prices every unit option, and answers budgets with exact 0/1 programmes."""

    def __init__(self, table: SensitivityTable, costs: CostProfile, axis: str, damage_weight: float):
        if axis not in CHANNEL_AXES:
            raise ValueError(f"`axis` is {axis!r}; valid values are {CHANNEL_AXES}.")
        if not (math.isfinite(damage_weight) and damage_weight >= 0):
            raise ValueError(f"`damage_weight` is {damage_weight!r}; it must be a number >= 0.")
        _check_table(table, costs)
        self.table, self.costs, self.axis, self.damage_weight = table, costs, axis, damage_weight
        self.model = table_gain_model(table)
        self.units = self._collect_units()
        self.pairs = [(unit, option) for unit in self.units for option in unit.options]
        self.tolerance = VALUE_TIE_TOLERANCE * math.fsum(option.value for _, option in self.pairs)
        self.cuts = sorted({unit.layer for unit in self.units})

    # values

    def _unit_value(self, gain: float, damage: float) -> float:
        """First-order worth of a unit in the objective: its gain and damage under the fitted curves (raw table
        values without measured schemes)."""
        if self.model is None:
            return gain - self.damage_weight * damage
        damage_value = self.model.damage(damage, gain) if self.model.has_damage else damage
        return self.model.slope() * gain - self.damage_weight * damage_value

    def predict(self, scheme: _Scheme) -> tuple[float, float]:
        """Predicted (gain, damage) of a scheme, metric units."""
        if self.model is None:
            return scheme.additive_gain, scheme.damage_score
        if not self.model.has_damage:
            return self.model.gain(scheme.additive_gain), scheme.damage_score
        return self.model.gain(scheme.additive_gain), self.model.damage(scheme.damage_score, scheme.additive_gain)

    def objective(self, scheme: _Scheme) -> float:
        gain, damage = self.predict(scheme)
        return gain - self.damage_weight * damage

    def _collect_units(self) -> list[_Unit]:
        """Units with at least one option of positive, finite value, ordered by layer then module."""
        options: dict[tuple[int, str], list[_Option]] = {}
        for row in self.table.rows:
            damage = row.damage if row.damage is not None and math.isfinite(row.damage) else 0.0
            if not math.isfinite(row.gain):
                continue
            value = self._unit_value(row.gain, damage)
            if value > 0:
                cost = (
                    self.costs.unit_memory_mb(row.module, row.ratio, self.axis),
                    self.costs.unit_time_s(row.module, row.ratio),
                )
                options.setdefault((row.layer, row.module), []).append(
                    _Option(row.ratio, row.gain, damage, value, *cost)
                )
        if not options and self.model is not None:
            gains = ", ".join(f"{s.gain:+.3g}" for s in self.table.schemes)
            raise ValueError(
                f"No unit is worth fine-tuning: the table's measured schemes gained {gains} ({self.table.rows[0].metric}"
                f" improvement), a curve with no gain net of damage (damage weight {self.damage_weight:g}). Check "
                "that the validation data is what tuning should improve, or train longer or with another rate."
            )
        if not options:
            raise ValueError(
                "No unit in the table has a positive gain (net of damage): there is nothing worth fine-tuning."
            )
        order = {module: index for index, module in enumerate((*self.table.layer_modules, WHOLE_LAYER))}
        keys = sorted(options, key=lambda key: (key[0], order.get(key[1], len(order)), key[1]))
        return [
            _Unit(layer, module, tuple(sorted(options[layer, module], key=lambda o: o.ratio)))
            for layer, module in keys
        ]

    # exact costs

    def evaluate(self, chosen: list[tuple[_Unit, _Option]]) -> _Scheme:
        order = {module: index for index, module in enumerate((*self.table.layer_modules, WHOLE_LAYER))}
        chosen = sorted(chosen, key=lambda pair: (pair[0].layer, order.get(pair[0].module, len(order))))
        cut = chosen[0][0].layer
        return _Scheme(
            chosen=chosen,
            cut=cut,
            additive_gain=math.fsum(option.gain for _, option in chosen),
            damage_score=math.fsum(option.damage for _, option in chosen),
            memory_mb=self.costs.base_memory_mb(cut) + math.fsum(option.memory_mb for _, option in chosen),
            step_s=self.costs.step_s_by_cut[cut] + math.fsum(option.step_s for _, option in chosen),
        )

    @staticmethod
    def _fits(scheme: _Scheme, budget_mb: float | None, budget_s: float | None) -> bool:
        return (budget_mb is None or scheme.memory_mb <= budget_mb) and (budget_s is None or scheme.step_s <= budget_s)

    def check_budgets(self, budget_mb: float | None, budget_time_ratio: float | None) -> float | None:
        """The time ceiling in seconds, after checking the ceilings."""
        if budget_mb is None and budget_time_ratio is None:
            raise ValueError(
                "Give a budget: `budget_mb` (MB), `budget_time_ratio` (fraction of a full step), or both."
            )
        for name, value in (("budget_mb", budget_mb), ("budget_time_ratio", budget_time_ratio)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` is {value!r}; it must be a positive number.")
        return None if budget_time_ratio is None else budget_time_ratio * self.costs.full_step_s

    # the 0/1 programme

    def best(self, budget_mb: float | None, budget_s: float | None, tie_break: bool = False) -> _Scheme | None:
        """The scheme of highest summed value within both budgets (exact costs); None when nothing fits. With
        `tie_break`, ties go to the lower cost (the memory budget's first when given), then to fewer units."""
        problem = _Programme(self, budget_mb, budget_s)
        first = problem.solve(-problem.values)
        if first is None or not tie_break:
            return first
        best_value = math.fsum(option.value for _, option in first.chosen)
        floor = (problem.values, best_value - self.tolerance)
        primary = problem.memory if budget_mb is not None or budget_s is None else problem.time
        cheapest = problem.solve(primary, floor) or first
        cost = float(primary @ problem.indicator(cheapest))
        fewest = problem.solve(problem.counts, floor, (primary, cost + 1e-9 * max(abs(cost), 1.0)))
        return fewest or cheapest

    def ladder(
        self, budget_mb: float | None, budget_s: float | None
    ) -> list[tuple[float | None, float | None, _Scheme]]:
        """(memory budget, time budget, best scheme) at `LADDER_RUNGS` budgets from the smallest feasible one up to
        the ceilings (both scaled together, geometrically), smallest budget first, each distinct scheme once at the
        smallest budget that buys it; empty when nothing fits the ceiling."""
        lowest = min(self._scale_needed(self.evaluate([pair]), budget_mb, budget_s) for pair in self.pairs)
        if lowest > 1:
            return []
        rungs: list[tuple[float | None, float | None, _Scheme]] = []
        for scale in np.geomspace(lowest, 1.0, LADDER_RUNGS) if lowest < 1 else [1.0]:
            scale = min(float(scale), 1.0)
            rung_mb = None if budget_mb is None else budget_mb * scale
            rung_s = None if budget_s is None else budget_s * scale
            scheme = self.best(rung_mb, rung_s)
            if scheme is not None and not any(self._same(scheme, other) for _, _, other in rungs):
                rungs.append((rung_mb, rung_s, scheme))
        return rungs

    @staticmethod
    def _scale_needed(scheme: _Scheme, budget_mb: float | None, budget_s: float | None) -> float:
        needs = []
        if budget_mb is not None:
            needs.append(scheme.memory_mb / budget_mb)
        if budget_s is not None:
            needs.append(scheme.step_s / budget_s)
        return max(needs)

    @staticmethod
    def _same(a: _Scheme, b: _Scheme) -> bool:
        return _unit_keys(a) == _unit_keys(b)

    def choose(self, ladder: list, spend: str, budget_mb: float | None, budget_s: float | None) -> tuple[tuple, str]:
        """The rung to return, (memory budget, time budget, scheme), and why; the ceiling's budgets where it is the
        top rung."""
        top = max(ladder, key=lambda rung: (self.objective(rung[2]), -rung[2].memory_mb))
        ceiling = (budget_mb, budget_s, ladder[-1][2])
        if spend == "budget":
            return ceiling, "spend='budget': the best scheme under the ceiling"
        if self.model is None:
            return ceiling, (
                "the table has no measured schemes, so the additive score cannot tell where gain saturates: "
                "planned to the ceiling (measure schemes with planning.calibration to stop earlier)"
            )
        best = self.objective(top[2])
        chosen = next(rung for rung in ladder if self.objective(rung[2]) >= best - self.model.noise)
        if chosen is ladder[-1]:
            return ceiling, "predicted gain - damage still grows at the ceiling"
        return chosen, (
            f"smallest scheme within noise ({self.model.noise:.3g}) of the best predicted gain - damage under the "
            f"ceiling ({best:.4g} at {top[2].memory_mb:.0f} MB)"
        )

    def to_plan(
        self,
        scheme: _Scheme,
        ladder: list[_Scheme],
        reason: str,
        budget_mb: float | None,
        budget_time_ratio: float | None,
        spend: str,
    ) -> Plan:
        units = [(unit.layer, unit.module, option.ratio) for unit, option in scheme.chosen]
        names = {name: ratio for layer, module, ratio in units for name in self.table.module_names(layer, module)}
        gain, damage = self.predict(scheme)
        rungs = []
        for rung in ladder:
            rung_gain, rung_damage = self.predict(rung)
            rungs.append(
                LadderRung(
                    rung.memory_mb, rung.step_s, len(rung.chosen), rung.cut, rung.additive_gain, rung_gain, rung_damage
                )
            )
        return Plan(
            units=units,
            scheme=names,
            cut_layer=scheme.cut,
            predicted_gain=gain,
            predicted_memory_mb=scheme.memory_mb,
            predicted_step_s=scheme.step_s,
            budget_mb=budget_mb,
            budget_time_ratio=budget_time_ratio,
            metric=self.table.rows[0].metric,
            model_fingerprint=dict(self.table.model_fingerprint),
            data_fingerprint=self.table.data_fingerprint,
            additive_gain=scheme.additive_gain,
            predicted_gain_interval=None if self.model is None else self.model.interval(scheme.additive_gain),
            predicted_damage=damage,
            unit_gains=[option.gain for _, option in scheme.chosen],
            unit_damages=[option.damage for _, option in scheme.chosen],
            damage_weight=self.damage_weight,
            spend=spend,
            gain_model=self.model,
            ladder=rungs,
            stop_reason=reason,
            full_step_s=self.costs.full_step_s,
            axis=self.axis,
            device=self.costs.device,
        )

    # limits

    def smallest_budgets(self) -> tuple[float, float]:
        """The smallest memory budget (MB) and time budget (fraction of a full step) that fit one unit."""
        singles = [self.evaluate([pair]) for pair in self.pairs]
        return min(s.memory_mb for s in singles), min(s.step_s for s in singles) / self.costs.full_step_s

    def infeasible_message(self, budget_mb: float | None, budget_time_ratio: float | None) -> str:
        memory, ratio = self.smallest_budgets()
        # rounded up, so the number shown is itself feasible
        memory_text = f"{math.ceil(memory * 100) / 100:.2f} MB"
        ratio_text = f"{math.ceil(ratio * 10**4) / 10**4:.4f} x the full step ({self.costs.full_step_s:.4g} s)"
        given = ", ".join(
            f"{name}={value}"
            for name, value in (("budget_mb", budget_mb), ("budget_time_ratio", budget_time_ratio))
            if value is not None
        )
        parts = []
        if budget_mb is not None:
            parts.append(f"the smallest feasible memory budget is {memory_text}")
        if budget_time_ratio is not None:
            parts.append(f"the smallest feasible time budget is budget_time_ratio={ratio_text}")
        message = f"No scheme fits {given}: " + " and ".join(parts) + " (one unit at its cut)"
        if (budget_mb is None or memory <= budget_mb) and (budget_time_ratio is None or ratio <= budget_time_ratio):
            message += "; no single unit meets both budgets at once, raise either"
        return message + "."


class _Programme:
    """The 0/1 programme for one pair of budgets. Variables: one binary per unit option (x), then one per candidate
    cut layer c (u_c: backward reaches layer c), monotone (u_c <= u_c' for c < c': whatever runs backward at a layer
    runs it above too). A unit's options need its layer reached (sum of x <= u_layer, which also allows one option
    per unit). A cut's base cost telescopes over the reached layers, base(top) + sum of (base(c) - base(next c)) u_c,
    so the deepest reached layer pays exactly its own base cost; the base costs are made non-increasing upwards first
    (an over-estimate only where a measured profile is not), and every solution is costed exactly afterwards. Memory
    and time within budget; costs enter as floats."""

    def __init__(self, planner: _Planner, budget_mb: float | None, budget_s: float | None):
        self.planner, self.budget_mb, self.budget_s = planner, budget_mb, budget_s
        pairs, cuts, costs = planner.pairs, planner.cuts, planner.costs
        n_x, n_u = len(pairs), len(cuts)
        self.size = n_x + n_u
        self.values = np.concatenate([[o.value for _, o in pairs], np.zeros(n_u)])
        self.counts = np.concatenate([np.ones(n_x), np.zeros(n_u)])
        memory_base = np.maximum.accumulate([costs.base_memory_mb(c) for c in reversed(cuts)])[::-1]
        time_base = np.maximum.accumulate([costs.step_s_by_cut[c] for c in reversed(cuts)])[::-1]
        # constants (the top candidate's base) go to the budgets; the rest telescopes over u
        self.memory_offset, self.time_offset = float(memory_base[-1]), float(time_base[-1])
        memory_steps = np.append(memory_base[:-1] - memory_base[1:], 0.0)  # what reaching each deeper layer adds
        time_steps = np.append(time_base[:-1] - time_base[1:], 0.0)
        self.memory = np.concatenate([[o.memory_mb for _, o in pairs], memory_steps])
        self.time = np.concatenate([[o.step_s for _, o in pairs], time_steps])
        reach = {cut: n_x + j for j, cut in enumerate(cuts)}
        rows, lower, upper = [], [], []

        def add(coefficients: dict[int, float], low: float, high: float) -> None:
            row = np.zeros(self.size)
            for index, coefficient in coefficients.items():
                row[index] += coefficient
            rows.append(row)
            lower.append(low)
            upper.append(high)

        options: dict[int, list[int]] = {}
        for index, (unit, _) in enumerate(pairs):
            options.setdefault(id(unit), []).append(index)
        for unit in planner.units:
            add({**dict.fromkeys(options[id(unit)], 1.0), reach[unit.layer]: -1.0}, -np.inf, 0.0)
        for lower_cut, upper_cut in itertools.pairwise(cuts):
            add({reach[lower_cut]: 1.0, reach[upper_cut]: -1.0}, -np.inf, 0.0)
        self.base = LinearConstraint(np.array(rows), lower, upper)

    def indicator(self, scheme: _Scheme) -> np.ndarray:
        chosen = set(_unit_keys(scheme))
        x = [1.0 if (u.layer, u.module, o.ratio) in chosen else 0.0 for u, o in self.planner.pairs]
        return np.concatenate([x, [1.0 if c >= scheme.cut else 0.0 for c in self.planner.cuts]])

    def solve(self, objective: np.ndarray, at_least=None, at_most=None) -> _Scheme | None:
        """Minimise `objective` within the budgets, with `at_least = (row, bound)` and `at_most = (row, bound)`
        as extra constraints; the exact-cost scheme, or None if nothing fits. A solution over a budget by the solver's
        tolerance is solved again with that budget tightened by the excess."""
        budget_mb, budget_s = self.budget_mb, self.budget_s
        for attempt in range(BUDGET_RETRIES):
            constraints = [self.base]
            if budget_mb is not None:
                constraints.append(LinearConstraint(self.memory[None], -np.inf, budget_mb - self.memory_offset))
            if budget_s is not None:
                constraints.append(LinearConstraint(self.time[None], -np.inf, budget_s - self.time_offset))
            if at_least is not None:
                constraints.append(LinearConstraint(at_least[0][None], at_least[1], np.inf))
            if at_most is not None:
                constraints.append(LinearConstraint(at_most[0][None], -np.inf, at_most[1]))
            with _quiet_c_stdout():
                result = milp(
                    objective,
                    integrality=np.ones(self.size),
                    bounds=Bounds(0, 1),
                    constraints=constraints,
                    options={"mip_rel_gap": 0.0, "time_limit": SOLVER_TIME_LIMIT_S},
                )
            if result.x is None:
                return None
            chosen = [pair for pair, x in zip(self.planner.pairs, result.x) if x > 0.5]
            if not chosen:
                return None
            scheme = self.planner.evaluate(chosen)
            if self.planner._fits(scheme, self.budget_mb, self.budget_s):
                return scheme
            # over by the solver's feasibility tolerance: tighten by the excess and a margin that grows each time
            margin = SOLVER_TOLERANCE * 10**attempt
            if budget_mb is not None:
                budget_mb -= max(scheme.memory_mb - self.budget_mb, 0.0) + margin * max(abs(self.budget_mb), 1.0)
            if budget_s is not None:
                budget_s -= max(scheme.step_s - self.budget_s, 0.0) + margin * max(abs(self.budget_s), 1.0)
        return None


@contextlib.contextmanager
def _quiet_c_stdout():
    """Send what C code writes to the process's standard output to /dev/null: the HiGHS bundled with scipy prints a
    debug line ("HighsMipSolverData::transformNewIntegerFeasibleSolution ...") on some solves, whatever `disp` says."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
