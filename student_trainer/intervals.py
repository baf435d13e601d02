"""The one 95 % interval of a mean over seeds, shared by `kd report`, the time-to-quality reading
(`student_trainer.curves`) and the benchmarks (benchmarks/methods.py)."""
from __future__ import annotations

import math
import statistics


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and its two-sided 95 % Student-t interval (a single value: that value, no width)."""
    from scipy.stats import t

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half
