"""Benchmark records: one measured (or derived, or modelled) quantity with its spread and context.

Every figure the suite writes is a `Record`: its values over the repeats, summarised as median,
min, max and quartiles (never a best run), the unit, the parameters it was measured at, and the
machine, command and architectures of the run, so a figure copied out of context still says
where it came from.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS = ("measured", "derived", "model")


@dataclass
class Record:
    """One figure. `kind`: measured (timed here), derived (computed from measured records or exact
    sizes) or model (an estimate from published numbers and assumptions: not a measurement)."""

    section: str
    name: str
    unit: str
    values: list[float]
    params: dict = field(default_factory=dict)
    kind: str = "measured"
    target: str | None = None  # e.g. ">= 0.95" where the issue sets one
    note: str = ""
    context: dict = field(default_factory=dict)  # machine, command, architectures, timestamp

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"record {self.name!r}: kind {self.kind!r} not in {KINDS}")
        self.values = [float(v) for v in self.values]
        if not self.values:
            raise ValueError(f"record {self.name!r} has no values")

    def summary(self) -> dict[str, float]:
        """Median, min, max and the quartiles (equal to the median for one value)."""
        vals = sorted(self.values)
        q1, q3 = (statistics.quantiles(vals, n=4, method="inclusive")[0::2] if len(vals) > 1
                  else (vals[0], vals[0]))
        return {"median": statistics.median(vals), "min": vals[0], "max": vals[-1], "q1": q1, "q3": q3}

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(self.summary(), repeats=len(self.values))
        return d


def machine_info(torch_threads: dict[str, int] | None = None) -> dict[str, Any]:
    """CPU model, cores, GPU, versions and load average: what a reader needs to judge a figure.

    The load average is taken at the start and end of a run (`load_average`): a figure measured
    while the machine was busy with other work says so.
    """
    import ray
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    info = {"cpu_model": _cpu_model(), "logical_cpus": os.cpu_count(),
            "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "memory_gb": _memory_gb(), "gpus": gpus, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "torch_threads": torch_threads or {}, "load_average": [load_average()]}
    info["summary"] = describe_machine(info)
    return info


def describe_machine(info: dict[str, Any]) -> str:
    """One line: '2-core Intel Xeon ... (x86_64), no GPU, 7.8 GB'."""
    gpu = ", ".join(info["gpus"]) if info["gpus"] else "no GPU"
    return (f"{info['cores_available'] or info['logical_cpus']}-core {info['cpu_model']}, {gpu}, "
            f"{info['memory_gb']} GB RAM, torch {info['torch']}, ray {info['ray']}")


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (ValueError, OSError, AttributeError):
        return None


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def finite_json(obj: Any) -> str:
    """JSON with NaN/inf refused (a figure that is not a number must not pass as one)."""
    return json.dumps(obj, indent=2, allow_nan=False, default=_plain)


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
