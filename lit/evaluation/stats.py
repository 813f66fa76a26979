"""95% intervals of the evaluations' figures: Student's t for a mean of measurements (MQAR accuracy
per sequence, a figure per seed) and Wilson's score interval for a proportion of questions (NIAH)."""

from __future__ import annotations

import math
import statistics

T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000}  # two-sided 95% Student's t by degrees of freedom (rounded down)
Z_95 = 1.959964


def mean_interval(values: list[float], clip: bool = True) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its two-sided 95% Student's t interval (clipped to [0, 1] unless
    ``clip`` is False, e.g. for losses)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    dof = len(values) - 1
    t = T_95[max(k for k in T_95 if k <= dof)]
    half = t * statistics.stdev(values) / math.sqrt(len(values))
    return (mean, max(0.0, mean - half), min(1.0, mean + half)) if clip else (mean, mean - half, mean + half)


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float, float]:
    """(proportion, low, high): ``successes`` of ``n`` and Wilson's score interval (95% by default),
    which stays inside [0, 1] and is not empty at 0 or n successes."""
    if n <= 0:
        return float("nan"), float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return p, max(0.0, round(centre - half, 12)), min(1.0, round(centre + half, 12))  # no 1e-17 for 0
