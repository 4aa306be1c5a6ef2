"""The planner: the sparse scheme with the best summed gain that fits a memory and/or step-time budget.

A scheme is a set of units (layer, module, ratio), at most one ratio per (layer, module). Its cost depends on its
cut c, the deepest (lowest-index) updated layer, because every layer above c runs backward:

    memory_mb(S) = costs.base_memory_mb(c) + sum of costs.unit_memory_mb(module, ratio, axis)
    step_s(S)    = costs.step_s_by_cut[c]  + sum of costs.unit_time_s(module, ratio)
    gain(S)      = sum of the units' gains (only units with gain > 0 are worth choosing)

The search is exact up to the cost discretisation: for every cut c, the best scheme whose deepest layer is exactly c
is a multiple-choice knapsack over the units of layers >= c, with at least one unit of layer c, and capacity
budget - base(c). One dynamic programme from the top layer down answers every cut at once (the units of layers >= c
are a prefix of that order), over a grid of capacities vectorised with numpy. Unit costs are rounded up and
capacities down, so a scheme the grid accepts always fits; its exact cost is recomputed and checked anyway.

Typical use:

    plan = make_plan(table, costs, budget_mb=DEVICE_BUDGETS_MB["gpu-24gb"])
    print(plan_report(plan, costs))
    model = get_pock_model(model, plan.to_config())
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..io.files import atomic_write_text, check_format_version, dataclass_from_json, read_json_object, save_figure
from ..tuner import PockConfig
from ..tuner.config import CHANNEL_AXES
from .table import WHOLE_LAYER, SensitivityTable

if TYPE_CHECKING:
    from .costs import CostProfile

PLAN_FORMAT_VERSION = 1
# The programme keeps, per decoder layer, a gain/count grid and one choice byte per unit (about 20 bytes per cell for
# a Llama layer). Past this many cells the grid is coarsened (and the coarser resolution recorded in the plan), which
# keeps it under 100 MB for a 32-layer model.
MAX_GRID_CELLS = 2**17
# Gains closer than this fraction of the summed positive gain are ties (then: lower cost, then fewer units), so
# float rounding in sums taken in different orders cannot decide between equal schemes.
GAIN_TIE_TOLERANCE = 1e-9


@dataclass
class Plan:
    """A chosen scheme with what it is predicted to gain and cost.

    `units` are (layer, module, ratio) with `module` a path inside a decoder layer or `"*"`, sorted by layer;
    `unit_gains` their gains. `scheme` maps full module names to ratios (what `PockConfig` takes). `cut_layer` is
    the deepest updated layer: backward runs through layers `cut_layer` and above only. `predicted_gain` is the
    summed gain in the table's `metric`; `predicted_memory_mb` (MB) and `predicted_step_s` (s) are the cost model's
    memory and training-step time. `budget_mb` (MB) and `budget_time_ratio` (fraction of `full_step_s`, the measured
    full fine-tuning step in s) are the budgets it was planned for (None: not constrained). `axis` is the channel
    axis the unit memory was counted for; `resolution_mb` (MB) and `resolution_time_ratio` (fraction of the full
    step) are the cost grid's steps. The fingerprints and `device` say which model, data and device it belongs to.
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
    unit_gains: list[float] = field(default_factory=list)
    full_step_s: float | None = None
    axis: str = "out"
    device: str = ""
    resolution_mb: float = 1.0
    resolution_time_ratio: float = 1e-3
    format_version: int = PLAN_FORMAT_VERSION

    def to_config(self, **pock_config_kwargs) -> PockConfig:
        """A `PockConfig` with this scheme; `channel_axis` defaults to the axis the memory was planned for."""
        pock_config_kwargs.setdefault("channel_axis", self.axis)
        return PockConfig(scheme=dict(self.scheme), **pock_config_kwargs)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["units"] = [list(unit) for unit in self.units]
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
    resolution_mb: float = 1.0,
    resolution_time_ratio: float = 1e-3,
) -> Plan:
    """The scheme with the highest summed gain whose memory (MB) is at most `budget_mb` and whose training step (s)
    is at most `budget_time_ratio` x `costs.full_step_s`. Give one budget or both.

    `axis` is the channel axis the scheme will train (it changes unit memory). Costs are put on a grid of
    `resolution_mb` MB and `resolution_time_ratio` x the full step (coarsened if the grid would exceed
    `MAX_GRID_CELLS` cells); the result is optimal up to that grid. Ties go to the lower cost, then fewer units.

    Raises:
        ValueError: no budget, a non-positive budget or resolution, an unknown axis; table and costs from different
            models (both digests named); a malformed table (mixed `"*"` and per-module rows in a layer, duplicate
            units, unknown modules or layers, mixed metrics, no unit with positive gain); or a budget too small for
            even one unit (the message states the smallest feasible budget).
    """
    planner = _Planner(table, costs, axis, budget_mb, budget_time_ratio, resolution_mb, resolution_time_ratio)
    plan = planner.solve(budget_mb, budget_time_ratio)
    if plan is None:
        raise ValueError(planner.infeasible_message(budget_mb, budget_time_ratio))
    return plan


