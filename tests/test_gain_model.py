"""The gain model: a monotone curve through measured schemes, paired noise, non-negative damage fit."""

from __future__ import annotations

import pytest

from pock_hf.planning.gain_model import SchemeMeasurement, fit_gain_model


def scheme(gain: float, se: float = 0.1, step_se: float | None = None, damage: float | None = None):
    return SchemeMeasurement([], gain, se, damage, None if damage is None else se, 8, 0.0, step_se)


def test_the_curve_passes_through_the_measured_schemes_and_continues_their_last_slope():
    model = fit_gain_model([1.0, 2.0, 4.0], [scheme(0.5), scheme(0.8), scheme(0.9)])
    assert [model.gain(a) for a in (0.0, 0.5, 1.0, 2.0, 3.0, 4.0)] == pytest.approx([0, 0.25, 0.5, 0.8, 0.85, 0.9])
    assert model.gain(6.0) == pytest.approx(0.9 + 0.05 * 2)  # last segment: 0.1 over 2 units of score
    assert model.slope() == pytest.approx(0.5) and model.saturates
    low, high = model.interval(3.0)
    assert low < 0.85 < high


def test_a_gain_below_a_smaller_schemes_is_pooled_so_the_curve_never_falls():
    model = fit_gain_model([1.0, 2.0, 3.0], [scheme(0.6), scheme(0.4), scheme(0.9)])
    gains = [model.gain(a) for a in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)]
    assert gains == sorted(gains)
    assert model.gain(1.5) == pytest.approx(0.5)  # 0.6 and 0.4 pooled at score 1.5
    assert not fit_gain_model([1.0, 2.0], [scheme(0.1), scheme(0.2)]).saturates  # still linear


def test_noise_is_the_paired_step_error_when_measured():
    paired = fit_gain_model([1.0, 2.0, 4.0], [scheme(0.5), scheme(0.8, step_se=0.01), scheme(0.9, step_se=0.03)])
    assert paired.noise == pytest.approx(0.02)
    unpaired = fit_gain_model([1.0, 2.0], [scheme(0.5, se=0.2), scheme(0.8, se=0.4)])
    assert unpaired.noise == pytest.approx(0.3)


def test_damage_is_fitted_non_negative_on_unit_damage_and_scheme_size():
    measurements = [scheme(0.5, damage=0.1), scheme(0.8, damage=0.2), scheme(0.9, damage=0.4)]
    model = fit_gain_model([1.0, 2.0, 4.0], measurements, damage_scores=[-0.1, -0.2, -0.4])
    # unit damages predict the opposite sign: their coefficient is 0, damage grows with the score instead
    assert model.damage_per_score == 0.0 and model.damage_per_gain == pytest.approx(0.1)
    assert model.damage(-1.0, 3.0) == pytest.approx(0.3)
    assert not fit_gain_model([1.0, 2.0], [scheme(0.5), scheme(0.8)]).has_damage


@pytest.mark.parametrize(
    ("scores", "gains", "message"),
    [
        ([1.0], [0.5], "at least two"),
        ([0.0, 1.0], [0.1, 0.2], "positive, finite"),
        ([1.0, 2.0], [0.1, float("nan")], "finite"),
    ],
)
def test_bad_measurements_are_refused(scores, gains, message):
    with pytest.raises(ValueError, match=message):
        fit_gain_model(scores, [scheme(g) for g in gains])
