"""Paired statistics for two runs on the same prompts, and the Pareto front of trade-offs.

Two models answering the same prompts give paired labels, so their difference is judged on the
pairs: a percentile bootstrap over prompts for the change in rate (seeded, reproducible) and the
exact McNemar test, a two-sided binomial test on the discordant pairs only (prompts where exactly
one of the two models complied).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import binomtest, bootstrap

DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 0


@dataclass(frozen=True)
class PairedComparison:
    """Run B against run A on ``n`` paired prompts; ``delta`` = rate(B) - rate(A)."""

    n: int
    rate_a: float
    rate_b: float
    delta: float
    ci_low: float
    ci_high: float
    confidence: float
    only_a: int | None  # discordant pairs: 1 in A, 0 in B (None for non-binary labels)
    only_b: int | None  # discordant pairs: 0 in A, 1 in B
    p_value: float | None  # exact McNemar (None for non-binary labels)
    resamples: int
    seed: int

    def as_dict(self) -> dict:
        return asdict(self)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts (1.0 when there are none)."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts must be >= 0 (got {only_a}, {only_b})")
    total = only_a + only_b
    if total == 0:
        return 1.0
    return float(min(1.0, binomtest(only_a, total, 0.5, alternative="two-sided").pvalue))


def paired_comparison(
    a: Sequence[float],
    b: Sequence[float],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = 0.95,
) -> PairedComparison:
    """Change in mean label from A to B with a bootstrap interval, and McNemar for 0/1 labels.

    ``a[i]`` and ``b[i]`` must be the two runs' labels for the same prompt.
    """
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired labels must be two equal-length lists (got {x.shape}, {y.shape})")
    if x.size == 0:
        raise ValueError("no paired prompts to compare")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("paired labels must be finite numbers")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    diff = y - x
    delta = float(diff.mean())
    if x.size == 1 or np.all(diff == diff[0]):
        low = high = delta  # every resample has the same mean
    else:
        result = bootstrap(
            (diff,),
            np.mean,
            n_resamples=resamples,
            confidence_level=confidence,
            method="percentile",
            vectorized=True,
            batch=1000,  # bounds memory at 1000 x n resampled values
            rng=np.random.default_rng(seed),
        )
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    binary = bool(np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all())
    only_a = int(((x == 1) & (y == 0)).sum()) if binary else None
    only_b = int(((x == 0) & (y == 1)).sum()) if binary else None
    return PairedComparison(
        n=int(x.size),
        rate_a=float(x.mean()),
        rate_b=float(y.mean()),
        delta=delta,
        ci_low=low,
        ci_high=high,
        confidence=confidence,
        only_a=only_a,
        only_b=only_b,
        p_value=mcnemar_exact(only_a, only_b) if binary else None,
        resamples=resamples,
        seed=seed,
    )


def pareto_front(points: Sequence[tuple[float, float]], maximize: tuple[bool, bool]) -> list[bool]:
    """Which points no other point dominates (as good on both axes and better on one).

    ``maximize[k]`` says whether larger is better on axis k. NaN points are never on the front.
    """
    signs = np.array([1.0 if m else -1.0 for m in maximize])
    p = np.asarray(points, dtype=float).reshape(-1, 2) * signs  # now larger is better on both
    ok = np.isfinite(p).all(axis=1)
    front = []
    for i in range(len(p)):
        if not ok[i]:
            front.append(False)
            continue
        others = p[ok]
        dominated = np.any(np.all(others >= p[i], axis=1) & np.any(others > p[i], axis=1))
        front.append(not bool(dominated))
    return front