def plan_scheme(
    table: SensitivityTable,
    costs: CostProfile,
    *,
    budget_mb: float | None = None,
    budget_time_ratio: float | None = None,
    axis: str = "out",
    **config_kwargs,
) -> PockConfig:
    """`make_plan(...)` as a `PockConfig` (with `channel_axis=axis` and the other `config_kwargs`)."""
    plan = make_plan(table, costs, budget_mb=budget_mb, budget_time_ratio=budget_time_ratio, axis=axis)
    return plan.to_config(channel_axis=axis, **config_kwargs)


def gain_vs_budget(
    table: SensitivityTable, costs: CostProfile, budgets_mb: list[float], axis: str = "out"
) -> list[Plan | None]:
    """The best plan for each memory budget (MB), None where not even one unit fits.

    One dynamic programme, sized for the largest budget, answers every budget.
    """
    if not budgets_mb or max(budgets_mb) <= 0:
        return [None] * len(budgets_mb)
    planner = _Planner(table, costs, axis, max(budgets_mb), None, 1.0, 1e-3)
    return [planner.solve(budget, None) for budget in budgets_mb]


def plot_gain_vs_budget(
    table: SensitivityTable,
    costs: CostProfile,
    path: str | os.PathLike,
    budgets_mb: list[float] | None = None,
    chosen: Plan | None = None,
    axis: str | None = None,
) -> Path:
    """A PNG of predicted gain against memory budget (MB), with the `chosen` plan marked.

    Default budgets: 20 from the smallest feasible one to the memory of taking every unit with positive gain (at its
    most expensive ratio), past which more memory gains nothing. `axis` defaults to the chosen plan's.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = axis or (chosen.axis if chosen is not None else "out")
    if budgets_mb is None:
        budgets_mb = _default_budgets(_Planner(table, costs, axis, None, None, 1.0, 1e-3, sized=False))
    plans = gain_vs_budget(table, costs, list(budgets_mb), axis=axis)
    gains = [plan.predicted_gain if plan is not None else np.nan for plan in plans]
    figure, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.step(budgets_mb, gains, where="post", marker=".", label="best plan")
    if chosen is not None:
        x = chosen.budget_mb if chosen.budget_mb is not None else chosen.predicted_memory_mb
        label = f"chosen: {len(chosen.units)} units, cut at layer {chosen.cut_layer}"
        ax.plot([x], [chosen.predicted_gain], marker="*", markersize=14, linestyle="none", color="C3", label=label)
    metric = table.rows[0].metric if table.rows else "metric"
    ax.set(xlabel="memory budget (MB)", ylabel=f"predicted gain ({metric} improvement)")
    ax.set_title(f"Pock plans on {costs.device}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(figure, path)


def plan_report(plan: Plan, costs: CostProfile) -> str:
    """A short Markdown report: chosen units, predicted gain, memory against budget, step time against a full
    fine-tuning step, and the cut layer."""
    _check_fingerprints(plan.model_fingerprint, costs.model_fingerprint, "plan")
    lines = [
        "# Pock plan",
        "",
        (
            f"Model `{plan.model_fingerprint.get('digest')}`, data `{plan.data_fingerprint}`, "
            f"device `{costs.device}`, channel axis `{plan.axis}`."
        ),
        "",
        "| layer | module | ratio | gain |",
        "|---:|---|---:|---:|",
    ]
    gains = plan.unit_gains or [math.nan] * len(plan.units)
    lines += [
        f"| {layer} | `{module}` | {ratio:g} | {gain:.4g} |" for (layer, module, ratio), gain in zip(plan.units, gains)
    ]
    memory_budget = f"a {plan.budget_mb:.1f} MB budget" if plan.budget_mb is not None else "no memory budget"
    time_budget = f"budget {plan.budget_time_ratio:.1%}" if plan.budget_time_ratio is not None else "no time budget"
    lines += [
        "",
        f"- Predicted gain: {plan.predicted_gain:.4g} ({plan.metric} improvement, sum over {len(plan.units)} units)",
        f"- Predicted memory: {plan.predicted_memory_mb:.1f} MB of {memory_budget}",
        (
            f"- Predicted step time: {plan.predicted_step_s:.4g} s = {plan.predicted_step_s / costs.full_step_s:.1%} "
            f"of a full fine-tuning step ({costs.full_step_s:.4g} s); {time_budget}"
        ),
        f"- Cut layer: {plan.cut_layer} (backward runs through layers {plan.cut_layer}..{costs.num_layers - 1} only)",
        "",
    ]
    return "\n".join(lines)


# --- units and their exact costs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Option:
    """One ratio of a unit with its gain and exact extra cost: memory (MB) and step time (s)."""

    ratio: float
    gain: float
    memory_mb: float
    step_s: float


@dataclass(frozen=True)
class _Unit:
    layer: int
    module: str
    options: tuple[_Option, ...]


@dataclass
class _Scheme:
    """A candidate scheme with its exact cost at its real cut."""

    chosen: list[tuple[_Unit, _Option]]
    cut: int
    gain: float
    memory_mb: float
    step_s: float


def _check_fingerprints(expected: dict, actual: dict, what: str) -> None:
    if expected.get("digest") != actual.get("digest"):
        raise ValueError(
            f"The {what} belongs to model fingerprint {expected.get('digest')!r} but the cost profile to "
            f"{actual.get('digest')!r}: profile costs (and measure sensitivity) on the same model."
        )


def _collect_units(table: SensitivityTable, costs: CostProfile, axis: str) -> dict[int, list[_Unit]]:
    """Units with at least one positive, finite gain, by layer, after checking the table against the profile."""
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
    options: dict[tuple[int, str], list[_Option]] = {}
    for row in table.rows:
        if math.isfinite(row.gain) and row.gain > 0:
            cost = (costs.unit_memory_mb(row.module, row.ratio, axis), costs.unit_time_s(row.module, row.ratio))
            options.setdefault((row.layer, row.module), []).append(_Option(row.ratio, row.gain, *cost))
    if not options:
        raise ValueError("No unit in the table has a positive gain: there is nothing worth fine-tuning.")
    order = {module: index for index, module in enumerate((*table.layer_modules, WHOLE_LAYER))}
    by_layer: dict[int, list[_Unit]] = {}
    for layer, module in sorted(options, key=lambda key: (key[0], order.get(key[1], len(order)), key[1])):
        unit_options = tuple(sorted(options[layer, module], key=lambda option: option.ratio))
        by_layer.setdefault(layer, []).append(_Unit(layer, module, unit_options))
    return by_layer


# --- the cost grid ---------------------------------------------------------------------------------------------------


@dataclass
class _Resource:
    """One budgeted quantity on the grid: memory (MB) or step time (s). `base[c]` is the exact cost of cut c before
    any unit, `resolution` the grid step, `attribute` the `_Option` field holding a unit's cost."""

    base: np.ndarray
    resolution: float
    attribute: str

    def weight(self, option: _Option) -> int:
        # rounded up: the grid never undercounts a unit
        return math.ceil(getattr(option, self.attribute) / self.resolution)

    def capacity(self, cut: int, budget: float) -> int:
        # rounded down: the grid never overcounts what is left
        return math.floor((budget - self.base[cut]) / self.resolution)


