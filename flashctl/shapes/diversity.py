"""Diversity of generated images on prompts that leave attributes open.

A prompt such as "a red circle" leaves the position open; its row stores the distribution the
position was drawn from (`Scene.open`: uniform over the grid cells). Sample K seeds of the
prompt, read each image's realisation of the open attributes with the verifier
(`verify_record(...)["realised"]`) and compare the spread with the data's:

* normalised entropy  H_n = -sum_x p(x) log p(x) / log m, where p is the empirical
  distribution of the realised values over the prompt's valid images and m the number of
  options (support size of the data distribution q); 1 = spread over every option evenly,
  0 = every image the same (mode collapse);
* total-variation distance  TV = 1/2 sum_x |p(x) - q(x)| over the union of supports;
  0 = the data's distribution, -> 1 - 1/m for a collapse onto one of m uniform options.

Only images the verifier accepts (`correct`) count: a blend or a wrong image has no
well-defined realisation. Both numbers are per (prompt, attribute) and then averaged over
prompts per attribute kind (`cell`, `colour`, `background`). With few images H_n is biased
low and TV high even for a perfect sampler, so each kind also reports the values expected
for K i.i.d. draws from q (`entropy_ref`, `tv_ref`) at the same numbers of valid images:
compare a model with those, not with 1 and 0.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from flashctl.shapes.scene import Scene
from flashctl.track import eval_metric

KINDS = ("cell", "colour", "background")
"""Attribute kinds reported (the suffix of the realised-value names: "obj0.cell" -> "cell")."""
_EXACT_LIMIT = 200_000
"""Most count vectors `reference` enumerates; beyond it a seeded Monte Carlo estimate is used."""


def _key(value: Any) -> Any:
    """Hashable form of a realised value (cells come back from JSON as lists)."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def open_distributions(record: Mapping[str, Any]) -> dict[str, dict[Any, float]]:
    """{attribute: {value: probability}} of a row's open attributes ("obj0.cell",
    "obj0.colour", "background"), from the `open` of its scene JSON; {} for a fully
    specified row."""
    scene = Scene.from_json(record["scene"])
    if scene.open is None:
        return {}
    return {
        name: {_key(v): 1.0 / len(options) for v in options}
        for name, options in scene.open.attributes().items()
    }


def normalised_entropy(counts: Mapping[Any, int], m: int) -> float:
    """H(p) / log(m) of the empirical distribution p of `counts` over m options (m >= 2)."""
    n = sum(counts.values())
    if n <= 0 or m < 2:
        raise ValueError("need at least one count and two options")
    h = -sum((c / n) * math.log(c / n) for c in counts.values() if c > 0)
    return max(0.0, h / math.log(m))


def total_variation(counts: Mapping[Any, int], dist: Mapping[Any, float]) -> float:
    """1/2 sum_x |p(x) - q(x)| between the empirical distribution p of `counts` and q = `dist`."""
    n = sum(counts.values())
    if n <= 0:
        raise ValueError("need at least one count")
    keys = set(counts) | set(dist)
    return 0.5 * sum(abs(counts.get(k, 0) / n - dist.get(k, 0.0)) for k in keys)


def _compositions(n: int, m: int) -> Iterable[tuple[int, ...]]:
    if m == 1:
        yield (n,)
        return
    for first in range(n + 1):
        for rest in _compositions(n - first, m - 1):
            yield (first, *rest)


