"""How well the model's own step confidence finds its false memory steps, and what abstaining buys.

Pure functions from scores and labels (no model, no I/O):

* ``auroc``: the probability that a randomly drawn false step is scored as less confident than a randomly
  drawn true one (Mann-Whitney U / (n_false * n_true), ties counted one half); 0.5 is chance.
* ``auroc_ci``: that AUROC with a percentile bootstrap 95% CI that resamples **answers** (clusters), not
  steps: the steps of one answer share its question and its prefix, so resampling them independently would
  make the interval too narrow. Resamples in which one class is missing are skipped (and counted).
* ``coverage_curve``: accuracy against coverage when the least confident answers abstain: answers are
  ranked by their confidence (higher first; None — no memory step to be unsure of — abstains first, then
  file order), and at coverage c the top ``ceil(c * n)`` answer, with a Wilson 95% CI on their accuracy.

The stats helpers of ``memreason.stats`` give the Wilson interval; the bootstrap here is the clustered one
(``stats.bootstrap_ci`` resamples single values).
"""

from __future__ import annotations

import math
import random
from typing import Sequence

from memreason.stats import wilson_ci


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """AUROC of ``scores`` for the ``positive`` class (higher score = more likely positive); None when a class
    is empty."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    if not pos or not neg:
        return None
    # rank-based U statistic: O(n log n), ties get their average rank
    ordered = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and scores[ordered[j + 1]] == scores[ordered[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[ordered[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, p in zip(ranks, positive) if p)
    u = rank_sum - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


def auroc_ci(clusters: Sequence[Sequence[tuple[float, bool]]], *, n_resamples: int = 2000, seed: int = 0,
             confidence: float = 0.95) -> dict:
    """AUROC over every ``(score, positive)`` pair, with a cluster-bootstrap CI (clusters = answers).

    Returns:
        dict: ``auroc`` (None when a class is empty), ``ci95`` ([low, high], or [None, None]), ``n_positive``,
        ``n_negative``, ``n_clusters``, ``skipped_resamples``.
    """
    pairs = [p for cluster in clusters for p in cluster]
    point = auroc([s for s, _ in pairs], [y for _, y in pairs])
    out = {"auroc": point, "ci95": [None, None], "n_positive": sum(y for _, y in pairs),
           "n_negative": sum(not y for _, y in pairs), "n_clusters": len(clusters), "skipped_resamples": 0}
    if point is None or n_resamples < 1:
        return out
    rng = random.Random(seed)
    values, skipped = [], 0
    for _ in range(n_resamples):
        sample = [p for _ in clusters for p in clusters[rng.randrange(len(clusters))]]
        value = auroc([s for s, _ in sample], [y for _, y in sample])
        if value is None:
            skipped += 1
        else:
            values.append(value)
    if values:
        values.sort()
        tail = (1 - confidence) / 2
        pick = lambda q: values[min(len(values) - 1, max(0, int(round(q * (len(values) - 1)))))]  # noqa: E731
        out["ci95"] = [pick(tail), pick(1 - tail)]
    out["skipped_resamples"] = skipped
    return out


def coverage_curve(confidences: Sequence[float | None], correct: Sequence[bool],
                   levels: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)) -> list[dict]:
    """Accuracy of the answers kept at each coverage level (the rule in the module docstring).

    Returns:
        list[dict]: per level ``coverage``, ``answered``, ``correct``, ``accuracy`` and ``ci95``.
    """
    n = len(correct)
    order = sorted(range(n), key=lambda i: (confidences[i] is None, -(confidences[i] or 0.0), i))
    curve = []
    for level in levels:
        if not 0 < level <= 1:
            raise ValueError(f"coverage levels must be in (0, 1], got {level}")
        kept = order[:math.ceil(level * n - 1e-9)] if n else []
        right = sum(correct[i] for i in kept)
        low, high = wilson_ci(right, len(kept)) if kept else (None, None)
        curve.append({"coverage": level, "answered": len(kept), "correct": right,
                      "accuracy": right / len(kept) if kept else None, "ci95": [low, high]})
    return curve
