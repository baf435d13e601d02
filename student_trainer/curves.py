"""Reading runs' evaluation curves: time-to-quality, the cost of reaching a given zero-shot top-1.

A run with `eval_every_steps` leaves `<storage_path>/<run_name>/eval_curve.json` (`step_eval`):
`{"points": [...]}`, one point per evaluation, oldest first, each with the run's clocks at that
step (`CURVE_CLOCKS`: optimizer steps, samples seen by all ranks, training wall time without the
evaluations, the teacher-seconds spent so far, see docs/design.md) and the figures
(zero_shot_top1, ...). The same list is in the run's final metrics (`eval_curve`).

`first_reaching` reads one curve against a threshold (usually the no-teacher student's final
zero-shot top-1): the first point at or above it, or None ("never"); `time_to_quality` reads
one run per seed and gives each clock's mean with its 95 % Student-t interval over the seeds
that got there, and how many did. Pure functions of plain lists: `kd report` and the benchmarks
use them.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from student_trainer.intervals import interval

CURVE_FILE = "eval_curve.json"
CURVE_CLOCKS = ("step", "epoch", "samples_seen", "train_wall_s", "teacher_s")
REACH_CLOCKS = ("step", "samples_seen", "train_wall_s", "teacher_s")  # what time-to-quality reports
DEFAULT_METRIC = "zero_shot_top1"


def curve_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CURVE_FILE


def read_curve(run_dir: str | Path) -> list[dict]:
    """A run's evaluation points, oldest first; [] for a run without a curve."""
    path = curve_path(run_dir)
    if not path.is_file():
        return []
    return list(json.loads(path.read_text()).get("points", []))


def _value(point: dict, metric: str) -> float:
    value = point.get(metric)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def first_reaching(points: list[dict], threshold: float, metric: str = DEFAULT_METRIC) -> dict | None:
    """The first point whose `metric` is at least `threshold` (equal counts), or None when no point
    gets there ("never"). Points are read in step order; a missing or NaN value never reaches."""
    if not math.isfinite(threshold):
        raise ValueError(f"time-to-quality threshold must be a finite number, got {threshold!r}")
    for point in sorted(points, key=lambda p: p["step"]):
        if _value(point, metric) >= threshold:
            return point
    return None


def final_value(points: list[dict], metric: str = DEFAULT_METRIC) -> float | None:
    """The curve's last value of `metric` (the run's final figure), None without one."""
    values = [_value(p, metric) for p in sorted(points, key=lambda p: p["step"])]
    values = [v for v in values if math.isfinite(v)]
    return values[-1] if values else None


def time_to_quality(curves: list[list[dict]], threshold: float, metric: str = DEFAULT_METRIC) -> dict:
    """Over runs (one curve per seed): per seed, the clocks of `first_reaching` (None: never), and
    for each clock of `REACH_CLOCKS` the mean and its 95 % Student-t interval over the seeds that
    reached `threshold` (`<clock>`, `<clock>_lo`, `<clock>_hi`; None when no seed did). The seeds
    that never got there are not in the mean: `reached` of `runs` says how many did."""
    reached = [first_reaching(points, threshold, metric) for points in curves]
    out: dict = {"threshold": threshold, "metric": metric, "runs": len(curves),
                 "reached": sum(p is not None for p in reached),
                 "per_run": [None if p is None else {k: p.get(k) for k in REACH_CLOCKS} for p in reached]}
    for clock in REACH_CLOCKS:
        values = [float(p[clock]) for p in reached if p is not None and isinstance(p.get(clock), (int, float))]
        mean, lo, hi = interval(values) if values else (None, None, None)
        out[clock], out[f"{clock}_lo"], out[f"{clock}_hi"] = mean, lo, hi
    return out
