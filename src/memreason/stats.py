"""Small, pure statistics helpers shared by the evaluations: confidence intervals and paired tests.

* ``wilson_ci``: Wilson score interval of a binomial proportion (accuracy with n and a 95% CI).
* ``mcnemar_exact``: exact (binomial) two-sided McNemar test on the discordant pairs of two paired
  classifiers (per-question flips between a baseline and a method).
* ``sign_test_p``: the same exact test read from a list of paired differences (ties dropped).
* ``bootstrap_ci``: percentile bootstrap CI of a mean; ``paired_bootstrap_ci``: of the mean paired
  difference (resampling questions); ``bootstrap_column_means``: the same for every column of a table with
  a validity mask, vectorised. These are memreason's only bootstraps.

No state, no I/O; every random choice takes a seed.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Sequence


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_ci(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``successes / n``.

    Unlike the normal ("Wald") interval it stays inside [0, 1] and does not collapse to a point at 0 or n
    successes, which matters for the small per-category counts we report.

    Args:
        successes (int): number of successes, ``0 <= successes <= n``.
        n (int): number of trials, ``n >= 1``.
        confidence (float, default 0.95): coverage of the interval.

    Returns:
        tuple[float, float]: (lower, upper).

    Raises:
        ValueError: ``n < 1`` or ``successes`` outside ``[0, n]``.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    z = _z(confidence)
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denominator
    # At 0 or n successes the bound is exactly 0 or 1 in exact arithmetic; avoid a 1e-17 rounding residue.
    lower = 0.0 if successes == 0 else max(0.0, centre - half)
    upper = 1.0 if successes == n else min(1.0, centre + half)
    return lower, upper


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the two discordant counts.

    Under the null hypothesis that both classifiers are equally accurate, each of the ``b + c`` discordant
    pairs is equally likely to go either way, so ``min(b, c) ~ Binomial(b + c, 1/2)``; the p-value is twice
    the lower tail, capped at 1. Computed with exact integers, so it is right for any count.

    Args:
        b (int): pairs where only the first classifier is right (e.g. baseline right, method wrong).
        c (int): pairs where only the second is right.

    Returns:
        float: the p-value (1.0 when there are no discordant pairs).

    Raises:
        ValueError: a negative count.
    """
    if b < 0 or c < 0:
        raise ValueError(f"counts must be non-negative, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def sign_test_p(differences: Sequence[float]) -> float:
    """Two-sided exact sign test of a zero median difference; ties are dropped (1.0 when all are ties)."""
    return mcnemar_exact(sum(1 for d in differences if d < 0), sum(1 for d in differences if d > 0))


def bootstrap_ci(values: Sequence[float], *, confidence: float = 0.95, n_resamples: int = 10_000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of ``mean(values)``, resampling the values with replacement.

    Args:
        values (Sequence[float]): observations, length >= 1 (paired differences give a paired CI).
        confidence (float, default 0.95): coverage of the interval.
        n_resamples (int, default 10000): bootstrap resamples.
        seed (int, default 0): seed of the resampling.

    Returns:
        tuple[float, float]: (lower, upper).

    Raises:
        ValueError: empty input, ``n_resamples < 1``, confidence outside (0, 1).
    """
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("cannot bootstrap an empty sample")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    _z(confidence)
    rng = np.random.default_rng(seed)
    # Resample in chunks so memory stays ~16 MB of indices even for all 14,042 MMLU questions; the
    # generator's stream does not depend on the chunking, so the interval does not either.
    chunk = max(1, 2_000_000 // len(values))
    means = np.concatenate([
        values[rng.integers(0, len(values), size=(min(chunk, n_resamples - start), len(values)))].mean(axis=1)
        for start in range(0, n_resamples, chunk)])
    tail = (1.0 - confidence) / 2.0
    lower, upper = np.quantile(means, [tail, 1.0 - tail])
    return float(lower), float(upper)


def paired_bootstrap_ci(first: Sequence[float], second: Sequence[float], *, confidence: float = 0.95,
                        n_resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Percentile bootstrap CI of ``mean(second - first)`` over paired observations.

    Questions are resampled with replacement and both conditions keep their pairing, so the interval
    reflects the paired design (per-question correctness 0/1, generated lengths, ...).

    Returns:
        tuple[float, float, float]: (observed mean difference, lower, upper).

    Raises:
        ValueError: different lengths, empty input, ``n_resamples < 1``.
    """
    import numpy as np

    if len(first) != len(second):
        raise ValueError(f"paired samples differ in length: {len(first)} vs {len(second)}")
    if len(first) == 0:
        raise ValueError("paired samples are empty")
    diff = np.asarray(second, dtype=np.float64) - np.asarray(first, dtype=np.float64)
    lower, upper = bootstrap_ci(diff, confidence=confidence, n_resamples=n_resamples, seed=seed)
    return float(diff.mean()), lower, upper


def bootstrap_column_means(values, valid, *, confidence: float = 0.95, n_resamples: int = 1000, seed: int = 0):
    """Mean over examples of each column, with a percentile bootstrap CI (examples resampled), for tables
    of thousands of columns at once (attention per layer x head x span kind).

    One set of resamples serves every column: each resample is a multinomial count per example, so the
    resampled masked means are two matrix products, not a loop over columns.

    Args:
        values: ``[example, column]`` numbers.
        valid: ``[example, column]`` bool; only valid entries count.
        confidence (float, default 0.95); n_resamples (int, default 1000); seed (int, default 0).

    Returns:
        (mean, low, high, n): arrays ``[column]``; NaN where a column has no valid entry.
    """
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    n_examples, n_columns = values.shape
    n = valid.sum(0)
    x = np.where(valid, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = x.sum(0) / n
    low, high = np.full(n_columns, np.nan), np.full(n_columns, np.nan)
    if n_examples == 0:
        return mean, low, high, n
    rng = np.random.default_rng(seed)
    # How often each example is drawn in each resample: resampled means become two matrix products.
    # [resample, example]
    weights = rng.multinomial(n_examples, np.full(n_examples, 1.0 / n_examples), size=n_resamples)
    tail = (1.0 - confidence) / 2.0
    chunk = max(1, 4_000_000 // n_resamples)
    for start in range(0, n_columns, chunk):
        cols = slice(start, start + chunk)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = (weights @ x[:, cols]) / (weights @ valid[:, cols].astype(np.float64))  # [resample, column]
        ok = n[cols] > 0
        if ok.any():
            block = means[:, ok]
            # a resample that drew no valid entry for a column has no mean there: ignore it
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                low[cols][ok] = np.nanquantile(block, tail, axis=0)
                high[cols][ok] = np.nanquantile(block, 1.0 - tail, axis=0)
    return mean, low, high, n
