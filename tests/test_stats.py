"""Intervals and paired tests against hand-computed values."""

from __future__ import annotations

import math

import pytest

from flashctl.stats import (
    accuracy_interval,
    mcnemar_exact,
    paired_test,
    rows_for_half_width,
    seed_test,
    spread,
    wilson,
)


def test_wilson_matches_the_hand_computed_interval():
    # 8/10: p=.8, z²/n=.38416, centre=(.8+.19208)/1.38416=.71674, half=1.41602*sqrt(.016+.009604)=.22658
    iv = wilson(8, 10)
    assert iv.estimate == 0.8
    assert iv.low == pytest.approx(0.4902, abs=1e-4) and iv.high == pytest.approx(0.9433, abs=1e-4)
    # stays inside [0, 1] where the Wald interval would not
    zero, full = wilson(0, 20), wilson(20, 20)
    assert zero.low == 0.0 and 0 < zero.high < 0.17 and full.high == 1.0 and 0.83 < full.low < 1


def test_wilson_narrows_with_rows_and_rejects_bad_counts():
    assert wilson(240, 400).half_width < 0.05 < wilson(24, 40).half_width
    assert math.isnan(wilson(0, 0).estimate) and (wilson(0, 0).low, wilson(0, 0).high) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson(5, 4)
    assert accuracy_interval([True, False, True, True]) == wilson(3, 4)


def test_rows_needed_for_a_five_point_interval():
    # 1.96² · .25 / .05² = 384.1 -> 385
    assert rows_for_half_width(0.05) == 385
    assert wilson(192, 385).half_width <= 0.05


def test_exact_mcnemar_by_hand():
    assert mcnemar_exact(0, 6) == pytest.approx(2 * 0.5**6)  # 0.03125
    assert mcnemar_exact(1, 5) == pytest.approx(2 * (1 + 6) / 64)  # 0.21875
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_paired_test_uses_only_shared_rows():
    a = {"r1": True, "r2": True, "r3": False, "r4": True, "only-a": True}
    b = {"r1": True, "r2": False, "r3": False, "r4": False, "only-b": False}
    t = paired_test(a, b)
    assert (t.n, t.a_only, t.b_only) == (4, 2, 0)
    assert t.difference == 0.5 and t.p_value == pytest.approx(0.5)


def test_spread_over_seeds():
    s = spread([0.5, 0.7, 0.6])
    assert s.mean == pytest.approx(0.6) and s.std == pytest.approx(0.1) and (s.low, s.high, s.n) == (0.5, 0.7, 3)
    assert spread([0.4]).std == 0.0 and spread([]).n == 0


def test_holm_adjusts_by_hand_and_keeps_the_order():
    from flashctl.stats import holm

    # sorted 0.01, 0.02, 0.04 with m = 3: 3 x 0.01 = 0.03, 2 x 0.02 = 0.04, 1 x 0.04 = 0.04
    assert holm({"a": 0.04, "b": 0.01, "c": 0.02}) == pytest.approx({"a": 0.04, "b": 0.03, "c": 0.04})
    # monotone: a larger raw p never gets a smaller adjusted one; capped at 1
    assert holm({"a": 0.5, "b": 0.3}) == pytest.approx({"a": 0.6, "b": 0.6})
    assert holm({"only": 0.03}) == {"only": 0.03}  # two levels: one test, nothing to adjust
    assert holm({}) == {}


def _seeds(rights: list[int], n: int = 100) -> dict[str, dict[str, bool]]:
    """Training seed -> row -> outcome: in seed i the first rights[i] of n rows are right."""
    return {str(i): {f"r{j}": j < k for j in range(n)} for i, k in enumerate(rights)}


def test_seed_test_is_students_t_on_per_seed_accuracies_by_hand():
    # seeds 0.70, 0.72 vs 0.40, 0.42: difference 0.30, pooled variance (4 x 0.01^2) / 2 = 2e-4,
    # se = sqrt(2e-4 x (1/2 + 1/2)); with df = 2 the two-sided p is 1 - t / sqrt(t^2 + 2)
    t = seed_test(_seeds([70, 72]), _seeds([40, 42]))
    se = math.sqrt(2e-4)
    assert t.difference == pytest.approx(0.30) and (t.seeds_a, t.seeds_b, t.rows) == (2, 2, 100)
    tt = 0.30 / se
    assert t.p_value == pytest.approx(1 - tt / math.sqrt(tt * tt + 2))  # 0.0022
    assert (t.low, t.high) == (pytest.approx(0.30 - 4.302653 * se, abs=1e-6), pytest.approx(0.30 + 4.302653 * se, abs=1e-6))


def test_seed_test_does_not_count_one_lucky_seed_as_more_rows():
    """A's seeds score 90 and 50, B's 60 and 60 on the same 100 rows. Pooled over seeds as 200
    paired rows, McNemar sees 30 rows for A against 10 for B (p = 0.002); across seeds, A's mean
    (0.7) is one draw of a recipe whose seeds differ by 40 points: t = 0.1 / 0.2, p = 2/3."""
    a, b = _seeds([90, 50]), _seeds([60, 60])
    pooled = lambda d: {f"{s}|{r}": v for s, rows in d.items() for r, v in rows.items()}  # noqa: E731
    p_pooled = paired_test(pooled(a), pooled(b)).p_value
    assert p_pooled == pytest.approx(mcnemar_exact(30, 10)) and p_pooled < 0.01
    t = seed_test(a, b)
    assert t.difference == pytest.approx(0.10) and t.p_value == pytest.approx(2 / 3)
    assert t.low < 0 < t.high


def test_seed_test_needs_two_seeds_a_side_and_shared_rows():
    assert seed_test(_seeds([70]), _seeds([40, 42])) is None
    assert seed_test(_seeds([70, 72]), _seeds([40])) is None
    other_rows = {s: {f"x{r}": v for r, v in rows.items()} for s, rows in _seeds([40, 42]).items()}
    assert seed_test(_seeds([70, 72]), other_rows) is None
    # seeds that score exactly alike leave nothing to test against: the row-level McNemar decides
    assert seed_test(_seeds([70, 70]), _seeds([40, 40])).p_value == 0.0
    assert seed_test(_seeds([70, 70]), _seeds([70, 70])).p_value == 1.0
