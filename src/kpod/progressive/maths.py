"""The mathematics of in-rationale progressive distillation (paper sections 3.4-3.5), as pure
functions: step difficulty (Eq. 8), pacing (Eq. 10), the value function (Eq. 12) and the
knapsack-constrained selection of each stage (Eq. 13)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import numpy as np


def step_difficulty(logprobs: Sequence[float], weights: Sequence[float] | None = None) -> float:
    """Eq. (8): d_k = - sum_j softmax(w)_j * log P(r_j | r_<j, x) over the tokens of one step.

    ``weights=None`` is the "w/o sig-dif" ablation: uniform weights, i.e. the mean NLL. Because the
    softmax sums to 1 within the step, d_k is a weighted mean NLL and does not grow with length.
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    if lp.size == 0:
        return 0.0
    if weights is None:
        return float(-lp.mean())
    w = np.asarray(weights, dtype=np.float64)
    soft = np.exp(w - w.max())
    soft /= soft.sum()
    return float(-(soft * lp).sum())


def difficulty_budget(t: float, total: float, initial: float, stages: int, p: float = 0.5) -> float:
    """Eq. (10): D(t) = C0 + (B - C0) (t / T)^(p + 1), clipped to [C0, B] outside [0, T].

    Integrating dD/dt = u t^p with D(0) = C0 and D(T) = B gives u = (B - C0)(p + 1) / T^(p+1).
    """
    if stages <= 0:
        raise ValueError("the number of stages T must be positive")
    frac = min(max(t / stages, 0.0), 1.0)
    return initial + (total - initial) * frac ** (p + 1)


def value_function(
    budget_increase: float, difficulty_increase: float, cluster_counts: Sequence[int], beta: float
) -> float:
    """Eq. (12): F(S) = -(Delta D - Delta H(S)) + beta * sum_k sqrt(|C_k intersect S|)."""
    return -(budget_increase - difficulty_increase) + beta * sum(math.sqrt(n) for n in cluster_counts)


def select_stage(
    gains: Sequence[float], clusters: Sequence[int], budget: float, beta: float, n_clusters: int | None = None
) -> list[int]:
    """Eq. (13): choose S maximising F(S) subject to Delta H(S) = sum_{i in S} g_i <= budget.

    ``gains[i]`` (>= 0) is the difficulty question ``i`` would add (its knapsack cost),
    ``clusters[i]`` its cluster; pass only eligible questions. Returns indices into ``gains``.

    F(S) - F(empty) = sum_{i in S} g_i + beta * sum_k sqrt(n_k(S)) is monotone submodular (a modular
    term plus a concave function of cluster counts), so the problem is submodular maximisation
    under a knapsack constraint. We use **Greedy+Max** (Yaroslavtsev, Zhou & Avdiukhin, "Bring
    Your Own Greedy"+Max, AISTATS 2020), which is a 1/2-approximation (the issue asks for
    1/2 - epsilon; this is epsilon = 0): run the density greedy, and for every greedy prefix G_i
    also consider G_i plus the single best element that still fits; return the best of these sets.

    The value function's structure makes both steps cheap. A question's density is
    ``1 + beta * (sqrt(n_k + 1) - sqrt(n_k)) / g_i``: within a cluster the cheapest unselected
    question is always the densest, so the greedy only compares the next-cheapest question of each
    cluster (O(K) per pick), and the unselected questions of a cluster are always a suffix of its
    sorted list, so the best augmenting element is found by bisection. Total O(n log n + n K).
    Questions with ``g_i = 0`` are free: they are always taken (F is monotone).
    """
    if budget < 0:
        return []
    k_count = n_clusters if n_clusters is not None else (max(clusters) + 1 if len(clusters) else 0)
    members: list[list[int]] = [[] for _ in range(k_count)]
    for i, k in enumerate(clusters):
        members[k].append(i)
    for m in members:
        m.sort(key=lambda i: (gains[i], i))
    sorted_gains = [[gains[i] for i in m] for m in members]
    largest = max((len(m) for m in members), default=0)
    step_gain = [beta * (math.sqrt(n + 1) - math.sqrt(n)) for n in range(largest + 1)]  # diversity gain
    taken = [0] * k_count  # the first taken[k] of members[k] are selected
    order: list[int] = []
    used = 0.0
    value = 0.0
    best_value, best_prefix, best_extra = 0.0, 0, -1
    eps = 1e-12
    while True:
        remaining = budget - used
        # Max step: the best single element that still fits, added to the current prefix. Within a
        # cluster the largest fitting gain is best. Skipped when even an upper bound cannot win.
        if value + remaining + beta > best_value:
            for k in range(k_count):
                pos = bisect.bisect_right(sorted_gains[k], remaining + eps) - 1
                if pos >= taken[k]:
                    candidate = value + sorted_gains[k][pos] + step_gain[taken[k]]
                    if candidate > best_value:
                        best_value, best_prefix, best_extra = candidate, len(order), members[k][pos]
        # Greedy step: the densest next element over clusters that still fits.
        pick, pick_density = -1, -1.0
        for k in range(k_count):
            t = taken[k]
            if t < len(members[k]):
                g = sorted_gains[k][t]
                if g <= remaining + eps:
                    density = math.inf if g <= 0 else (g + step_gain[t]) / g
                    if density > pick_density:
                        pick, pick_density = k, density
        if pick < 0:
            break
        t = taken[pick]
        g = sorted_gains[pick][t]
        value += g + step_gain[t]
        used += g
        order.append(members[pick][t])
        taken[pick] = t + 1
        if value > best_value:
            best_value, best_prefix, best_extra = value, len(order), -1
    chosen = order[:best_prefix]
    if best_extra >= 0 and best_extra not in chosen:
        chosen.append(best_extra)
    return sorted(chosen)


def selection_value(
    selected: Sequence[int], gains: Sequence[float], clusters: Sequence[int], beta: float
) -> float:
    """F(S) - F(empty) = sum_{i in S} g_i + beta * sum_k sqrt(n_k(S)): what :func:`select_stage` maximises."""
    counts: dict[int, int] = {}
    for i in selected:
        counts[clusters[i]] = counts.get(clusters[i], 0) + 1
    return sum(gains[i] for i in selected) + beta * sum(math.sqrt(n) for n in counts.values())
