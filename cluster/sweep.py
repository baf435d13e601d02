"""`kd sweep`: several student runs at once, each its own Ray job-like process, one teacher pool.

Each run is a separate `kd train` process connected to the same cluster, exactly as separate
`ray job submit` runs would be: they share nothing but the named teacher app.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from cluster.report import write_sweep_report
from student_trainer.config import TrainConfig


@dataclass
class RunOutcome:
    run_name: str
    returncode: int
    wall_time_s: float
    metrics: dict | None


def load_sweep_configs(paths: list[str]) -> list[TrainConfig]:
    """Load and validate every config; run names must be unique (a reused name would resume)."""
    configs = [TrainConfig.from_yaml(p).validate() for p in paths]
    seen: dict[str, str] = {}
    for path, cfg in zip(paths, configs):
        if cfg.run_name in seen:
            raise ValueError(f"run_name {cfg.run_name!r} appears in both {seen[cfg.run_name]} and {path}: "
                             "every run in a sweep needs its own name")
        seen[cfg.run_name] = path
    return configs


def _pump(stream, prefix: str, sink: list[str]) -> None:
    for line in iter(stream.readline, ""):
        sink.append(line)
        print(f"[{prefix}] {line}", end="", flush=True)


def _last_json(lines: list[str]) -> dict | None:
    """The summary JSON object `kd train` prints at its end; Ray's log lines may still follow it
    (forwarded worker output arrives late), so the object is decoded where it starts."""
    text = "".join(lines)
    start = text.rfind('\n{\n  "run_name"')
    if start < 0:
        return None
    try:
        summary, _ = json.JSONDecoder().raw_decode(text[start + 1:])
        return summary
    except json.JSONDecodeError:
        return None


def run_sweep(paths: list[str], address: str, extra_args: list[str] | None = None) -> list[RunOutcome]:
    """Start one `kd train` process per config against `address`; wait for all; never orphan them."""
    configs = load_sweep_configs(paths)
    procs, outputs, pumps, starts = [], [], [], []
    try:
        for path, cfg in zip(paths, configs):
            cmd = [sys.executable, "-m", "cluster.cli", "train", "--config", path, "--address", address]
            proc = subprocess.Popen(cmd + list(extra_args or []), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1)
            lines: list[str] = []
            pump = threading.Thread(target=_pump, args=(proc.stdout, cfg.run_name, lines), daemon=True)
            pump.start()
            procs.append(proc), outputs.append(lines), pumps.append(pump), starts.append(time.perf_counter())
        outcomes = []
        for cfg, proc, lines, pump, start in zip(configs, procs, outputs, pumps, starts):
            code = proc.wait()
            pump.join(timeout=10)
            summary = _last_json(lines) if code == 0 else None
            outcomes.append(RunOutcome(cfg.run_name, code, round(time.perf_counter() - start, 1),
                                       (summary or {}).get("metrics")))
        write_sweep_report(configs)  # PNG learning curves and final metrics of the runs (cluster.report)
        return outcomes
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
