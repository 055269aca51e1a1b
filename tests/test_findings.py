"""Findings: intervals per level, paired tests, the verdict against the paper (hand-built outcomes)."""

from __future__ import annotations

import pytest

from flashctl.findings import ONE_SEED, compare, factor_finding, group_outcomes
from flashctl.stats import mcnemar_exact


def rows(task: str, correct: list[bool], category: str = "object") -> list[dict]:
    return [{"id": f"{task}-{i}", "task": task, "category": category, "correct": c} for i, c in enumerate(correct)]


def mixture_cells(edit: dict[str, int], n: int = 100, seeds=("0",)):
    """Cells of a task-mixture grid: level -> number of the n edit rows right (the first k)."""
    cells = []
    for seed in seeds:
        for level, k in edit.items():
            levels = {"task-mixture": level, **({"seed": seed} if len(seeds) > 1 else {})}
            cells.append((levels, rows("edit", [i < k for i in range(n)]) + rows("t2i", [True] * 10)))
    return cells


def test_a_clear_winner_is_significant_and_agrees_with_the_paper():
    pooled, seeds = group_outcomes(mixture_cells({"9:1": 40, "7:3": 50, "5:5": 70}), "task-mixture", ["task-mixture"])
    f = factor_finding("task-mixture", pooled, seeds)
    edit = f.metrics["edit"]
    assert edit.best == "5:5" and edit.significant
    # the first 40 rows are right in both: 5:5 vs 9:1 differ on exactly 30 rows, all in 5:5's favour
    t = edit.tests["9:1"]
    assert (t.n, t.a_only, t.b_only) == (100, 30, 0) and t.p_value == pytest.approx(mcnemar_exact(30, 0))
    assert [round(r.interval.estimate, 2) for r in edit.levels] == [0.4, 0.5, 0.7]
    assert f.verdict == "agree"
    assert "5:5 is best" in edit.sentence() and "beats every other level" in edit.sentence()


def test_levels_that_cannot_be_told_apart_say_so():
    pooled, seeds = group_outcomes(mixture_cells({"9:1": 52, "7:3": 50, "5:5": 55}), "task-mixture", ["task-mixture"])
    f = factor_finding("task-mixture", pooled, seeds)
    assert f.metrics["edit"].best == "5:5" and not f.metrics["edit"].significant
    assert f.verdict == "inconclusive"
    assert "cannot be told apart" in f.metrics["edit"].sentence()


def test_another_level_significantly_better_disagrees():
    pooled, seeds = group_outcomes(mixture_cells({"9:1": 80, "5:5": 40}), "task-mixture", ["task-mixture"])
    f = factor_finding("task-mixture", pooled, seeds)
    assert f.verdict == "disagree" and "9:1" in f.why
    # one training seed per level: the verdict says what its p-value does not cover
    assert f.why.endswith("one training seed per level: p covers the eval rows, not how far another training "
                          "seed moves a cell; confirm with `flashctl ablate --seeds N`")
    cells = mixture_cells({"9:1": 80, "5:5": 40}, seeds=("0", "1"))
    pooled, seeds = group_outcomes(cells, "task-mixture", ["task-mixture", "seed"])
    f = factor_finding("task-mixture", pooled, seeds)
    assert f.verdict == "disagree" and ONE_SEED not in f.why  # seeds ran: their spread is in the table
    assert "across training seeds p = " in f.why


def test_seeds_pool_as_pairs_and_give_a_spread():
    cells = mixture_cells({"9:1": 40, "5:5": 70}, seeds=("0", "1"))
    cells[3] = ({"task-mixture": "5:5", "seed": "1"}, rows("edit", [i < 60 for i in range(100)]))  # seed 1 of 5:5
    pooled, seeds = group_outcomes(cells, "task-mixture", ["task-mixture", "seed"])
    assert len(pooled["edit"]["5:5"]) == 200  # (seed, row) keys
    finding = compare("task-mixture", "edit", pooled["edit"], seeds["edit"])
    five = next(r for r in finding.levels if r.level == "5:5")
    assert five.interval.estimate == pytest.approx(0.65) and five.seeds.n == 2
    assert five.seeds.mean == pytest.approx(0.65) and five.seeds.low == pytest.approx(0.6)


