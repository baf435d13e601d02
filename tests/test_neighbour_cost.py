"""benchmarks/neighbour_cost.py's summary: each condition's ratio is taken per repeat against the
same repeat's idle run (drift between repeats cancels), never a best run."""
from __future__ import annotations

import pytest

from benchmarks import neighbour_cost


def test_ratios_are_per_repeat_against_that_repeats_idle_run():
    results = {"idle": {"cpu_ms": [100.0, 200.0], "wall_ms": [100.0, 200.0]},
               "teacher": {"cpu_ms": [110.0, 200.0], "wall_ms": [120.0, 260.0]},
               "spin": {"cpu_ms": [100.0, 180.0], "wall_ms": [100.0, 180.0]}}
    out = neighbour_cost.summarise(results)
    assert out["idle"]["cpu_ms"]["ratio_to_idle_median"] == 1.0
    teacher = out["teacher"]["cpu_ms"]
    assert (teacher["ratio_min"], teacher["ratio_max"]) == pytest.approx((1.0, 1.1))  # 110/100, 200/200
    assert teacher["ratio_to_idle_median"] == pytest.approx(1.05) and teacher["median"] == 155.0
    assert out["teacher"]["wall_ms"]["ratio_to_idle_median"] == pytest.approx(1.25)  # (1.2 + 1.3) / 2
    assert out["spin"]["cpu_ms"]["ratio_min"] == pytest.approx(0.9)
