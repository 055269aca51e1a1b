"""What a grid found: per factor, each level's accuracy with its interval, the best level, whether
it beats the others on the same rows and seeds, and how that compares with the paper.

Pure: inputs are per-row verifier outcomes of each cell's student (from its `eval/results.json`),
keyed so that the same key means the same eval row, sampled with the same seed, in a cell that
differs only in the factor being compared. Intervals are Wilson, comparisons exact McNemar
(`flashctl.stats`), the best level's tests against the others Holm-adjusted as one family (the
best is picked after looking). A level "wins" a task only when it has the highest accuracy AND
every adjusted paired test against another level gives p < `ALPHA`; otherwise the finding says
the levels cannot be told apart at this eval size, which is a result, not a failure. When both
levels of a comparison ran with several training seeds (`ablate --seeds N`), the win must also
hold across seeds: Student's t on per-seed accuracies (`stats.seed_test`, Holm-adjusted as its
own family), since the pooled McNemar counts another seed as more eval rows; in such a grid a
pair with one seed on either side cannot confirm a win.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from flashctl.stats import (
    Interval,
    PairedTest,
    SeedTest,
    Spread,
    accuracy_interval,
    holm,
    paired_test,
    seed_test,
    spread,
)

ALPHA = 0.05
SEED_FACTOR = "seed"
"""Pseudo-factor of `ablate --seeds N`: repeats of every cell over training seeds (pooled, not compared)."""

Outcomes = dict[str, bool]
"""Pairing key (other factors' levels, seed, row id) -> the student got the row right (per seed:
the key leaves the seed out, so one row has one key in every seed)."""

METRICS: dict[str, str] = {"t2i": "T2I", "edit": "edit", "text": "text rendering (T2I, text category)"}
"""Outcome groups compared per factor: T2I rows, edit rows, and the text category of T2I rows."""


@dataclass(frozen=True)
class PaperClaim:
    claim: str
    metric: str


PAPER: dict[str, PaperClaim] = {
    "data-composition": PaperClaim(
        "text-centric or more diverse data does not necessarily help text rendering", "text"),
    "teacher-guidance": PaperClaim(
        "using a task-specialised teacher directly destabilises training; step-wise multi-teacher "
        "guidance keeps fidelity", "edit"),
    "task-mixture": PaperClaim("5:5 is best for editing (and also helps T2I)", "edit"),
}
"""What arXiv 2606.03746 reports per factor, and the outcome group that tests it here."""


@dataclass
class LevelResult:
    level: str
    interval: Interval
    seeds: Spread | None = None  # accuracy over training seeds, when the grid repeats seeds


@dataclass
class MetricFinding:
    """One factor x one outcome group."""

    factor: str
    metric: str
    levels: list[LevelResult]
    best: str | None
    tests: dict[str, PairedTest] = field(default_factory=dict)  # best vs each other level
    significant: bool = False
    adjusted: dict[str, float] = field(default_factory=dict)  # Holm-adjusted p of each test
    seed_tests: dict[str, SeedTest] = field(default_factory=dict)  # best vs level, across seeds
    seed_adjusted: dict[str, float] = field(default_factory=dict)  # Holm-adjusted p of each seed test

    @property
    def seeded(self) -> bool:
        """Some level ran several training seeds (`ablate --seeds N`)."""
        return any(lv.seeds is not None for lv in self.levels)

    def p(self, level: str) -> float:
        """The Holm-adjusted McNemar p-value of the best level against `level`."""
        return self.adjusted.get(level, self.tests[level].p_value)

    def seed_p(self, level: str) -> float | None:
        """The Holm-adjusted seed t-test p-value of the best level against `level` (None unless
        both ran several training seeds)."""
        if level not in self.seed_tests:
            return None
        return self.seed_adjusted.get(level, self.seed_tests[level].p_value)

    def beats_on_rows(self, level: str) -> bool:
        """The best level is above `level` on the same rows and seeds (Holm-adjusted McNemar)."""
        return level in self.tests and self.p(level) < ALPHA and self.tests[level].difference > 0

    def beats(self, level: str) -> bool:
        """The best level is significantly above `level`: on the same rows and seeds (McNemar)
        and, in a grid that repeats training seeds, across them (seed t-test). A pair with a
        single seed on either side cannot confirm there, since the other seeds showed spread."""
        if not self.beats_on_rows(level):
            return False
        if not self.seeded:
            return True
        sp = self.seed_p(level)
        return sp is not None and sp < ALPHA and self.seed_tests[level].difference > 0

    def sentence(self) -> str:
        name = METRICS.get(self.metric, self.metric)
        if self.best is None:
            return f"{self.factor}, {name}: no finished cell with results."
        best = next(lv for lv in self.levels if lv.level == self.best)
        acc = f"{100 * best.interval.estimate:.1f}% [{100 * best.interval.low:.1f}, {100 * best.interval.high:.1f}]"
        if len(self.levels) < 2:
            return f"{self.factor}, {name}: only {self.best} ran ({acc})."
        holm = " Holm-adjusted" if len(self.tests) > 1 else ""
        if self.significant:
            text = (f"{self.factor}, {name}: {self.best} is best ({acc}) and beats every other level on the "
                    f"same rows and seeds ({holm.strip() + ' ' if holm else ''}McNemar p <= "
                    f"{max(self.p(lv) for lv in self.tests):.3g}")
            if self.seeded:
                n = min(min(t.seeds_a, t.seeds_b) for t in self.seed_tests.values())
                text += (f") and across training seeds (t-test on {n}+ seeds a level, p <= "
                         f"{max(self.seed_p(lv) for lv in self.tests):.3g}")
            return text + ")."
        on_rows = [lv for lv in self.tests if not self.beats_on_rows(lv)]
        on_seeds = [lv for lv in self.tests if self.beats_on_rows(lv) and not self.beats(lv)]
        parts = []
        if on_rows:
            parts.append(f"{', '.join(on_rows)} at this eval size ({holm.strip() + ' ' if holm else ''}McNemar p = "
                         f"{max(self.p(lv) for lv in on_rows):.3g})")
        if on_seeds:
            tested = [self.seed_p(lv) for lv in on_seeds if self.seed_p(lv) is not None]
            single = [lv for lv in on_seeds if self.seed_p(lv) is None]
            why = []
            if tested:
                why.append(f"seed t-test p = {max(tested):.3g}{holm}")
            if single:
                why.append(f"{', '.join(single)} ran one training seed")
            parts.append(f"{', '.join(on_seeds)} across training seeds ({'; '.join(why)})")
        return (f"{self.factor}, {name}: {self.best} scores highest ({acc}) but cannot be told apart from "
                + "; nor from ".join(parts) + ".")


@dataclass
class FactorFinding:
    factor: str
    metrics: dict[str, MetricFinding]
    paper: PaperClaim | None = None
    verdict: str = "inconclusive"  # agree | disagree | inconclusive | not comparable
    why: str = ""


def compare(factor: str, metric: str, outcomes: Mapping[str, Outcomes],
            seed_outcomes: Mapping[str, Mapping[str, Outcomes]] | None = None) -> MetricFinding:
    """Intervals per level and the best level's paired tests against every other level.

    `outcomes`: level -> pooled outcomes; `seed_outcomes`: level -> seed -> outcomes (for the
    spread over training seeds)."""
    levels = [LevelResult(lv, accuracy_interval(o.values()),
                          spread([accuracy_interval(s.values()).estimate for s in seed_outcomes[lv].values()])
                          if seed_outcomes and len(seed_outcomes.get(lv, {})) > 1 else None)
              for lv, o in outcomes.items() if o]
    if not levels:
        return MetricFinding(factor, metric, [], None)
    best = max(levels, key=lambda r: r.interval.estimate).level
    tests = {lv: paired_test(outcomes[best], outcomes[lv]) for lv in outcomes if lv != best and outcomes[lv]}
    adjusted = holm({lv: t.p_value for lv, t in tests.items()})
    per_seed = seed_outcomes or {}
    seed_tests = {lv: t for lv in tests
                  if (t := seed_test(per_seed.get(best, {}), per_seed.get(lv, {}))) is not None}
    f = MetricFinding(factor, metric, levels, best, tests, False, adjusted, seed_tests,
                      holm({lv: t.p_value for lv, t in seed_tests.items()}))
    f.significant = bool(tests) and all(f.beats(lv) for lv in tests)
    return f


def _acc(f: MetricFinding, level: str) -> float | None:
    return next((r.interval.estimate for r in f.levels if r.level == level), None)


def judge(factor: str, metrics: Mapping[str, MetricFinding]) -> tuple[str, str]:
    """(verdict, why) of this grid's numbers against the paper's claim for `factor`."""
    claim = PAPER.get(factor)
    if claim is None:
        return "not comparable", "the paper has no claim for this factor"
    f = metrics.get(claim.metric)
    if f is None or f.best is None:
        return "not comparable", f"no {METRICS[claim.metric]} results"
    have = {r.level for r in f.levels}
    if factor == "task-mixture":
        if "5:5" not in have or len(have) < 2:
            return "not comparable", "needs 5:5 and at least one other mixture"
        if f.best == "5:5" and f.significant:
            return "agree", "5:5 has the best edit accuracy, significantly above every other mixture"
        t = paired_test_against(f, "5:5")
        if t:
            sp = f.seed_p("5:5")
            return "disagree", (f"{t[0]} edits significantly better than 5:5 (p = {t[1]:.3g}"
                                + (f"; across training seeds p = {sp:.3g})" if sp is not None else ")"))
        return "inconclusive", "no mixture is significantly better than the others at editing"
    if factor == "teacher-guidance":
        if not {"stepwise", "specialised"} <= have:
            return "not comparable", "needs both the stepwise and the specialised level"
        better = [m for m in metrics.values() if _significantly(m, "stepwise", "specialised")]
        worse = [m for m in metrics.values() if _significantly(m, "specialised", "stepwise")]
        if worse:
            return "disagree", f"specialised significantly better than stepwise on {METRICS[worse[0].metric]}"
        if better and all((_acc(m, "stepwise") or 0) >= (_acc(m, "specialised") or 0) for m in metrics.values()
                          if m.metric != "text"):
            return "agree", f"stepwise significantly better than specialised on {METRICS[better[0].metric]}"
        return "inconclusive", "stepwise and specialised cannot be told apart here"
    if factor == "data-composition":
        broad = [lv for lv in ("text-centric", "mixed-category") if lv in have]
        others = [lv for lv in have if lv not in broad]
        if not broad or not others:
            return "not comparable", "needs text-centric or mixed-category and one coherent level"
        if any(all(_significantly(f, b, o) for o in others) for b in broad):
            return "disagree", "text-centric / mixed data significantly improves text rendering over every other level"
        if f.best in others and all(_significantly(f, f.best, b) for b in broad):
            return "agree", f"{f.best} renders text significantly better than text-centric / mixed data"
        return "inconclusive", "the levels' text rendering cannot be told apart at this eval size"
    return "not comparable", ""


def paired_test_against(f: MetricFinding, level: str) -> tuple[str, float] | None:
    """A level significantly better than `level` in `f`, with its p-value (None if none)."""
    for other in (r.level for r in f.levels):
        if other != level and _significantly(f, other, level):
            return other, f.p(level)
    return None


def _significantly(f: MetricFinding, a: str, b: str) -> bool:
    """`a` beats `b` with Holm-adjusted p < ALPHA in `f` (tests are stored best-vs-other: only pairs
    with the best)."""
    return f.best == a and f.beats(b)


def factor_finding(factor: str, per_metric: Mapping[str, Mapping[str, Outcomes]],
                   per_metric_seeds: Mapping[str, Mapping[str, Mapping[str, Outcomes]]] | None = None) -> FactorFinding:
    metrics = {m: compare(factor, m, per_metric[m], (per_metric_seeds or {}).get(m)) for m in per_metric}
    verdict, why = judge(factor, metrics)
    claim = PAPER.get(factor)
    if verdict in ("agree", "disagree") and claim and not metrics[claim.metric].seeded:
        why += f"; {ONE_SEED}"
    return FactorFinding(factor, metrics, PAPER.get(factor), verdict, why)


ONE_SEED = ("one training seed per level: p covers the eval rows, not how far another training seed "
            "moves a cell; confirm with `flashctl ablate --seeds N`")
"""Said with an agree/disagree verdict of a grid without `--seeds`. Why: on the embedded default
two seeds of one recipe differed by 6.5 points T2I (README), more than its levels did."""


def group_outcomes(cells: Sequence[tuple[Mapping[str, str], Sequence[Mapping]]], factor: str,
                   factors: Sequence[str]):
    """Pool per-row outcomes of cells by `factor`'s level.

    `cells`: (levels of the cell, its student's per-row results [{id, task, category, correct}]).
    Keys pair a row with the same row of a cell that has the same other levels and seed.
    Returns (metric -> level -> outcomes keyed by (context, seed, row), metric -> level -> seed ->
    outcomes keyed by (context, row): the same key in every seed, for `stats.seed_test`)."""
    pooled: dict[str, dict[str, Outcomes]] = {m: {} for m in METRICS}
    seeds: dict[str, dict[str, dict[str, Outcomes]]] = {m: {} for m in METRICS}
    others = [f for f in factors if f != factor and f != SEED_FACTOR]
    for levels, rows in cells:
        level = levels.get(factor)
        if level is None:
            continue
        ctx = ",".join(f"{f}={levels.get(f)}" for f in others)
        seed = levels.get(SEED_FACTOR, "0")
        for r in rows:
            groups = [r.get("task")] + (["text"] if r.get("task") == "t2i" and r.get("category") == "text" else [])
            row = f"{ctx}|{r.get('id')}"
            for m in groups:
                if m in pooled:
                    pooled[m].setdefault(level, {})[f"{ctx}|{seed}|{r.get('id')}"] = bool(r.get("correct"))
                    seeds[m].setdefault(level, {}).setdefault(seed, {})[row] = bool(r.get("correct"))
    return pooled, seeds


START_MODEL = "teacher_fast"
"""The eval's model that is a student's starting point: the base teacher at the student's NFE
without CFG. A student initialised from that teacher, sampled on the teacher's schedule (the
embedded default's), *is* it before its first step: same weights, schedule and noise seeds."""


@dataclass
class Movement:
    """How far training moved one cell's student from its starting point, per task (`a` = student)."""

    cell: str
    tests: dict[str, PairedTest]

    @property
    def moved(self) -> bool:
        return any(t.p_value < ALPHA for t in self.tests.values())


def movement(cell: str, student: Sequence[Mapping], start: Sequence[Mapping]) -> Movement:
    """Student vs start on the same rows, per task (T2I, edit): exact McNemar, not adjusted (one
    question per cell: did it leave its initialisation?)."""
    tests = {}
    for task in ("t2i", "edit"):
        a = {str(r.get("id")): bool(r.get("correct")) for r in student if r.get("task") == task}
        b = {str(r.get("id")): bool(r.get("correct")) for r in start if r.get("task") == task}
        if a.keys() & b.keys():
            tests[task] = paired_test(a, b)
    return Movement(cell, tests)


def movement_sentence(moves: Sequence[Movement]) -> str:
    """One line on whether the grid's cells trained long enough to be compared at all."""
    if not moves:
        return ""
    still = [m.cell for m in moves if not m.moved]
    if len(still) == len(moves):
        worst = min((t.p_value for m in moves for t in m.tests.values()), default=1.0)
        return ("No cell's student can be told apart from its starting point, the teacher at the student's NFE "
                f"without CFG (McNemar p >= {worst:.3g} on T2I and edits): at this length training has moved the "
                "students less than the eval can see, so the levels cannot differ by more either; train longer "
                "before comparing them.")
    how = "; ".join(f"{m.cell} {_moves(m)}" for m in moves if m.moved)
    if still:
        return (f"{len(moves) - len(still)} of {len(moves)} cells moved measurably from their starting point "
                f"({how}); {', '.join(still)} did not (McNemar p >= {ALPHA} on T2I and edits).")
    down = any(t.difference < 0 and t.p_value < ALPHA for m in moves for t in m.tests.values())
    return (f"Every cell's student moved measurably from its starting point ({how}; McNemar p < {ALPHA})"
            + ("; a move down is training that costs accuracy at this length, not a cell too short to compare."
               if down else "."))


_TASK_NAMES = {"t2i": "T2I", "edit": "edit"}


def _moves(m: Movement) -> str:
    """'T2I -7.3 points, edit -6.0 points': the tasks on which a cell moved measurably, signed."""
    return ", ".join(f"{_TASK_NAMES.get(task, task)} {100 * t.difference:+.1f} points"
                     for task, t in m.tests.items() if t.p_value < ALPHA)
