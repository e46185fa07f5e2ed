"""Uncertainty of a comparison: paired bootstrap over held-out examples.

Values are per example (an exact match 0/1, an example's bits per byte, a benchmark question's
accuracy), possibly from several seeds. A difference between two models is *paired*: both scored
the same examples, so the per-example differences are resampled, not the two means apart. Seeds
are pooled per example (the mean over an example's seeds), and the bootstrap resamples examples,
so an example's seeds move together: the interval covers the variation over the held-out set and
seeds alike without treating a seed's repeat of an example as a new example.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

RESAMPLES = 10_000
SEED = 0
LEVEL = 0.95
_BLOCK = 1_000  # resamples drawn at once: bounds memory at [_BLOCK, n] indices


def pooled(values: Sequence[Mapping]) -> dict:
    """``{key: mean over the runs that scored key}`` from one ``{key: value}`` mapping per run (seed)."""
    sums: dict = {}
    for run in values:
        for key, value in run.items():
            if value is None:
                continue
            total, count = sums.get(key, (0.0, 0))
            sums[key] = (total + float(value), count + 1)
    return {key: total / count for key, (total, count) in sums.items()}


def bootstrap_mean_ci(values, *, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (1-D), ``resamples`` draws of
    ``len(values)`` with replacement from a generator seeded with ``seed``."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("bootstrap needs a non-empty 1-D array of values")
    if resamples < 1:
        raise ValueError("resamples must be positive")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, _BLOCK):
        stop = min(resamples, start + _BLOCK)
        idx = rng.integers(0, x.size, size=(stop - start, x.size))  # [block, n]
        means[start:stop] = x[idx].mean(axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return float(lo), float(hi)


def paired_delta(variant: Mapping, reference: Mapping, *, resamples: int = RESAMPLES, seed: int = SEED,
                 level: float = LEVEL) -> dict | None:
    """Mean difference ``variant - reference`` over the examples both scored, with its bootstrap
    interval; ``variant``/``reference`` map an example key to its (seed-pooled) value. None when
    they share no example. ``significant``: the interval excludes 0."""
    keys = [k for k in reference if k in variant]
    if not keys:
        return None
    d = np.fromiter((variant[k] - reference[k] for k in keys), dtype=np.float64, count=len(keys))
    lo, hi = bootstrap_mean_ci(d, resamples=resamples, seed=seed, level=level)
    return {"mean": float(d.mean()), "ci95": [lo, hi], "n_examples": len(keys), "significant": bool(lo > 0 or hi < 0)}