def _shift(values: np.ndarray, weight: tuple[int, int], fill: float) -> np.ndarray:
    """`out[i, j] = values[i - weight[0], j - weight[1]]`, `fill` where that index is negative."""
    out = np.full_like(values, fill)
    rows, cols = values.shape
    if weight[0] < rows and weight[1] < cols:
        out[weight[0] :, weight[1] :] = values[: rows - weight[0], : cols - weight[1]]
    return out


class _Knapsack:
    """The dynamic programme over cut depths and units, on a grid of (memory, time) capacities.

    A state is a pair of arrays over the grid: the best gain of a scheme whose discretised cost is at most that cell,
    and its number of units (-inf gain: nothing fits). Layers are processed from the top down. `using[c]` is the state
    for units of layers >= c that use at least one unit of layer c (the candidates for cut c); `from_using[c]` marks
    the cells where the best state for layers >= c came from `using[c]`; `choices[c]` holds, per unit of layer c, the
    choice made in each cell (see `_layer_pass`), so a scheme is read back without recomputing anything.
    """

    def __init__(self, by_layer: dict[int, list[_Unit]], num_layers: int, resources: list, shape, tolerance: float):
        self.shape = shape
        self.tolerance = tolerance
        self.layers = {
            layer: [(unit, [self._weight(resources, option) for option in unit.options]) for unit in units]
            for layer, units in by_layer.items()
        }
        self.using: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.from_using: dict[int, np.ndarray] = {}
        self.choices: dict[int, list[np.ndarray]] = {}
        state = (np.zeros(shape), np.zeros(shape, np.int32))  # the empty scheme: gain 0 at every capacity
        for layer in reversed(range(num_layers)):
            if layer in self.layers:
                using, self.choices[layer] = self._layer_pass(layer, state)
                better = self._better(*using, *state)
                self.using[layer], self.from_using[layer] = using, better
                state = (np.where(better, using[0], state[0]), np.where(better, using[1], state[1]))

    @staticmethod
    def _weight(resources: list, option: _Option) -> tuple[int, int]:
        return tuple(0 if resource is None else resource.weight(option) for resource in resources)

    def _better(self, gain, count, best_gain, best_count) -> np.ndarray:
        """Where (gain, count) beats (best_gain, best_count): more gain, or a tie in gain and fewer units."""
        return (gain > best_gain + self.tolerance) | ((gain >= best_gain - self.tolerance) & (count < best_count))

    def _layer_pass(self, layer: int, above):
        """Add the units of `layer` to `above`, keeping only schemes with at least one of them.

        Each unit offers, per option, a step from the state before it (another unit of this layer already chosen)
        or from `above` (its first unit of this layer). Also returns per unit a grid of the choice made: 0 none,
        1 + j option j on top of this layer's earlier units, 1 + j + len(options) option j on top of `above`.
        """
        gain, count = np.full(self.shape, -np.inf), np.zeros(self.shape, np.int32)
        choices = []
        for unit, weights in self.layers[layer]:
            new_gain, new_count = gain.copy(), count.copy()
            choice = np.zeros(self.shape, np.int8)
            for j, (option, weight) in enumerate(zip(unit.options, weights)):
                for source, (source_gain, source_count) in enumerate(((gain, count), above)):
                    candidate_gain = _shift(source_gain, weight, -np.inf) + option.gain
                    candidate_count = _shift(source_count, weight, 0) + 1
                    better = self._better(candidate_gain, candidate_count, new_gain, new_count)
                    np.copyto(new_gain, candidate_gain, where=better)
                    np.copyto(new_count, candidate_count, where=better)
                    np.copyto(choice, 1 + j + source * len(unit.options), where=better)
            gain, count = new_gain, new_count
            choices.append(choice)
        return (gain, count), choices

    def best_at(self, cut: int, cell: tuple[int, int]) -> tuple[float, tuple[int, int]] | None:
        """Best gain with cut `cut` within capacity `cell`, and the cheapest cell (memory first) reaching it."""
        gain_grid = self.using[cut][0]
        best = gain_grid[cell]
        if best == -np.inf:
            return None
        threshold = best - self.tolerance
        # gain never falls with more capacity, so the first cell reaching the best is the cheapest
        row = int(np.argmax(gain_grid[: cell[0] + 1, cell[1]] >= threshold))
        col = int(np.argmax(gain_grid[row, : cell[1] + 1] >= threshold))
        return float(best), (row, col)

    def reconstruct(self, cut: int, cell: tuple[int, int]) -> list[tuple[_Unit, _Option]]:
        """The units behind `using[cut][cell]`: walk layer `cut`, then every layer above that contributed."""
        chosen, cell = self._walk_layer(cut, cell)
        for layer in range(cut + 1, max(self.layers) + 1):
            if layer in self.from_using and self.from_using[layer][cell]:
                more, cell = self._walk_layer(layer, cell)
                chosen += more
        return chosen

    def _walk_layer(self, layer: int, cell: tuple[int, int]):
        chosen = []
        for (unit, weights), choice in zip(reversed(self.layers[layer]), reversed(self.choices[layer])):
            code = int(choice[cell])
            if code == 0:
                continue
            j, source = (code - 1) % len(unit.options), (code - 1) // len(unit.options)
            chosen.append((unit, unit.options[j]))
            cell = (cell[0] - weights[j][0], cell[1] - weights[j][1])
            if source == 1:  # this was the layer's first unit: the rest of the scheme lies above
                return chosen, cell
        raise RuntimeError(f"planner bug: layer {layer} reconstruction did not reach the layers above")


