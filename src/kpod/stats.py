"""The statistics of accuracy comparisons: a proportion's interval, McNemar's exact test for two
methods scored on the same questions, and how many seed pairs a comparison needs (its power).

Pure functions of counts, no model or data: :mod:`kpod.evaluate` reports the interval of every
accuracy, the run report (:func:`kpod.report.paired_comparisons`) and ``benchmarks/report.py`` compare
methods with the rest.
"""

from __future__ import annotations

import math


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (better than the normal one near 0 and 1)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for paired outcomes on the same questions.

    ``b``: questions method A got right and B wrong; ``c``: the reverse. Under the null hypothesis
    the b + c discordant questions split as Binomial(b + c, 1/2); the p-value doubles the smaller
    tail (capped at 1). Concordant questions carry no information about the difference.
    """
    from math import comb

    n = b + c
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def mcnemar_detectable_gap(discordant_share: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest accuracy difference (as a fraction) that McNemar's test detects with the given
    power on ``n`` paired questions, when ``discordant_share`` of them are solved by only one of
    the two methods.

    Normal approximation (after Connor, 1987): of n paired questions a share r is discordant
    (b + c of them, b solved only by A, c only by B); for a true difference d in accuracy, b - c
    has mean n d and standard deviation about sqrt(n r), so a two-sided test at ``alpha``
    rejects with probability ``power`` once d >= (z_{1-alpha/2} + z_power) sqrt(r / n). Our choice:
    the variance under the alternative is taken as r (not r - d^2), which overstates the needed gap
    slightly, and the exact test's discreteness is ignored; a simulation test checks the result.
    Pooling k seed pairs of n questions each is n -> k n.
    """
    if n <= 0 or not 0 < discordant_share <= 1:
        raise ValueError(f"need n > 0 and a discordant share in (0, 1], got n={n}, share={discordant_share}")
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    return z * math.sqrt(discordant_share / n)


def mcnemar_pairs_needed(
    gap: float, discordant_share: float, n: int, alpha: float = 0.05, power: float = 0.8
) -> int:
    """How many replications of ``n`` paired questions (seed pairs) the pooled McNemar test needs to
    detect an accuracy difference ``gap`` (a fraction) with ``power``: the inverse of
    :func:`mcnemar_detectable_gap` in the number of pairs, rounded up."""
    if gap <= 0:
        raise ValueError(f"gap must be positive, got {gap}")
    at_one = mcnemar_detectable_gap(discordant_share, n, alpha, power)
    return max(1, math.ceil((at_one / gap) ** 2 - 1e-9))


def paired_gap_interval(
    pairs: list[tuple[dict[str, bool], dict[str, bool]]],
    *,
    level: float = 0.95,
    resamples: int = 4000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean accuracy gap of method A over method B and its interval, over seed pairs and questions.

    ``pairs``: one (A's, B's) per-question correctness per seed pair, on the same test questions
    (questions missing from either side are left out). The gap is the mean over seed pairs of
    accuracy(A) - accuracy(B), as a fraction.

    The interval is a percentile bootstrap that resamples both sources of noise at once: the seed
    pairs (with replacement) and the test questions (with replacement, one draw per replicate
    shared by every seed pair, because all seeds answer the same questions). Our choice: this
    two-way resampling of a crossed design is slightly conservative (it counts the question-by-
    seed interaction twice), which we prefer to an interval that is too narrow. With a single seed
    pair only the questions are resampled, and the interval says nothing about seed-to-seed spread.
    """
    import numpy as np

    if not pairs:
        raise ValueError("need at least one seed pair")
    common = sorted(set.intersection(*(set(a) & set(b) for a, b in pairs)))
    if not common:
        raise ValueError("the seed pairs share no question")
    diff = np.array([[int(a[q]) - int(b[q]) for q in common] for a, b in pairs], dtype=np.int8)
    gap = float(diff.mean())
    rng = np.random.default_rng(seed)
    k, n = diff.shape
    questions = rng.integers(n, size=(resamples, n))
    # Each pair's mean difference over each replicate's questions: (k, resamples).
    per_pair = np.stack([row[questions].mean(axis=1) for row in diff])
    chosen = rng.integers(k, size=(resamples, k)) if k > 1 else np.zeros((resamples, 1), dtype=int)
    replicates = np.take_along_axis(per_pair.T, chosen, axis=1).mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(replicates, [tail, 1 - tail])
    return gap, float(low), float(high)


def discordant(a: dict[str, bool], b: dict[str, bool]) -> tuple[int, int, int]:
    """Of the questions both methods answered (``qid -> correct``): how many only A solved, how
    many only B, and how many they share (the counts McNemar's test reads)."""
    common = set(a) & set(b)
    only_a = sum(a[q] and not b[q] for q in common)
    only_b = sum(b[q] and not a[q] for q in common)
    return only_a, only_b, len(common)


def paired_comparison(a: dict[str, bool], b: dict[str, bool], alpha: float = 0.05) -> dict[str, float | int]:
    """Method A against method B on the test questions both answered (``qid -> correct``): how many
    only A solved (``a_only``) and only B (``b_only``), the accuracy gap A - B with its 95 % interval
    over questions (:func:`paired_gap_interval`, one seed pair), the exact McNemar p-value, and the
    gap this many questions at this discordance detect with 80 % power (``detectable``; ``None``
    when no question is discordant). Fractions, not points."""
    a_only, b_only, n = discordant(a, b)
    if not n:
        raise ValueError("the two methods share no test question")
    gap, low, high = paired_gap_interval([(a, b)])
    share = (a_only + b_only) / n
    return {
        "n": n,
        "a_only": a_only,
        "b_only": b_only,
        "gap": gap,
        "ci95": (low, high),
        "p": mcnemar_exact(a_only, b_only),
        "detectable": mcnemar_detectable_gap(share, n, alpha) if share else None,
    }
