"""Measured schemes: train a few whole schemes of increasing size for real, so the planner's gain model can be fitted.

A sensitivity table says what each unit gains alone; what a set of units gains is less than the sum (they overlap).
`measure_schemes` picks `count` schemes with the additive planner at budgets spread geometrically from the smallest
feasible one to the ceiling (nested in spirit: each spends more), trains each on the table's own training batches
for its `steps` AdamW steps, and records the validation gain and the replay damage, each with its standard error
paired over examples, and the standard error of each gain's difference from the previous scheme's (what tells two
schemes apart). The table comes back with them in `schemes`; `make_plan` then fits the saturation curve.

Budgets are one way to span schemes; depth is the other. The per-unit table ranks units by what they gain alone
after a few steps, and that ranking can favour what a longer run does not reward: on the personalisation data the
proxy values attention projections of the lowest layers most per MB, while after 60 steps the MLPs of the upper
layers recall held-out facts best (`benchmarks/personalization.py`). With `depths`, the candidates are instead the
table's best scheme under the ceiling for each reach of backward (the upper `depth` fraction of the layers) and each
block of the layer (`blocks`: "all", or the first component of the module paths, "self_attn" or "mlp" in a Llama),
and the planner picks among them by what they measured (`planner.make_plan`).

Each trial trains one scheme under the ceiling, so it needs no more memory than the training it plans; its process
peak and seconds per step are measured as it trains (`SchemeMeasurement.peak_memory_mb`, `.step_s`), the check on
the cost model's prediction.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from ..engine.memory import peak_memory_mb, release_free_memory, start_measured_phase
from ..tuner.depth_cut import checkpointing_restored
from .costs import CostProfile
from .gain_model import SchemeMeasurement
from .planner import Plan, make_plan
from .sensitivity import (
    example_losses,
    paired_difference,
    prepare_measurement_data,
    scheme_channel_indices,
    train_scheme,
)
from .table import SensitivityTable

# a depth candidate trains units of every block of the layer, or of one (the first component of the module paths)
ALL_BLOCKS = "all"


def block_of(module: str) -> str:
    """The block of a module path inside a decoder layer: "mlp" for "mlp.up_proj"."""
    return module.split(".")[0]


def parse_block(spec: str) -> tuple[str, float | None]:
    """A depth candidate's block and ratio: ("mlp", 0.25) from "mlp:0.25" (the block's units at that measured ratio
    only: every unit a few channels wide, the spread-out update that damages least), ("mlp", None) from "mlp" (any
    measured ratio).

    Raises:
        ValueError: the part after ":" is not a number.
    """
    name, _, ratio = spec.partition(":")
    if not ratio:
        return name, None
    try:
        return name, float(ratio)
    except ValueError:
        raise ValueError(f"Block {spec!r}: the part after ':' must be a measured ratio, e.g. 'mlp:0.25'.") from None


def measure_schemes(
    model: nn.Module,
    tokenizer,
    table: SensitivityTable,
    costs: CostProfile,
    train_data: Sequence[dict],
    eval_data: Sequence[dict],
    replay_data: Sequence[dict] | None = None,
    *,
    budget_mb: float | None = None,
    budget_time_ratio: float | None = None,
    count: int = 4,
    steps: int | None = None,
    lr: float | None = None,
    axis: str = "out",
    gradient_checkpointing: bool = False,
    depths: Sequence[float] | None = None,
    blocks: Sequence[str] = (ALL_BLOCKS,),
    agreement: Callable[[nn.Module], tuple[float, float]] | None = None,
    progress: bool = True,
) -> SensitivityTable:
    """A copy of `table` with `count` measured schemes (replacing any it had), for the gain model.

    The data must be what the table was measured on (same rows, and the same replay rows); batch size, maximum
    length and seed are the table's own settings, and so are the training `steps` and learning rate `lr` unless
    given: give the training run's own, since what a scheme gains and breaks after the run is what the gain model
    should predict (gains after a few steps favour small, concentrated schemes that a longer run overtakes). Schemes
    are the additive plans at `count` budgets from the smallest feasible one up to the ceiling (`budget_mb` MB and/or
    `budget_time_ratio` of a full step), distinct ones only. Each trains as the run will (`gradient_checkpointing`
    above the cut, as the cost profile measured it), so it fits the memory the planner gave it; the model's own
    checkpointing setting is restored afterwards. With `depths` (fractions in (0, 1] of the decoder layers that
    backward may reach, from the top), the candidates are the best scheme under the ceiling for each depth and each
    of `blocks`, distinct ones only; the table's `settings["scheme_candidates"]` says which kind it holds. Once a
    depth candidate has peaked above its prediction, each later one that would not fit the ceiling with that excess
    added is planned again under the ceiling less the largest excess so far (the process's memory can grow beyond one
    profiled step: bf16 training on a CPU did, by 170-320 MB on SmolLM2, before `bound_kernel_caches`);
    `settings["schemes_excess_mb"]` records it. `agreement` (e.g. a `planning.agreement.ReplyAgreement`) scores
    each trained candidate's kept behaviour (a share in 0..1 and its standard error), which the planner guards on.

    Raises:
        ValueError: `count` below 2 or `steps` below 1, no ceiling, data other than the table's (both fingerprints named), a model other
            than the table's, or the planner's own errors (a ceiling too small for one unit).
    """
    if depths is None and (isinstance(count, bool) or not isinstance(count, int) or count < 2):
        raise ValueError(f"count must be an integer >= 2 (a curve needs two points), got {count!r}.")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}.")
    table.check_model(model)
    settings = table.settings
    steps = settings["steps"] if steps is None else steps
    lr = settings["lr"] if lr is None else lr
    data = prepare_measurement_data(
        tokenizer,
        train_data,
        eval_data,
        replay_data,
        batch_size=settings["batch_size"],
        steps=steps,
        max_length=settings["max_length"],
        seed=settings["seed"],
    )
    if data.fingerprint != table.data_fingerprint:
        raise ValueError(
            f"The data (fingerprint {data.fingerprint}) is not what the table was measured on "
            f"({table.data_fingerprint}): pass the same training, validation and replay rows."
        )
    if depths is None:
        plans = _additive_plans(table, costs, budget_mb, budget_time_ratio, count, axis)
        labelled = [(None, None, "", plan) for plan in plans]
    else:
        labelled = _checked_depth_candidates(table, costs, depths, blocks, budget_mb, budget_time_ratio, axis)
    eval_before, eval_counts = example_losses(model, data.eval_batches)
    replay_before, replay_counts = example_losses(model, data.replay_batches) if data.replay_batches else (None, None)
    measurements, previous = [], None
    device = next(model.parameters()).device
    with checkpointing_restored(model, gradient_checkpointing):  # each trains as asked; the model's own setting after
        excess, seen = 0.0, {tuple(sorted(plan.units)) for *_, plan in labelled}
        for depth, block, label, plan in tqdm(labelled, desc="measuring schemes", unit="scheme", disable=not progress):
            if depth is not None and budget_mb is not None and plan.predicted_memory_mb + excess > budget_mb:
                # the candidates trained so far peaked above their predictions: this one is planned again under the
                # ceiling less that excess, so that it trains within the ceiling itself
                lowered = _depth_candidates(table, costs, [depth], [block], budget_mb - excess, budget_time_ratio,
                                            axis, seen)  # fmt: skip
                replanned = next(lowered, None)
                if replanned is None:
                    continue  # nothing new of this block at this depth fits the lowered ceiling
                label, plan = replanned[2], replanned[3]
            config = plan.to_config(
                channel_indices=scheme_channel_indices(table, plan.scheme),
                gradient_checkpointing=gradient_checkpointing,
            )
            peak_resets = start_measured_phase(device)  # what the previous candidate freed is not this one's peak
            started = time.perf_counter()
            wrapped = train_scheme(model, config, data.train_batches, lr, settings["seed"])
            step_s = (time.perf_counter() - started) / len(data.train_batches)
            peak_mb = peak_memory_mb(device) if peak_resets else None
            if peak_mb is not None:
                excess = max(excess, peak_mb - plan.predicted_memory_mb)
            try:
                eval_after = example_losses(wrapped, data.eval_batches)[0]
                gain, gain_se = paired_difference(eval_before, eval_after, eval_counts)
                step_se = None if previous is None else paired_difference(previous, eval_after, eval_counts)[1]
                previous = eval_after
                damage = damage_se = None
                if replay_before is not None:
                    after = example_losses(wrapped, data.replay_batches)[0]
                    improvement, damage_se = paired_difference(replay_before, after, replay_counts)
                    damage = -improvement
                kept, kept_se = agreement(wrapped) if agreement is not None else (None, None)
            finally:
                wrapped.unload()
            measurements.append(
                SchemeMeasurement(
                    units=list(plan.units),
                    gain=gain,
                    gain_se=gain_se,
                    damage=damage,
                    damage_se=damage_se,
                    steps=len(data.train_batches),
                    memory_mb=plan.predicted_memory_mb,
                    step_se=step_se,
                    label=label,
                    peak_memory_mb=peak_mb,
                    step_s=step_s,
                    agreement=kept,
                    agreement_se=kept_se,
                )
            )
    release_free_memory(device)  # the last candidate's freed memory does not stand under what the caller does next
    settings = {
        **table.settings,
        "scheme_candidates": "budgets" if depths is None else "depths",
        "schemes_device": costs.device,  # where the candidates' peaks were measured
        "schemes_excess_mb": excess,  # the most a candidate peaked above its prediction (0: none did)
    }
    return dataclasses.replace(table, schemes=measurements, settings=settings)


def depth_plans(
    table: SensitivityTable,
    costs: CostProfile,
    depths: Sequence[float],
    blocks: Sequence[str] = (ALL_BLOCKS,),
    *,
    budget_mb: float | None = None,
    budget_time_ratio: float | None = None,
    axis: str = "out",
) -> list[tuple[str, Plan]]:
    """(label, plan) for each depth and block: the table's best scheme under the ceiling among the units of that
    block in the upper `depth` fraction of the layers, shallowest depth first, distinct schemes only; a depth and
    block where nothing fits is left out.

    Raises:
        ValueError: a depth outside (0, 1], an unknown block (the message lists the table's), or no depth and block
            with a scheme under the ceiling.
    """
    candidates = _checked_depth_candidates(table, costs, depths, blocks, budget_mb, budget_time_ratio, axis)
    return [(label, plan) for _, _, label, plan in candidates]


def _checked_depth_candidates(table, costs, depths, blocks, budget_mb, budget_time_ratio, axis) -> list:
    """`_depth_candidates` as a list, after checking depths and blocks (the errors of `depth_plans`)."""
    known = sorted({block_of(module) for module in table.layer_modules})
    ratios = sorted({row.ratio for row in table.rows})
    for block in blocks:
        name, ratio = parse_block(block)
        if name != ALL_BLOCKS and name not in known:
            raise ValueError(f"Unknown block {block!r}; valid: {[ALL_BLOCKS, *known]}, each optionally ':<ratio>'.")
        if ratio is not None and ratio not in ratios:
            raise ValueError(f"Block {block!r}: the table measured the ratios {ratios} only.")
    for depth in depths:
        if isinstance(depth, bool) or not 0 < depth <= 1:
            raise ValueError(f"A depth is the fraction of layers backward may reach, in (0, 1]; got {depth!r}.")
    candidates = list(_depth_candidates(table, costs, depths, blocks, budget_mb, budget_time_ratio, axis))
    if not candidates:
        raise ValueError(f"No scheme fits the ceiling at depths {list(depths)} and blocks {list(blocks)}.")
    return candidates


def _depth_candidates(table, costs, depths, blocks, budget_mb, budget_time_ratio, axis, seen=None):
    """(depth, block, label, plan) of `depth_plans`, skipping schemes already in `seen` (and adding to it)."""
    bare = dataclasses.replace(table, schemes=[])
    num_layers = costs.num_layers
    seen = set() if seen is None else seen
    for depth in sorted(depths):
        floor = num_layers - max(1, round(depth * num_layers))
        for block in blocks:
            name, ratio = parse_block(block)
            rows = [
                row
                for row in bare.rows
                if row.layer >= floor
                and (name == ALL_BLOCKS or block_of(row.module) == name)
                and (ratio is None or row.ratio == ratio)
            ]
            if not rows:
                continue
            try:
                plan = make_plan(
                    dataclasses.replace(bare, rows=rows),
                    costs,
                    budget_mb=budget_mb,
                    budget_time_ratio=budget_time_ratio,
                    axis=axis,
                    spend="budget",
                )
            except ValueError:  # nothing of this block at this depth fits the ceiling
                continue
            key = tuple(sorted(plan.units))
            if key not in seen:
                seen.add(key)
                at = "" if ratio is None else f" at {ratio:.0%}"
                yield depth, block, f"{name}{at}, layers {floor}-{num_layers - 1}", plan


def _additive_plans(table, costs, budget_mb, budget_time_ratio, count, axis) -> list:
    """The additive planner's schemes at `count` geometric budgets from the smallest feasible one (the ceiling plan's
    cheapest rung) up to the ceiling: distinct ones, cheapest first."""
    bare = dataclasses.replace(table, schemes=[])
    ceiling = make_plan(
        bare, costs, budget_mb=budget_mb, budget_time_ratio=budget_time_ratio, axis=axis, spend="budget"
    )
    cheapest = ceiling.ladder[0]
    needs = []
    if budget_mb is not None:
        needs.append(cheapest.memory_mb / budget_mb)
    if budget_time_ratio is not None:
        needs.append(cheapest.step_s / (budget_time_ratio * costs.full_step_s))
    plans, seen = [], set()
    for scale in np.geomspace(min(max(needs), 1.0), 1.0, count):
        plan = ceiling
        if scale < 1:
            plan = make_plan(
                bare,
                costs,
                budget_mb=None if budget_mb is None else budget_mb * float(scale),
                budget_time_ratio=None if budget_time_ratio is None else budget_time_ratio * float(scale),
                axis=axis,
                spend="budget",
            )
        key = tuple(sorted(plan.units))
        if key not in seen:
            seen.add(key)
            plans.append(plan)
    return plans
