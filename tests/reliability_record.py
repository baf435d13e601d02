"""Figures that docs/reliability.md quotes, written by the tests that measure them.

With `KD_RELIABILITY_OUT=<dir>` set (`make reliability` sets benchmarks/results/reliability), a
test calling `record(name, figures)` writes `<dir>/<name>.json`; without it nothing is written, so
an ordinary test run leaves the committed results alone. The doc quotes those files only.
"""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

OUT_ENV = "KD_RELIABILITY_OUT"


def record(name: str, figures: dict) -> Path | None:
    """Write `figures` (JSON-able) with the test that measured them and when; returns the path."""
    out = os.environ.get(OUT_ENV)
    if not out:
        return None
    path = Path(out) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
               "recorded_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "cpus": os.cpu_count(), "figures": figures}
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
