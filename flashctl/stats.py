"""Uncertainty for recipe comparisons: intervals on accuracies, paired tests between levels.

Pure functions on counts and 0/1 outcomes (standard library only), so the report, `evaluate`
and tests share one implementation. Why these:

* **Wilson score interval** for an accuracy k/n: unlike the normal ("Wald") interval it stays
  inside [0, 1] and keeps close to its nominal coverage at the small n and extreme accuracies
  of a verifier eval set (Brown, Cai & DasGupta 2001).
* **Exact McNemar test** between two models scored on the *same* rows and seeds: only the
  discordant rows (one right, the other wrong) carry information; under "no difference" each is
  a fair coin, so the two-sided p-value is a binomial tail. Pairing removes the row-difficulty
  variance that two independent intervals would double-count, which is why it can tell levels
  apart that overlapping intervals cannot.
* **Holm's step-down adjustment** of the best level's tests against the L-1 others: "best"
  is chosen after looking, and with five levels one of four uncorrected tests reaches p < 0.05
  by chance far more often than 5% of the time. Holm keeps the family-wise error at alpha and
  is uniformly more powerful than Bonferroni (Holm 1979); with two levels it changes nothing.
* **Mean and spread over training seeds** (`ablate --seeds N`): the seed-to-seed spread is the
  variance of the recipe itself, which no per-row interval shows.
* **Student's two-sample t-test on per-seed accuracies** between two levels that each ran with
  several training seeds: pooling seeds into one McNemar treats another training seed as more
  eval rows, so a gap that one lucky seed makes looks certain. The seed is the unit here (each
  seed's accuracy on the rows both levels share, which carries that seed's row noise too), with
  Sa + Sb - 2 degrees of freedom: at 2 seeds a side that is 2, so only a gap far outside the
  seeds' spread passes, which is what 2 seeds can honestly say. A two-level bootstrap over
  seeds and rows was tried first and rejected: with 2 seeds it resamples only three seed means
  at half their variance, and in simulation (200 rows, 2 seeds a level, seed spread 0.25 / 0.5
  in logits; README "Findings and uncertainty") it rejected 5.5% / 19% of true nulls at alpha
  0.05, the t-test 4.0% / 6.5%. scipy's t distribution (a dependency of mlflow).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054
"""Two-sided 95% standard-normal quantile."""


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def wilson(k: int, n: int, z: float = Z95) -> Interval:
    """Wilson score interval of k successes in n trials (estimate k/n).

    centre = (p + z²/2n) / (1 + z²/n),  half = z / (1 + z²/n) · sqrt(p(1-p)/n + z²/4n²).
    n = 0 gives the uninformative [0, 1] around NaN.
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return Interval(float("nan"), 0.0, 1.0, 0)
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), n)


def accuracy_interval(outcomes: Iterable[bool]) -> Interval:
    """Wilson interval of a list of per-row 0/1 outcomes."""
    values = [bool(v) for v in outcomes]
    return wilson(sum(values), len(values))


@dataclass(frozen=True)
class PairedTest:
    """McNemar between A and B on the same rows: `a_only` rows A got right and B wrong, etc."""

    n: int
    a_only: int
    b_only: int
    p_value: float

    @property
    def difference(self) -> float:
        """acc(A) - acc(B) on the paired rows."""
        return (self.a_only - self.b_only) / self.n if self.n else float("nan")


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: 2 · P(X <= min(b, c)), X ~ Binomial(b + c, 1/2), capped at 1."""
    m = a_only + b_only
    if m == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2**m
    return min(1.0, 2 * tail)


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values of a family of tests: sorted ascending p_(1) <= ... <= p_(m), the
    i-th becomes max over j <= i of min(1, (m - j + 1) p_(j)); reject where adjusted < alpha."""
    order = sorted(p_values, key=lambda k: p_values[k])
    m, running, out = len(order), 0.0, {}
    for i, key in enumerate(order):
        running = max(running, min(1.0, (m - i) * p_values[key]))
        out[key] = running
    return out


def paired_test(a: dict[str, bool], b: dict[str, bool]) -> PairedTest:
    """Exact McNemar on the keys (row id + seed) both models were scored on."""
    keys = sorted(set(a) & set(b))
    a_only = sum(1 for key in keys if a[key] and not b[key])
    b_only = sum(1 for key in keys if b[key] and not a[key])
    return PairedTest(len(keys), a_only, b_only, mcnemar_exact(a_only, b_only))


@dataclass(frozen=True)
class Spread:
    """Mean and spread of one metric over repeats (training seeds)."""

    mean: float
    std: float
    low: float
    high: float
    n: int


def spread(values: Sequence[float]) -> Spread:
    """Mean, sample standard deviation (0 for one value), min and max."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return Spread(float("nan"), float("nan"), float("nan"), float("nan"), 0)
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return Spread(mean, std, min(vals), max(vals), len(vals))


def rows_for_half_width(half_width: float, p: float = 0.5, z: float = Z95) -> int:
    """Rows an eval set needs for a ~95% interval of ±`half_width` at accuracy `p` (normal approximation,
    worst case p = 0.5): n = z² p (1-p) / h²."""
    return math.ceil(z * z * p * (1 - p) / (half_width * half_width))


@dataclass(frozen=True)
class SeedTest:
    """acc(A) - acc(B) as the difference of the means over each level's training seeds, on the
    eval rows both levels share, with Student's t interval and p-value (the seed is the unit)."""

    difference: float
    low: float
    high: float
    p_value: float
    seeds_a: int
    seeds_b: int
    rows: int


def seed_test(a: Mapping[str, Mapping[str, bool]], b: Mapping[str, Mapping[str, bool]]) -> SeedTest | None:
    """Two-sample Student's t-test (equal variances, df = Sa + Sb - 2) on per-seed accuracies.

    `a`, `b`: training seed -> row key (the same key for the same eval row in every seed and
    level) -> outcome; each seed's accuracy is taken on the rows every seed of both levels has.
    Two-sided p and a 95% interval of the difference. When every seed of both levels scores
    exactly alike (no spread to test against), p is 0 for a non-zero difference and 1 otherwise:
    the seeds add nothing to the row-level McNemar then. None unless both levels have >= 2
    seeds and share rows."""
    from scipy import stats as sps

    if len(a) < 2 or len(b) < 2:
        return None
    common = set.intersection(*(set(o) for o in (*a.values(), *b.values())))
    if not common:
        return None
    acc_a = [sum(bool(o[k]) for k in common) / len(common) for o in a.values()]
    acc_b = [sum(bool(o[k]) for k in common) / len(common) for o in b.values()]
    na, nb = len(acc_a), len(acc_b)
    ma, mb = sum(acc_a) / na, sum(acc_b) / nb
    diff = ma - mb
    ss = sum((x - ma) ** 2 for x in acc_a) + sum((x - mb) ** 2 for x in acc_b)
    df = na + nb - 2
    se = math.sqrt(ss / df * (1 / na + 1 / nb))
    if se == 0:
        return SeedTest(diff, diff, diff, 0.0 if diff else 1.0, na, nb, len(common))
    half = float(sps.t.ppf(0.975, df)) * se
    p = float(2 * sps.t.sf(abs(diff) / se, df))
    return SeedTest(diff, diff - half, diff + half, min(1.0, p), na, nb, len(common))
