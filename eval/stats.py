"""Confidence intervals by the percentile bootstrap, with a fixed seed so that the same scores give the same interval."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

RESAMPLES = 1000
CONFIDENCE = 0.95


def mean_ci(
    values: Sequence[float], *, resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = 0
) -> tuple[float, float, float]:
    """`(mean, low, high)`: the mean of `values` and its bootstrap confidence interval (examples resampled with
    replacement). `(nan, nan, nan)` for no values."""
    scores = np.asarray(values, dtype=np.float64)
    if scores.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = scores[rng.integers(0, scores.size, size=(resamples, scores.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(scores.mean()), float(low), float(high)


def paired_difference_ci(after: Sequence[float], before: Sequence[float], **options) -> tuple[float, float, float]:
    """`(mean difference, low, high)` of `after - before` on the same examples. Resampling the per-example
    differences keeps the pairing, so the interval is much tighter than comparing two separate intervals; an interval
    that excludes 0 is a gain (or loss) that noise in the choice of examples does not explain."""
    if len(after) != len(before):
        raise ValueError(f"paired scores need the same examples: {len(after)} vs {len(before)} scores")
    return mean_ci(np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64), **options)


def majority_rate(labels: Sequence[str]) -> float:
    """The share of the most common gold label: the accuracy of always giving that answer (nan for no labels)."""
    if not labels:
        return float("nan")
    return Counter(labels).most_common(1)[0][1] / len(labels)
