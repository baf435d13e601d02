"""A token-authenticated Ray cluster, as `ray start --head` makes one (Ray 2.60): the Serve config
from cluster/configs/ deployed with Ray's own `serve deploy`, a student run submitted with
`kd submit` and finishing, `kd` finding the token where Ray looks for it, and one `kd: error:` line
for a client without the token (cluster.auth).

The head is a cluster of its own beside the test session's (own ports, own temp dir, its token in
a file named by RAY_AUTH_TOKEN_PATH, HOME in tmp so nobody's ~/.ray is read or written), stopped by
its own process ids: `ray stop` would also stop every other Ray cluster on the machine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from autoscale_scenario import free_port
from own_processes import stop_own_processes

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's ray and serve, which may not be on PATH
HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
              "metrics-export-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "runtime-env-agent-port")
ATTEMPTS = 6  # starts of the head (see token_head): at load 50-100 on 2 cores about half miss Ray's wait
AUTH_NAMES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", "~/.ray/auth_token")


def client_env(home: Path, **extra: str) -> dict:
    """This process's environment without Ray's address and auth settings, HOME at `home`."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                                                             "RAY_AUTH_TOKEN_PATH")}
    return {**env, "HOME": str(home), "PYTHONPATH": str(ROOT), **extra}


@contextmanager
def token_head(temp_dirs, env: dict):
    """`ray start --head` with token authentication on (a token is where Ray looks: Ray turns it on),
    free ports, a temp dir from `temp_dirs()` (short: Ray's socket paths have a length limit), code
    on PYTHONPATH as a cluster image has it; yields its ports, then kills its processes (those
    naming its temp dir, and theirs). On a busy machine the raylet may give up waiting for its
    dashboard agent's port file (a fixed 15 s in Ray 2.60; `ray start` then says "timed out during
    startup"): that start is retried, in a fresh temp dir."""
    for attempt in range(ATTEMPTS):
        temp, ports = temp_dirs(), {name: free_port() for name in HEAD_PORTS}
        cmd = [str(BIN / "ray"), "start", "--head", f"--temp-dir={temp}", "--num-cpus=4", "--disable-usage-stats",
               "--dashboard-host=127.0.0.1", f"--object-store-memory={300 * 2**20}",
               *(f"--{name}={port}" for name, port in ports.items())]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode == 0:
            break
        stop_own_processes(f"{temp}/")
        assert attempt < ATTEMPTS - 1 and "timed out during startup" in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    try:
        assert "Token authentication is enabled" in proc.stderr + proc.stdout
        yield ports
    finally:
        stop_own_processes(f"{temp}/")


