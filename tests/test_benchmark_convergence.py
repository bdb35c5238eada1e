"""The convergence verdicts the studies report for each run (benchmarks/common.converged and
benchmarks/realphoto_study.trend), on hand-made validation curves whose answer is known."""

from __future__ import annotations

import pytest

from benchmarks.common import converged
from benchmarks.realphoto_study import trend


def curve(steps: list[int], ciders: list[float]) -> list[dict]:
    return [{"step": s, "cider": c} for s, c in zip(steps, ciders, strict=True)]


STEPS = [47, 94, 141, 188, 235, 282, 300]  # a 300-step run validated at each epoch's end: 4 in the last third


def test_flat_within_tolerance_is_converged():
    c = curve(STEPS, [0.10, 0.16, 0.20, 0.215, 0.222, 0.212, 0.216])  # last third within 2.4% of its mean
    assert converged(c, 300, floor=0.01) is True
    assert trend(c, 300) == "flat"


def test_absolute_floor_decides_on_small_scores():
    # 6% around a mean of 0.176: flat on the shapes' floor of 0.05 CIDEr, not on real photos' 0.01
    c = curve(STEPS, [0.11, 0.11, 0.12, 0.174, 0.165, 0.183, 0.180])
    assert converged(c, 300) is True
    assert converged(c, 300, floor=0.01) is False
    assert trend(c, 300) == "rising"


def test_falling_curve_is_past_its_best():
    c = curve(STEPS, [0.0, 0.066, 0.128, 0.134, 0.133, 0.122, 0.108])
    assert converged(c, 300, floor=0.01) is False
    assert trend(c, 300) == "falling"


@pytest.mark.parametrize("steps", [[100, 200, 300], [150, 300]])
def test_too_few_validations_in_the_last_third_is_unknown(steps):
    c = curve(steps, [0.2] * len(steps))
    assert converged(c, 300) is None
    assert trend(c, 300) is None