@lru_cache(maxsize=1024)
def _reference(probs: tuple[float, ...], n: int) -> tuple[float, float]:
    m = len(probs)
    q = dict(enumerate(probs))
    if math.comb(n + m - 1, m - 1) <= _EXACT_LIMIT:
        e_h = e_tv = 0.0
        log_fact = [math.lgamma(k + 1) for k in range(n + 1)]
        for comp in _compositions(n, m):
            if any(c and p <= 0 for c, p in zip(comp, probs)):
                continue
            logp = log_fact[n] + sum(c * math.log(p) - log_fact[c] for c, p in zip(comp, probs) if c)
            w = math.exp(logp)
            counts = dict(enumerate(comp))
            e_h += w * normalised_entropy(counts, m)
            e_tv += w * total_variation(counts, q)
        return e_h, e_tv
    rng = np.random.default_rng(0)
    draws = rng.multinomial(n, probs, size=4000)
    hs = [normalised_entropy(dict(enumerate(d)), m) for d in draws]
    tvs = [total_variation(dict(enumerate(d)), q) for d in draws]
    return float(np.mean(hs)), float(np.mean(tvs))


def reference(dist: Mapping[Any, float], n: int) -> tuple[float, float]:
    """(E[H_n], E[TV]) of the empirical distribution of n i.i.d. draws from `dist`: what a
    sampler that matches the data exactly scores with n valid images (exact multinomial sum;
    Monte Carlo with a fixed seed when that would take more than 200k terms)."""
    probs = tuple(sorted(float(p) for p in dist.values()))
    return _reference(probs, int(n))


def diversity(
    records: Sequence[Mapping[str, Any]],
    results: Mapping[str, Sequence[Mapping[str, Any]]],
    min_valid: int = 2,
) -> dict[str, Any]:
    """Coverage of the open attributes by a model, per attribute kind.

    `records`: eval rows (rows without open attributes are ignored); `results`: row id ->
    the `verify_record` outputs of that row's K images (K seeds). For every (row, open
    attribute) with at least `min_valid` accepted images it computes H_n and TV (module
    docstring) and their expectations under the data (`reference`), then averages per kind:

    {kind: {"prompts": pairs counted, "entropy": mean H_n, "tv": mean TV,
            "entropy_ref": mean E[H_n], "tv_ref": mean E[TV]}, ...,
     "images": images seen on open rows, "valid": share of them accepted,
     "skipped": (row, attribute) pairs with fewer than `min_valid` accepted images}.
    Kinds with no counted pair are left out."""
    per_kind: dict[str, list[tuple[float, float, float, float]]] = {k: [] for k in KINDS}
    images = valid = skipped = 0
    for record in records:
        dists = open_distributions(record)
        if not dists:
            continue
        outs = results.get(record["id"], [])
        ok = [o for o in outs if o.get("correct")]
        images += len(outs)
        valid += len(ok)
        for name, dist in dists.items():
            values = [_key(o.get("realised", {})[name]) for o in ok if name in o.get("realised", {})]
            if len(dist) < 2:
                continue
            if len(values) < min_valid:
                skipped += 1
                continue
            counts = Counter(values)
            h_ref, tv_ref = reference(dist, len(values))
            kind = name.rsplit(".", 1)[-1]
            per_kind.setdefault(kind, []).append(
                (normalised_entropy(counts, len(dist)), total_variation(counts, dist), h_ref, tv_ref)
            )
    out: dict[str, Any] = {}
    for kind, vals in per_kind.items():
        if vals:
            a = np.array(vals)
            out[kind] = {
                "prompts": len(vals),
                "entropy": float(a[:, 0].mean()),
                "tv": float(a[:, 1].mean()),
                "entropy_ref": float(a[:, 2].mean()),
                "tv_ref": float(a[:, 3].mean()),
            }
    out.update(images=images, valid=valid / images if images else float("nan"), skipped=skipped)
    return out


def flat_metrics(name: str, summary: Mapping[str, Any]) -> dict[str, float]:
    """MLflow-style metric names of a `diversity` summary for model `name`:
    eval/<name>/diversity/<kind>/{entropy,tv,entropy_ref,tv_ref,prompts} and
    eval/<name>/diversity/valid."""
    m: dict[str, float] = {}
    for kind in KINDS:
        for key, value in summary.get(kind, {}).items():
            m[eval_metric(name, "diversity", kind, key)] = float(value)
    if "valid" in summary:
        m[eval_metric(name, "diversity", "valid")] = float(summary["valid"])
    return m