def run(argv: list, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


def kd(*argv, env: dict, timeout: float = 300, background: bool = False):
    cmd = [sys.executable, "-m", "cluster.cli", *map(str, argv)]
    if background:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return run(cmd, env, timeout)


def serve_config(tmp_path: Path) -> tuple[Path, str]:
    """cluster/configs/serve_teacher.yaml as it is, its args checked by TeacherConfig, without Serve's
    HTTP proxy (its port 8000 may be another cluster's on this machine); the copy and the app's name."""
    from teacher_service.config import TeacherConfig

    config = yaml.safe_load((ROOT / "cluster" / "configs" / "serve_teacher.yaml").read_text())
    app = config["applications"][0]
    TeacherConfig.from_dict(app["args"])
    path = tmp_path / "serve_teacher.yaml"
    path.write_text(yaml.safe_dump({**config, "proxy_location": "Disabled"}))
    return path, app["name"]


def student_run(tmp_path: Path, app: str) -> Path:
    from student_trainer.config import DataConfig, ModelConfig, OptimConfig, TeacherSourceConfig, TrainConfig
    from student_trainer.data.write_shards import write_digits_shards

    write_digits_shards(tmp_path / "data", image_size=32, samples_per_shard=64)
    path = tmp_path / "run.yaml"  # the teacher may still be deploying when the job starts: it waits for it
    TrainConfig(run_name="token-run", storage_path=str(tmp_path / "runs"), model=ModelConfig(name="digits-student"),
                data=DataConfig(train_shards=str(tmp_path / "data" / "train-*.tar"), image_size=32, batch_size=16),
                teacher=TeacherSourceConfig(mode="remote", app_name=app, timeout_s=300), losses={"clip": 1.0, "kl": 1.0},
                optim=OptimConfig(warmup_steps=1), epochs=1, max_steps_per_epoch=2, num_workers=1, cpus_per_worker=1,
                torch_threads=1, log_every_steps=0).to_yaml(path)
    return path


def assert_one_auth_error(proc, why: str) -> None:
    """`proc` (a finished `kd` run) ended with exit 2 and one `kd: error:` line, no traceback, naming
    `why` and every place Ray takes the token from."""
    stderr = proc.stderr if isinstance(proc, subprocess.CompletedProcess) else proc.communicate(timeout=300)[1]
    errors = [line for line in stderr.splitlines() if line.startswith("kd: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert "cannot authenticate" in errors[0] and why in errors[0], errors[0]
    assert all(name in errors[0] for name in AUTH_NAMES), errors[0]


def test_an_authentication_failure_is_found_however_ray_wraps_it(monkeypatch):
    """`ray.init` raises ConnectionError from a RuntimeError that holds the GCS's refusal only as
    traceback text; the job client raises AuthenticationError itself; other failures are not ours.
    The token's source is named in Ray's order."""
    from ray.exceptions import AuthenticationError

    from cluster.auth import authentication_failure, token_source

    def raised_from(exc: BaseException, cause: BaseException) -> BaseException:
        exc.__cause__ = cause
        return exc

    gcs_text = ("Failed to connect to GCS. Last connection error: Traceback (most recent call last):\n"
                "ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken: Authentication token is missing")
    assert authentication_failure(raised_from(ConnectionError("Failed to connect"), RuntimeError(gcs_text)))
    assert authentication_failure(AuthenticationError("Authentication required: Unauthorized"))
    assert authentication_failure(raised_from(ConnectionError("x"), AuthenticationError("refused")))
    assert not authentication_failure(raised_from(ConnectionError("Failed to connect"), RuntimeError("no GCS")))
    assert not authentication_failure(ValueError("ray.exceptions.AuthenticationError"))  # text: only in RuntimeError
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert token_source() == "~/.ray/auth_token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/etc/kd/token")
    assert token_source() == "RAY_AUTH_TOKEN_PATH=/etc/kd/token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t")
    assert token_source() == "RAY_AUTH_TOKEN"


@pytest.mark.ray
@pytest.mark.timeout(1500)
def test_a_token_cluster_takes_serve_deploy_and_a_submitted_run_and_refuses_a_client_without_token(
        tmp_path, tmp_path_factory):
    token, home, nobody = tmp_path / "token", tmp_path / "home", tmp_path / "nobody"
    home.mkdir(), nobody.mkdir()
    token.write_text("kd-test-" + os.urandom(16).hex())
    with_token = client_env(home, RAY_AUTH_TOKEN_PATH=str(token))  # no RAY_AUTH_MODE: kd turns it on itself
    without_token = client_env(nobody)
    config, app = serve_config(tmp_path)
    run_config = student_run(tmp_path, app)
    with token_head(lambda: tmp_path_factory.mktemp("ray"), with_token) as ports:
        dashboard, gcs = f"http://127.0.0.1:{ports['dashboard-port']}", f"127.0.0.1:{ports['port']}"
        refused_gcs = kd("teacher", "status", "--address", gcs, env=without_token, background=True)  # ~25 s of retries
        wrong = kd("jobs", "--address", dashboard, env={**without_token, "RAY_AUTH_TOKEN": "not-the-token"},
                   background=True)
        assert_one_auth_error(kd("jobs", "--address", dashboard, env=without_token), "no token here")
        assert_one_auth_error(wrong, "it refused the token from RAY_AUTH_TOKEN")

        deployed = run([BIN / "serve", "deploy", config, "--address", dashboard],
                       {**with_token, "RAY_AUTH_MODE": "token"})  # Ray's own tools need the mode set
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        submitted = kd("submit", "train", "--config", run_config, "--working-dir", ROOT, "--python", sys.executable,
                       "--wait", "--timeout", 900, "--address", dashboard, env=with_token, timeout=1000)
        assert submitted.returncode == 0 and submitted.stdout.rstrip().endswith(": SUCCEEDED"), (
            submitted.stdout[-4000:] + submitted.stderr[-3000:])

        status = kd("teacher", "status", "--app-name", app, "--json", "--address", gcs, env=with_token)
        assert status.returncode == 0, status.stderr[-3000:]
        assert json.loads(status.stdout)["stats"]["runs"]["token-run"]["samples"] > 0  # the run used the teacher
        assert_one_auth_error(refused_gcs, "no token here")