def _seeded(rights: dict[str, list[int]], n: int = 100):
    """Task-mixture cells over seeds: level -> edit rows right per seed (the first k of n)."""
    return [({"task-mixture": lv, "seed": str(i)}, rows("edit", [j < k for j in range(n)]))
            for lv, ks in rights.items() for i, k in enumerate(ks)]


def test_with_seeds_a_win_must_hold_across_training_seeds():
    # 5:5's two seeds 90 and 50, 9:1's 60 and 60: pooled McNemar p = 0.002, but one seed made it
    pooled, seeds = group_outcomes(_seeded({"5:5": [90, 50], "9:1": [60, 60]}), "task-mixture",
                                   ["task-mixture", "seed"])
    f = factor_finding("task-mixture", pooled, seeds)
    edit = f.metrics["edit"]
    assert edit.best == "5:5" and edit.p("9:1") < 0.01
    assert edit.seed_p("9:1") > 0.3 and not edit.significant and f.verdict == "inconclusive"
    assert "cannot be told apart from 9:1 across training seeds" in edit.sentence()
    # every seed shows the gap: significant on both tests, and the paper's claim is met
    pooled, seeds = group_outcomes(_seeded({"5:5": [70, 72], "9:1": [40, 42]}), "task-mixture",
                                   ["task-mixture", "seed"])
    f = factor_finding("task-mixture", pooled, seeds)
    edit = f.metrics["edit"]
    assert edit.significant and edit.seed_p("9:1") == pytest.approx(0.0022, abs=1e-4) and f.verdict == "agree"
    assert "and across training seeds (t-test on 2+ seeds a level, p <= 0.00221)" in edit.sentence()


def test_in_a_seeded_grid_a_level_with_one_seed_cannot_confirm_a_win():
    # 9:1's second seed failed: 5:5 seed 0 (90) vs 9:1 seed 0 (60) is McNemar p ~ 1e-9, but
    # 5:5's own seeds differ by 40 points, so one seed of 9:1 cannot settle it
    pooled, seeds = group_outcomes(_seeded({"5:5": [90, 50], "9:1": [60]}), "task-mixture",
                                   ["task-mixture", "seed"])
    f = factor_finding("task-mixture", pooled, seeds)
    edit = f.metrics["edit"]
    assert edit.p("9:1") < 1e-6 and edit.seed_p("9:1") is None
    assert not edit.significant and f.verdict == "inconclusive"
    assert "cannot be told apart from 9:1 across training seeds (9:1 ran one training seed)" in edit.sentence()


def test_the_sentence_names_which_test_each_level_failed():
    # 9:1 fails on the rows (McNemar), 7:3 passes them (30 rows to 10) but not across seeds
    pooled, seeds = group_outcomes(_seeded({"5:5": [90, 50], "7:3": [60, 60], "9:1": [69, 69]}), "task-mixture",
                                   ["task-mixture", "seed"])
    edit = factor_finding("task-mixture", pooled, seeds).metrics["edit"]
    assert edit.beats_on_rows("7:3") and not edit.beats_on_rows("9:1") and not edit.beats("7:3")
    assert "cannot be told apart from 9:1 at this eval size (Holm-adjusted McNemar p = " in edit.sentence()
    assert "; nor from 7:3 across training seeds (seed t-test p = " in edit.sentence()


