"""The machine a GPU check ran on (GPU model, driver, CUDA, torch and library versions), and the
GPU memory nvidia-smi sees per process while a student trains beside the teacher pool."""
from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

SMI_TIMEOUT_S = 10


def nvidia_smi(*args: str) -> list[list[str]] | None:
    """Rows of `nvidia-smi <args> --format=csv,noheader,nounits`, split on commas; None where
    nvidia-smi is missing or fails (a machine without an NVIDIA driver, a container without it)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(["nvidia-smi", *args, "--format=csv,noheader,nounits"], capture_output=True,
                              text=True, timeout=SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return [[cell.strip() for cell in line.split(",")] for line in done.stdout.splitlines() if line.strip()]


def gpu_details() -> dict[str, Any]:
    """What torch and nvidia-smi say about the GPUs: names, memory, compute capability, driver,
    and the CUDA, cuDNN and NCCL versions torch was built with."""
    import torch

    details: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                               "devices": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            details["devices"].append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                                       "capability": f"{props.major}.{props.minor}",
                                       "multiprocessors": props.multi_processor_count})
        details["cudnn"] = torch.backends.cudnn.version()
        details["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() \
            else None
    rows = nvidia_smi("--query-gpu=name,driver_version,memory.total")
    details["nvidia_smi"] = [{"name": r[0], "driver": r[1], "memory_mib": r[2]} for r in rows or [] if len(r) >= 3]
    details["driver"] = details["nvidia_smi"][0]["driver"] if details["nvidia_smi"] else None
    return details


def machine_section() -> dict[str, Any]:
    """The machine section: the bench's machine record (CPU, memory, Python, torch, Ray) plus the
    GPUs and the library versions the check ran with."""
    import open_clip

    from benchmarks.suite.records import machine_info

    info = machine_info()
    gpus = gpu_details()
    names = [d["name"] for d in gpus["devices"]] or ["no GPU"]
    info.update(gpu=gpus, open_clip=open_clip.__version__)
    info["summary"] = (f"{', '.join(names)}; driver {gpus['driver'] or 'n/a'}; CUDA {gpus['torch_cuda'] or 'n/a'}; "
                       f"torch {info['torch']}; ray {info['ray']}; open_clip {info['open_clip']}; "
                       f"{info['cores_available'] or info['logical_cpus']} cores; Python {info['python']}")
    return info


def process_role(pid: int) -> str:
    """`teacher` (a Serve replica), `student` (a Ray Train worker) or the process's command line."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "gone"
    if "ServeReplica" in cmdline:
        return "teacher"
    if "TrainWorker" in cmdline or "TrainTrainable" in cmdline:
        return "student"
    return cmdline[:80] or "unknown"


class GpuMemorySampler:
    """nvidia-smi's used GPU memory per process, polled every `interval_s` while the block runs;
    `peaks()` is the largest each process used, by role. It is the driver's view (what the
    process holds: the CUDA context and the caching allocator's reserve included), beside each
    process's own `torch.cuda.max_memory_allocated`. Where nvidia-smi is absent or lists no
    processes (some VMs hide them), `peaks()` says so instead of inventing a figure."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self._peaks: dict[int, float] = {}
        self._roles: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="gpu-memory-sampler", daemon=True)
        self.available = nvidia_smi("--query-compute-apps=pid,used_memory") is not None

    def __enter__(self) -> GpuMemorySampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=SMI_TIMEOUT_S + 1)

    def _poll(self) -> None:
        while not self._stop.is_set():
            for row in nvidia_smi("--query-compute-apps=pid,used_memory") or []:
                if len(row) >= 2 and row[0].isdigit() and row[1].replace(".", "", 1).isdigit():
                    pid = int(row[0])
                    self._peaks[pid] = max(self._peaks.get(pid, 0.0), float(row[1]))
                    self._roles.setdefault(pid, process_role(pid))
            self._stop.wait(self.interval_s)

    def peaks(self) -> dict[str, Any]:
        """{"available": bool, "note": str, "processes": [{"pid", "role", "used_mib"}]}."""
        if not self.available:
            return {"available": False, "note": "nvidia-smi absent or failing", "processes": []}
        rows = [{"pid": pid, "role": self._roles.get(pid, "unknown"), "used_mib": mib}
                for pid, mib in sorted(self._peaks.items())]
        note = "" if rows else "nvidia-smi listed no compute processes (hidden by this VM or container?)"
        return {"available": True, "note": note, "processes": rows}
