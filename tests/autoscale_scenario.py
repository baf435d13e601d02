"""The Ray autoscaler adding a student node for a student run that asks for student resources no
node has, and removing it when idle — with Ray's fake multi-node provider, on this machine.

Starts its own head (`ray start --head --autoscaling-config`, provider `fake_multinode`, on a
free port that its nodes are told to join, and its own temp dir), runs a 1-worker student run
whose worker asks for `kd_student`, records the node count every 0.5 s, and prints a JSON report
as its last line. It stops only its own
processes (those whose command line names its temp dir): `ray stop` would also kill any other
Ray cluster on the machine, such as the test session's.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from cluster.roles import STUDENT_RESOURCE
from own_processes import stop_own_processes

IDLE_TIMEOUT_MIN = 0.1  # 6 s: the autoscaler removes a node idle for this long
TRAIN_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def autoscaling_config(gcs_address: str) -> dict:
    """Ray's fake_multinode example config, with a CPU-only head and a scale-from-zero student type.

    `gcs_address`: where the provider's nodes join the head. Without it they join <node ip>:6379,
    which would tie the scenario to Ray's default port (taken whenever another cluster runs here)."""
    return {
        "cluster_name": "kd-fake", "max_workers": 1, "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "student": {"resources": {"CPU": 2, STUDENT_RESOURCE: 1, "object_store_memory": 150 * 2**20},
                        "node_config": {}, "min_workers": 0, "max_workers": 1},
        },
        "auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


def main(workdir: str) -> None:
    import ray
    import ray._private.services

    work = Path(workdir)
    temp = Path(tempfile.mkdtemp(prefix="kdas-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    config = work / "autoscaling.json"
    port = free_port()
    node_ip = ray._private.services.get_node_ip_address()  # what the head registers; the provider's default host
    config.write_text(json.dumps(autoscaling_config(f"{node_ip}:{port}")))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local test cluster: no token for head or driver
    env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"}
    ray_cli = str(Path(sys.executable).with_name("ray"))  # the venv's, which may not be on PATH
    subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=1", f"--temp-dir={temp}",
                    f"--autoscaling-config={config}", "--include-dashboard=false",
                    f"--object-store-memory={150 * 2**20}", "--disable-usage-stats"], env=env, check=True,
                   capture_output=True)
    timeline: list[tuple[float, int]] = []
    stop = threading.Event()
    try:
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
        start = time.monotonic()

        def watch() -> None:
            while not stop.is_set():
                alive = sum(1 for n in ray.nodes() if n["Alive"])
                if not timeline or timeline[-1][1] != alive:
                    timeline.append((round(time.monotonic() - start, 1), alive))
                stop.wait(0.5)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        time.sleep(2)
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(train(work)), daemon=True)
        runner.start()
        runner.join(timeout=TRAIN_TIMEOUT_S)  # never hang: the finally below must stop our processes
        if runner.is_alive():
            print(json.dumps({"timeline": timeline, "error": f"student run not done after {TRAIN_TIMEOUT_S} s"}))
            return
        metrics = result
        finished = round(time.monotonic() - start, 1)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not timeline or timeline[-1][1] != 1):
            time.sleep(0.5)
        stop.set()
        watcher.join(timeout=5)
        print(json.dumps({"timeline": timeline, "train_finished_s": finished, "steps": metrics.get("step")}))
    finally:
        stop.set()
        ray.shutdown()
        stop_own_processes(str(temp))


def train(work: Path) -> dict:
    from student_trainer.config import (
        DataConfig,
        ModelConfig,
        OptimConfig,
        TeacherSourceConfig,
        TrainConfig,
    )
    from student_trainer.data.write_shards import write_digits_shards
    from student_trainer.train import run_training

    write_digits_shards(work / "data", image_size=32, samples_per_shard=64)
    cfg = TrainConfig(run_name="autoscale", storage_path=str(work / "runs"), model=ModelConfig(name="digits-student"),
                      data=DataConfig(train_shards=str(work / "data" / "train-*.tar"), image_size=32, batch_size=16),
                      teacher=TeacherSourceConfig(mode="none"), losses={"clip": 1.0},
                      optim=OptimConfig(warmup_steps=1), epochs=1, max_steps_per_epoch=2, num_workers=1,
                      cpus_per_worker=1, worker_resources={STUDENT_RESOURCE: 1}, torch_threads=1, log_every_steps=0)
    return run_training(cfg).metrics


if __name__ == "__main__":
    main(sys.argv[1])