def test_text_rendering_is_its_own_outcome_group_for_data_composition():
    cells = [({"data-composition": "text-centric"}, rows("t2i", [i < 5 for i in range(20)], "text")),
             ({"data-composition": "portrait-only"}, rows("t2i", [i < 12 for i in range(20)], "text"))]
    pooled, _ = group_outcomes(cells, "data-composition", ["data-composition"])
    f = factor_finding("data-composition", pooled)
    assert f.metrics["text"].best == "portrait-only"
    assert f.verdict == "agree" and f.paper.metric == "text"


def test_guidance_needs_both_levels_to_compare():
    pooled, _ = group_outcomes([({"teacher-guidance": "single"}, rows("edit", [True]))], "teacher-guidance",
                               ["teacher-guidance"])
    assert factor_finding("teacher-guidance", pooled).verdict == "not comparable"


def test_equal_text_rendering_is_inconclusive_not_agreement():
    cells = [({"data-composition": "text-centric"}, rows("t2i", [i < 10 for i in range(20)], "text")),
             ({"data-composition": "portrait-only"}, rows("t2i", [i < 10 for i in range(20)], "text"))]
    pooled, _ = group_outcomes(cells, "data-composition", ["data-composition"])
    assert factor_finding("data-composition", pooled).verdict == "inconclusive"


def test_one_small_p_among_five_levels_is_not_a_finding_after_holm():
    """specialised beats stepwise on 6 discordant edit rows, all its way (raw McNemar p = 2/2^6 =
    0.031), but it is one of four tests of a best level picked after looking: Holm multiplies the
    smallest p by 4 (0.125), so neither a winner nor a disagreement with the paper is claimed."""
    right = {"specialised": 50, "stepwise": 44, "single": 48, "stepwise-3": 49, "stepwise-01": 49}
    cells = [({"teacher-guidance": lv}, rows("edit", [i < k for i in range(100)])) for lv, k in right.items()]
    pooled, _ = group_outcomes(cells, "teacher-guidance", ["teacher-guidance"])
    f = factor_finding("teacher-guidance", pooled)
    edit = f.metrics["edit"]
    assert edit.best == "specialised" and edit.tests["stepwise"].p_value == pytest.approx(mcnemar_exact(6, 0))
    assert edit.p("stepwise") == pytest.approx(4 * mcnemar_exact(6, 0))
    assert not edit.significant and f.verdict == "inconclusive"
    assert "Holm-adjusted" in edit.sentence()


def _rows(task: str, right: list[bool]) -> list[dict]:
    return [{"id": f"{task}-{i}", "task": task, "correct": c} for i, c in enumerate(right)]


def test_movement_pairs_each_task_with_the_starting_point_and_says_when_nothing_moved():
    from flashctl.findings import movement, movement_sentence

    start = _rows("t2i", [True] * 20 + [False] * 20) + _rows("edit", [True] * 10 + [False] * 30)
    # T2I: 10 rows gained, none lost (p = 2 * 0.5**10); edits: one gained, one lost
    moved = movement("5:5", _rows("t2i", [True] * 30 + [False] * 10)
                     + _rows("edit", [False] + [True] * 10 + [False] * 29), start)
    assert moved.tests["t2i"].a_only == 10 and moved.tests["t2i"].b_only == 0
    assert moved.tests["t2i"].p_value == pytest.approx(mcnemar_exact(10, 0)) == pytest.approx(2 * 0.5 ** 10)
    assert moved.tests["edit"].difference == 0 and moved.tests["edit"].p_value == 1
    assert moved.moved
    still = movement("t2i-only", start, start)
    assert not still.moved and still.tests["t2i"].p_value == 1
    assert movement_sentence([still]).startswith("No cell's student can be told apart from its starting point")
    assert movement_sentence([moved, still]).startswith("1 of 2 cells moved measurably from their starting point "
                                                        "(5:5 T2I +25.0 points); t2i-only did not")
    assert movement_sentence([moved]).startswith("Every cell's student moved measurably from its starting point "
                                                 "(5:5 T2I +25.0 points;")
    assert movement("x", start, _rows("t2i", [True])).tests.keys() == {"t2i"}  # only tasks both have
