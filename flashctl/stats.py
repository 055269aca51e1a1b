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
* **Two-level bootstrap over training seeds and rows** between two levels that each ran with
  several seeds: pooling seeds into one McNemar treats another training seed as more eval rows,
  so a gap that one lucky seed makes looks certain. Resampling the seeds of each level (they
  are independent training runs) and, shared by both levels, the eval rows (they are paired)
  gives an interval and a p-value for the difference of the seed means that carry both
  sources of variance (the hierarchical bootstrap of Saravanan et al. 2020). With n seeds the
  resampled seed mean has (n-1)/n of the usual variance: at 2 seeds half, so read a p near
  0.05 from 2 seeds as optimistic. numpy for this one: 4000 replicates x rows x seeds.
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
class SeedBootstrap:
    """acc(A) - acc(B) as the mean over each level's training seeds, on the eval rows both
    levels share, with its two-level bootstrap interval and p-value."""

    difference: float
    low: float
    high: float
    p_value: float
    seeds_a: int
    seeds_b: int
    rows: int


def seed_bootstrap(a: Mapping[str, Mapping[str, bool]], b: Mapping[str, Mapping[str, bool]],
                   replicates: int = 4000, seed: int = 0) -> SeedBootstrap | None:
    """Two-level bootstrap of the difference between two levels trained with several seeds each.

    `a`, `b`: training seed -> row key (the same key for the same eval row in every seed and
    level) -> outcome. Each replicate draws the eval rows with replacement once (shared by A and
    B: the rows are paired) and each level's seeds with replacement (independently: seeds are
    separate training runs); its statistic is the mean over drawn seeds of the accuracy on the
    drawn rows. Interval: the 2.5/97.5% percentiles; p: twice the smaller tail mass at 0 (with
    the +1 correction, so never 0). Deterministic for a given `seed`. None unless both levels
    have >= 2 seeds and share rows."""
    import numpy as np

    if len(a) < 2 or len(b) < 2:
        return None
    common = set.intersection(*(set(o) for o in (*a.values(), *b.values())))
    if not common:
        return None
    keys = sorted(common)
    mat_a = np.array([[bool(a[s][k]) for k in keys] for s in sorted(a)], dtype=float)  # (seeds, rows)
    mat_b = np.array([[bool(b[s][k]) for k in keys] for s in sorted(b)], dtype=float)
    n = len(keys)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=replicates).astype(float)  # (replicates, rows)

    def seed_means(mat):
        acc = counts @ mat.T / n  # accuracy of each seed on each replicate's rows
        draw = rng.integers(0, mat.shape[0], size=(replicates, mat.shape[0]))
        return np.take_along_axis(acc, draw, axis=1).mean(axis=1)

    d = seed_means(mat_a) - seed_means(mat_b)
    low, high = np.quantile(d, [0.025, 0.975])
    tail = min(int((d <= 0).sum()), int((d >= 0).sum()))
    p = min(1.0, 2 * (tail + 1) / (replicates + 1))
    return SeedBootstrap(float(mat_a.mean() - mat_b.mean()), float(low), float(high), p,
                         mat_a.shape[0], mat_b.shape[0], n)
