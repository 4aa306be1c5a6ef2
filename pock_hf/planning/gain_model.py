"""What a *set* of units gains: a saturation curve through measured schemes, and the damage they do.

Units tuned alone overlap: on commonsense data two layers recover 94% of what eighteen do, so the sum of the gains
units reach alone (the *additive score* A of a scheme) over-predicts large schemes many times over. A few schemes of
increasing size are therefore trained for real (`SchemeMeasurement`, see `planning.calibration`), and the gain of any
scheme is read off the curve through them:

    gain(A) = the monotone (isotonic) piecewise-linear curve through (0, 0) and the measured (A_i, gain_i),
              continued past the largest measured scheme with the slope of its last segment

No shape is assumed: the measured schemes span the budgets the planner chooses between (from one unit to the
ceiling), and a parametric saturation curve (tried first: g_max * (1 - exp(-A / s))) goes flat too early when gains
keep creeping up, which ranks schemes that training tells apart as equal. Damage (the loss increase on general
"replay" data) is fitted as

    damage(A_d, A) = damage_per_score * A_d + damage_per_gain * A        (both coefficients >= 0)

by non-negative least squares on the measured schemes: A_d, the scheme's summed unit damage, carries what the table
knows about which units do harm; A, what training more of the model costs in general (where the unit damages do not
predict the measured damage, their coefficient is 0 and damage grows with the scheme).

`noise` decides which predicted gains are "the same": the typical standard error of the *difference* between
neighbouring measured schemes, paired over the same validation examples (most of an example's loss is shared by
every scheme, so this is far smaller than a gain's own error against the frozen model), or, without it, the gains'
own standard error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SchemeMeasurement:
    """One scheme trained for real. `units` are (layer, module, ratio) as in the table; `gain` is the measured
    improvement of the table's metric (validation loss decrease, nats per token) with its standard error `gain_se`
    (paired over validation examples); `damage` the measured loss increase on replay data (None without replay data)
    with `damage_se`; `steps` the training steps behind them; `memory_mb` the cost model's memory for the scheme;
    `step_se` the standard error of its gain minus the previous (cheaper) measured scheme's, paired over the same
    examples (None for the first); `label` what the scheme is (for depth-spanning candidates, e.g. "mlp, layers
    18-29"; empty for budget-spanning ones); `peak_memory_mb` the process's measured peak (MB) while it trained,
    the check on `memory_mb`, and `step_s` its measured seconds per training step (None where not measured);
    `agreement` the share (0..1) of the base model's behaviour it kept, with `agreement_se` (see
    `planning.agreement`; None where not measured)."""

    units: list[tuple[int, str, float]]
    gain: float
    gain_se: float
    damage: float | None
    damage_se: float | None
    steps: int
    memory_mb: float
    step_se: float | None = None
    label: str = ""
    peak_memory_mb: float | None = None
    step_s: float | None = None
    agreement: float | None = None
    agreement_se: float | None = None


@dataclass(frozen=True)
class GainModel:
    """The gain curve through `scores` (additive scores, increasing, starting at 0) and `gains` (monotone), and
    damage(A_d, A) = damage_per_score * A_d + damage_per_gain * A (None without measured damage). `noise` is the
    standard deviation (metric units) that separates two predicted gains; `points` how many measured schemes the fit
    saw."""

    scores: list[float]
    gains: list[float]
    noise: float
    damage_per_score: float | None
    damage_per_gain: float | None
    points: int

    def gain(self, score: float) -> float:
        """Predicted gain (metric units) of a scheme with additive score `score`."""
        score = max(score, 0.0)
        if score <= self.scores[-1]:
            return float(np.interp(score, self.scores, self.gains))
        return self.gains[-1] + self._last_slope() * (score - self.scores[-1])

    def slope(self) -> float:
        """d gain / d score of the first segment: what one unit of additive score is worth in a small scheme."""
        return (self.gains[1] - self.gains[0]) / (self.scores[1] - self.scores[0])

    def _last_slope(self) -> float:
        return (self.gains[-1] - self.gains[-2]) / (self.scores[-1] - self.scores[-2])

    @property
    def has_damage(self) -> bool:
        return self.damage_per_score is not None

    def damage(self, damage_score: float, score: float) -> float:
        """Predicted damage (metric units) of a scheme with summed unit damage `damage_score` and additive gain
        score `score`; 0 without measured damage."""
        if not self.has_damage:
            return 0.0
        return self.damage_per_score * damage_score + (self.damage_per_gain or 0.0) * max(score, 0.0)

    def interval(self, score: float) -> tuple[float, float]:
        """A 95% interval (metric units) around `gain(score)`."""
        centre = self.gain(score)
        return centre - 1.96 * self.noise, centre + 1.96 * self.noise

    @property
    def saturates(self) -> bool:
        """Whether the measured schemes show diminishing returns: the last segment gains under a quarter of what the
        first does per unit of score."""
        return self._last_slope() < 0.25 * self.slope()


def fit_gain_model(
    scores: Sequence[float], measurements: Sequence[SchemeMeasurement], damage_scores=None
) -> GainModel:
    """The curve through the measured schemes (`scores[i]` is the additive score of `measurements[i]`) and (0, 0).

    `damage_scores[i]` is the summed unit damage of scheme i (None: the table has none, 0 is used); the damage model
    is fitted on the schemes whose damage was measured, else left out (None).

    Raises:
        ValueError: fewer than two measured schemes, scores that are not positive and finite, or measured gains that
            are not finite.
    """
    scores, gains = np.asarray(scores, float), np.asarray([m.gain for m in measurements], float)
    if len(measurements) < 2 or len(scores) != len(measurements):
        raise ValueError(f"A gain model needs at least two measured schemes with scores, got {len(measurements)}.")
    if not (np.isfinite(scores).all() and (scores > 0).all() and np.isfinite(gains).all()):
        raise ValueError("Measured schemes need positive, finite additive scores and finite measured gains.")
    order = np.argsort(scores, kind="stable")
    curve_scores, curve_gains = _monotone_curve(scores[order], gains[order])
    noise = measurement_noise(measurements)
    per_score, per_gain = _fit_damage(measurements, scores, damage_scores)
    return GainModel(curve_scores, curve_gains, noise, per_score, per_gain, len(measurements))


def measurement_noise(measurements: Sequence[SchemeMeasurement]) -> float:
    """What separates two measured gains (metric units): the median paired standard error of the difference between
    neighbouring measured schemes, or, where none was measured, the median of the gains' own standard errors."""
    steps = [m.step_se for m in measurements if m.step_se is not None and math.isfinite(m.step_se)]
    return float(np.median(steps if steps else [m.gain_se for m in measurements]))