# --- the planner -----------------------------------------------------------------------------------------------------


class _Planner:
    """Checks the inputs, builds the grid for the largest budgets it will be asked about, then answers budgets."""

    def __init__(
        self,
        table: SensitivityTable,
        costs: CostProfile,
        axis: str,
        budget_mb: float | None,
        budget_time_ratio: float | None,
        resolution_mb: float,
        resolution_time_ratio: float,
        sized: bool = True,
    ):
        if axis not in CHANNEL_AXES:
            raise ValueError(f"`axis` is {axis!r}; valid values are {CHANNEL_AXES}.")
        if sized and budget_mb is None and budget_time_ratio is None:
            raise ValueError(
                "Give a budget: `budget_mb` (MB), `budget_time_ratio` (fraction of a full step), or both."
            )
        for name, value in (("budget_mb", budget_mb), ("budget_time_ratio", budget_time_ratio)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` is {value!r}; it must be a positive number.")
        for name, value in (("resolution_mb", resolution_mb), ("resolution_time_ratio", resolution_time_ratio)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` is {value!r}; it must be a positive number.")
        self.table, self.costs, self.axis = table, costs, axis
        self.by_layer = _collect_units(table, costs, axis)
        self.options = [
            (unit, option) for units in self.by_layer.values() for unit in units for option in unit.options
        ]
        self.tolerance = GAIN_TIE_TOLERANCE * sum(option.gain for _, option in self.options)
        self.resolution_mb, self.resolution_time_ratio = resolution_mb, resolution_time_ratio
        if sized:
            self._build_grid(budget_mb, budget_time_ratio)

    # exact costs

    def evaluate(self, chosen: list[tuple[_Unit, _Option]]) -> _Scheme:
        chosen = sorted(chosen, key=lambda pair: (pair[0].layer, self._module_rank(pair[0].module)))
        cut = chosen[0][0].layer
        return _Scheme(
            chosen=chosen,
            cut=cut,
            gain=math.fsum(option.gain for _, option in chosen),
            memory_mb=self.costs.base_memory_mb(cut) + math.fsum(option.memory_mb for _, option in chosen),
            step_s=self.costs.step_s_by_cut[cut] + math.fsum(option.step_s for _, option in chosen),
        )

    def _module_rank(self, module: str) -> int:
        order = (*self.table.layer_modules, WHOLE_LAYER)
        return order.index(module) if module in order else len(order)

    @staticmethod
    def _fits(scheme: _Scheme, budget_mb: float | None, budget_s: float | None) -> bool:
        return (budget_mb is None or scheme.memory_mb <= budget_mb) and (budget_s is None or scheme.step_s <= budget_s)

    # the grid

    def _build_grid(self, budget_mb: float | None, budget_time_ratio: float | None) -> None:
        """Size the grid for these budgets; coarsen it while it has more than `MAX_GRID_CELLS` cells."""
        full = self.costs.full_step_s
        budgets = [budget_mb, None if budget_time_ratio is None else budget_time_ratio * full]
        bases = [
            np.array([self.costs.base_memory_mb(c) for c in range(self.costs.num_layers)]),
            np.array(self.costs.step_s_by_cut, dtype=float),
        ]
        resolutions = [self.resolution_mb, self.resolution_time_ratio * full]
        while True:
            self.resources = [
                None if budget is None else _Resource(base, resolution, attribute)
                for budget, base, resolution, attribute in zip(budgets, bases, resolutions, ("memory_mb", "step_s"))
            ]
            shape = tuple(self._size(resource, budget) for resource, budget in zip(self.resources, budgets))
            cells = shape[0] * shape[1]
            if cells <= MAX_GRID_CELLS:
                break
            active = sum(resource is not None for resource in self.resources)
            factor = 1.01 * (cells / MAX_GRID_CELLS) ** (1 / active)
            resolutions = [resolution * factor for resolution in resolutions]
        self.resolution_mb, self.resolution_time_ratio = resolutions[0], resolutions[1] / full
        self.knapsack = _Knapsack(self.by_layer, self.costs.num_layers, self.resources, shape, self.tolerance)

    def _size(self, resource: _Resource | None, budget: float | None) -> int:
        """Grid cells along one resource: up to the largest capacity of any cut, but no more than all units need."""
        if resource is None:
            return 1
        largest = max(resource.capacity(layer, budget) for layer in self.by_layer)
        everything = sum(max(resource.weight(option) for option in unit.options) for unit in self._units())
        return max(1, min(largest, everything) + 1)

    def _units(self) -> list[_Unit]:
        return [unit for units in self.by_layer.values() for unit in units]

    # answering a budget

    def solve(self, budget_mb: float | None, budget_time_ratio: float | None) -> Plan | None:
        """The best plan within these budgets (no larger than the grid was built for), or None if nothing fits."""
        budget_s = None if budget_time_ratio is None else budget_time_ratio * self.costs.full_step_s
        budgets = (budget_mb, budget_s)
        # single units, costed exactly: whatever fits exactly is found, even where the grid's rounding rejects it
        feasible = [s for s in (self.evaluate([pair]) for pair in self.options) if self._fits(s, budget_mb, budget_s)]
        candidates = [c for c in (self._candidate(cut, budgets) for cut in self.knapsack.using) if c is not None]
        candidates.sort(key=lambda candidate: -candidate[0])
        for gain, cut, cell in candidates:
            best = max((scheme.gain for scheme in feasible), default=-math.inf)
            if gain < best - self.tolerance:
                break  # sorted: no later cut can win, not even on a tie
            scheme = self.evaluate(self.knapsack.reconstruct(cut, cell))
            if self._fits(scheme, budget_mb, budget_s):
                feasible.append(scheme)
        if not feasible:
            return None
        return self._to_plan(self._pick(feasible, budget_mb), budget_mb, budget_time_ratio)

    def _candidate(self, cut: int, budgets: tuple[float | None, float | None]):
        cell = []
        for resource, budget, size in zip(self.resources, budgets, self.knapsack.shape):
            capacity = 0 if resource is None else resource.capacity(cut, budget)
            if capacity < 0:
                return None
            cell.append(min(capacity, size - 1))
        best = self.knapsack.best_at(cut, tuple(cell))
        return None if best is None else (best[0], cut, best[1])

    def _pick(self, feasible: list[_Scheme], budget_mb: float | None) -> _Scheme:
        """Highest gain; among ties the lower cost (the budgeted one first), then fewer units."""
        best = max(scheme.gain for scheme in feasible)
        tied = [scheme for scheme in feasible if scheme.gain >= best - self.tolerance]

        def cost(scheme: _Scheme):
            memory_first = budget_mb is not None
            primary, secondary = (
                (scheme.memory_mb, scheme.step_s) if memory_first else (scheme.step_s, scheme.memory_mb)
            )
            return primary, secondary, len(scheme.chosen), -scheme.gain

        return min(tied, key=cost)

    def _to_plan(self, scheme: _Scheme, budget_mb: float | None, budget_time_ratio: float | None) -> Plan:
        units = [(unit.layer, unit.module, option.ratio) for unit, option in scheme.chosen]
        names = {name: ratio for layer, module, ratio in units for name in self.table.module_names(layer, module)}
        return Plan(
            units=units,
            scheme=names,
            cut_layer=scheme.cut,
            predicted_gain=scheme.gain,
            predicted_memory_mb=scheme.memory_mb,
            predicted_step_s=scheme.step_s,
            budget_mb=budget_mb,
            budget_time_ratio=budget_time_ratio,
            metric=self.table.rows[0].metric,
            model_fingerprint=dict(self.table.model_fingerprint),
            data_fingerprint=self.table.data_fingerprint,
            unit_gains=[option.gain for _, option in scheme.chosen],
            full_step_s=self.costs.full_step_s,
            axis=self.axis,
            device=self.costs.device,
            resolution_mb=self.resolution_mb,
            resolution_time_ratio=self.resolution_time_ratio,
        )

    # limits

    def smallest_budgets(self) -> tuple[float, float]:
        """The smallest memory budget (MB) and time budget (fraction of a full step) that fit one unit."""
        singles = [self.evaluate([pair]) for pair in self.options]
        return min(s.memory_mb for s in singles), min(s.step_s for s in singles) / self.costs.full_step_s

    def largest_useful_budget_mb(self) -> float:
        """Memory (MB) of every unit at its most memory-hungry positive ratio: no larger budget gains more."""
        cut = min(self.by_layer)
        return self.costs.base_memory_mb(cut) + math.fsum(
            max(option.memory_mb for option in unit.options) for unit in self._units()
        )

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


def _default_budgets(planner: _Planner, count: int = 20) -> list[float]:
    low, _ = planner.smallest_budgets()
    high = max(planner.largest_useful_budget_mb(), low * 1.01)
    return [float(budget) for budget in np.linspace(low, high, count)]
