"""What a *set* of units gains: a saturation curve fitted on measured schemes, and the damage they do.

Units tuned alone overlap: on commonsense data two layers recover 94% of what eighteen do, so the sum of the gains
units reach alone (the *additive score* A of a scheme) over-predicts large schemes many times over. A few schemes of
increasing size are therefore trained for real (`SchemeMeasurement`, see `planning.calibration`) and a curve

    gain(A) = g_max * (1 - exp(-A / scale))

is fitted through them and through (0, 0): linear for small schemes (gain ~ A * g_max / scale), flat once the task is
learnt. Damage (the loss increase on general "replay" data) is fitted as proportional to the scheme's summed unit
damage: `damage(A_d) = damage_per_score * A_d`. `noise` (the standard deviation of a measured scheme gain around the
curve, fit residuals and measurement error together, in the table's metric) decides which gains are "the same".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# scales tried, as multiples of the largest measured additive score (the fit is exact in g_max for each)
SCALE_GRID = np.geomspace(1e-3, 1e3, 241)
# a fit whose best scale is at the top of the grid has found no saturation: it is a straight line
LINEAR_SCALE_FACTOR = 1e2


@dataclass(frozen=True)
class SchemeMeasurement:
    """One scheme trained for real. `units` are (layer, module, ratio) as in the table; `gain` is the measured
    improvement of the table's metric (validation loss decrease, nats per token) with its standard error `gain_se`
    (paired over validation examples); `damage` the measured loss increase on replay data (None without replay data)
    with `damage_se`; `steps` the training steps behind them; `memory_mb` the cost model's memory for the scheme."""

    units: list[tuple[int, str, float]]
    gain: float
    gain_se: float
    damage: float | None
    damage_se: float | None
    steps: int
    memory_mb: float


@dataclass(frozen=True)
class GainModel:
    """gain(A) = g_max * (1 - exp(-A / scale)) (A: a scheme's additive gain score) and damage(A_d) =
    damage_per_score * A_d (A_d: its summed unit damage). `noise` is the standard deviation (metric units) of a
    measured gain around the curve; `points` how many measured schemes the fit saw, the largest additive score
    among them `largest_score`."""

    g_max: float
    scale: float
    noise: float
    damage_per_score: float | None
    points: int
    largest_score: float

    def gain(self, score: float) -> float:
        """Predicted gain (metric units) of a scheme with additive score `score`."""
        return self.g_max * -math.expm1(-max(score, 0.0) / self.scale)

    def slope(self) -> float:
        """d gain / d score at 0: what one unit of additive score is worth in a small scheme."""
        return self.g_max / self.scale

    def damage(self, damage_score: float) -> float:
        """Predicted damage (metric units) of a scheme with summed unit damage `damage_score`; 0 without a model."""
        return 0.0 if self.damage_per_score is None else self.damage_per_score * damage_score

    def interval(self, score: float) -> tuple[float, float]:
        """A 95% interval (metric units) around `gain(score)`."""
        centre = self.gain(score)
        return centre - 1.96 * self.noise, centre + 1.96 * self.noise

    @property
    def saturates(self) -> bool:
        """Whether the measured schemes show diminishing returns (the fit is not a straight line)."""
        return self.scale < LINEAR_SCALE_FACTOR * 0.99 * self.largest_score


def fit_gain_model(
    scores: Sequence[float], measurements: Sequence[SchemeMeasurement], damage_scores=None
) -> GainModel:
    """Fit the curve through the measured schemes (`scores[i]` is the additive score of `measurements[i]`) and (0, 0).

    `damage_scores[i]` is the summed unit damage of scheme i; the damage model is fitted where both it and the
    measured damage are known, else left out (None).

    Raises:
        ValueError: fewer than two measured schemes, scores that are not positive and finite, or measured gains that
            are not finite.
    """
    scores, gains = np.asarray(scores, float), np.asarray([m.gain for m in measurements], float)
    if len(measurements) < 2 or len(scores) != len(measurements):
        raise ValueError(f"A gain model needs at least two measured schemes with scores, got {len(measurements)}.")
    if not (np.isfinite(scores).all() and (scores > 0).all() and np.isfinite(gains).all()):
        raise ValueError("Measured schemes need positive, finite additive scores and finite measured gains.")
    largest = float(scores.max())
    best = None
    for scale in SCALE_GRID * largest:
        shape = -np.expm1(-scores / scale)  # (n,)
        g_max = float(shape @ gains / (shape @ shape))
        error = float(((g_max * shape - gains) ** 2).sum())
        if best is None or error < best[0] - 1e-15 * max(error, 1e-300):
            best = (error, g_max, float(scale))
    error, g_max, scale = best
    residual_var = error / max(len(gains) - 1, 1)
    measured_se = float(np.median([m.gain_se for m in measurements]))
    noise = math.sqrt(residual_var + measured_se**2)
    damage_per_score = _fit_damage(measurements, damage_scores)
    return GainModel(g_max, scale, noise, damage_per_score, len(measurements), largest)


def _fit_damage(measurements: Sequence[SchemeMeasurement], damage_scores) -> float | None:
    """Least squares through the origin of measured damage on summed unit damage; None where nothing to fit."""
    if damage_scores is None:
        return None
    pairs = [(d, m.damage) for d, m in zip(damage_scores, measurements) if m.damage is not None and math.isfinite(d)]
    x = np.array([d for d, _ in pairs], float)
    if not pairs or float(x @ x) == 0.0:
        return None
    # a fit in which more summed unit damage means less measured damage is no evidence of damage: none is predicted
    return max(0.0, float(x @ np.array([damage for _, damage in pairs], float) / (x @ x)))