def _monotone_curve(scores: np.ndarray, gains: np.ndarray) -> tuple[list[float], list[float]]:
    """(0, 0) and the points, gains made non-decreasing by pooling adjacent violators (isotonic regression), equal
    scores merged; at least two points."""
    blocks: list[list[float]] = []  # [score sum, gain sum, count]
    for score, gain in zip([0.0, *scores], [0.0, *gains]):
        blocks.append([score, gain, 1.0])
        while len(blocks) > 1 and blocks[-2][1] / blocks[-2][2] >= blocks[-1][1] / blocks[-1][2]:
            last = blocks.pop()
            blocks[-1] = [a + b for a, b in zip(blocks[-1], last)]
    xs = [block[0] / block[2] for block in blocks]
    ys = [block[1] / block[2] for block in blocks]
    if len(xs) < 2:  # every measured gain at or below zero: a flat curve from 0 to the largest score
        return [0.0, float(scores.max())], [0.0, 0.0]
    return xs, ys


def _fit_damage(measurements, scores, damage_scores) -> tuple[float | None, float | None]:
    """Non-negative least squares of measured damage on (summed unit damage, additive score); (None, None) where
    no scheme's damage was measured."""
    from scipy.optimize import nnls

    known = [i for i, m in enumerate(measurements) if m.damage is not None and math.isfinite(m.damage)]
    if not known:
        return None, None
    unit_damage = [0.0 if damage_scores is None else float(damage_scores[i]) for i in known]
    features = np.array([[d, float(scores[i])] for d, i in zip(unit_damage, known)])  # (n, 2)
    target = np.array([measurements[i].damage for i in known], float)
    (per_score, per_gain), _ = nnls(features, target)
    return float(per_score), float(per_gain)
