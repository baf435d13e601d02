"""The teacher dashboard: the kd_teacher_* metrics reach the node's Prometheus export port after a
request; the Grafana dashboard names only metrics the replicas register (under Ray's Prometheus
names); `kd teacher status --watch` redraws without sleeping in tests."""
from __future__ import annotations

import io
import json
import re
import time
import urllib.request
from pathlib import Path

import pytest

import cluster
from cluster.cli.main import build_parser
from cluster.cli.teacher import CLEAR, watch

DASHBOARD = Path(cluster.__file__).parent / "grafana" / "kd_teacher_dashboard.json"
METRIC = re.compile(r"\bray_kd_teacher_[a-z0-9_]+")
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def registered_metrics(monkeypatch) -> dict[str, str]:
    """Name -> kind of every metric `RayMetricsSink` registers, read by building one against recording stand-ins."""
    import ray.util.metrics

    from teacher_service.stats import RayMetricsSink

    found: dict[str, str] = {}

    def stand_in(kind: str):
        class Metric:
            def __init__(self, name, description="", *args, **kwargs):
                found[name] = kind
        return Metric

    for kind in SUFFIXES:
        monkeypatch.setattr(ray.util.metrics, kind.capitalize(), stand_in(kind))
    RayMetricsSink("app", "replica")
    return found


def prometheus_names(registered: dict[str, str]) -> dict[str, str]:
    """Exported series name -> the registered metric: Ray prefixes `ray_`, counters end `_total` and
    histograms come as `_bucket`/`_sum`/`_count` (the live test below checks this against Ray)."""
    return {f"ray_{name}{suffix}": name for name, kind in registered.items() for suffix in SUFFIXES[kind]}


def referenced_metrics() -> set[str]:
    return set(METRIC.findall(DASHBOARD.read_text()))


# ------------------------------------------------------------------------------ the dashboard JSON
def test_dashboard_names_only_registered_metrics_and_covers_each(monkeypatch):
    registered = registered_metrics(monkeypatch)
    exported = prometheus_names(registered)
    assert len(registered) >= 12  # the stand-ins saw the sink's metrics
    unknown = referenced_metrics() - set(exported)
    assert not unknown, f"the dashboard names metrics no replica exports: {sorted(unknown)}"
    unused = set(registered) - {exported[m] for m in referenced_metrics()}
    assert not unused, f"metrics the replicas export but the dashboard never shows: {sorted(unused)}"


def test_dashboard_is_a_grafana_import_with_a_prometheus_datasource_variable():
    doc = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus" and "app" in variables
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)) >= 8
    titles = " ".join(p["title"] for p in doc["panels"]).lower()
    for wanted in ("samples/s per run", "queue wait p50 / p99", "forward p50 / p99", "batch fill", "coalesced",
                   "errors and refusals by kind", "replicas"):
        assert wanted in titles
    for panel in doc["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.count("(") == expr.count(")") and METRIC.search(expr), (panel["title"], expr)
            assert panel["datasource"]["uid"] == "${datasource}"


# -------------------------------------------------------------------------- kd teacher status --watch
def test_watch_redraws_every_period_and_sleeps_between_only():
    calls, slept, out = [], [], io.StringIO()

    def render() -> str:
        calls.append(len(calls))
        if len(calls) == 2:
            raise TimeoutError("replica restarting")
        return f"frame {len(calls)}"

    assert watch(render, 5.0, iterations=3, sleep=slept.append, out=out) == 0
    text = out.getvalue()
    assert len(calls) == 3 and slept == [5.0, 5.0]  # no sleep after the last frame
    assert "frame 1" in text and "frame 3" in text and text.count("every 5 s, Ctrl-C stops") == 3
    assert "status unavailable: TimeoutError('replica restarting')" in text  # and it kept watching
    assert CLEAR not in text  # not a terminal: no escape codes in a log


def test_watch_clears_a_terminal_and_ends_on_ctrl_c():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    def interrupt(_seconds: float) -> None:
        raise KeyboardInterrupt

    out = Tty()
    assert watch(lambda: "pool ok", 2.0, sleep=interrupt, out=out) == 0  # no iteration bound: Ctrl-C ends it
    assert out.getvalue().startswith(CLEAR) and out.getvalue().count("pool ok") == 1


def test_watch_flag_takes_optional_positive_seconds(capsys):
    parse = build_parser().parse_args
    assert parse(["teacher", "status"]).watch is None
    assert parse(["teacher", "status", "--watch"]).watch == 2.0
    assert parse(["teacher", "status", "--watch", "0.5"]).watch == 0.5
    with pytest.raises(SystemExit):
        parse(["teacher", "status", "--watch", "0"])
    assert "positive number of seconds" in capsys.readouterr().err


# ------------------------------------------------------------------ the node's metrics export port
TINY = {"model": "ViT-B-32", "pretrained": None, "precision": "fp32", "device": "cpu", "seed": 0,
        "torch_threads": 1, "serving": {"num_cpus": 0.25, "max_batch_size": 16, "batch_wait_timeout_s": 0.01},
        "overrides": {"embed_dim": 32,
                      "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
                      "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}}


def scrape(app: str) -> dict[str, list[str]]:
    """Series name -> its lines tagged with `app`, from every alive node's metrics export port."""
    import ray

    found: dict[str, list[str]] = {}
    for node in ray.nodes():
        if not node.get("Alive") or not node.get("MetricsExportPort"):
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        for line in text.splitlines():
            m = METRIC.match(line)
            if m and f'app="{app}"' in line:
                found.setdefault(m.group(0), []).append(line)
    return found


def watch_status(app: str, monkeypatch, capsys) -> None:
    """`kd teacher status --watch` against the live app: two frames of the merged counters, no real sleep."""
    import cluster.cli.teacher as teacher_cli
    from cluster.cli import main

    real_watch = teacher_cli.watch
    monkeypatch.setattr(teacher_cli, "watch", lambda render, every_s: real_watch(
        render, every_s, iterations=2, sleep=lambda s: None))
    assert main(["teacher", "status", "--app-name", app, "--watch", "0.5"]) == 0
    text = capsys.readouterr().out
    assert text.count("every 0.5 s, Ctrl-C stops") == 2 and text.count(f"teacher app {app!r}") == 2
    assert "status unavailable" not in text


@pytest.mark.ray
def test_teacher_metrics_reach_the_metrics_export_port(ray_cluster, monkeypatch, capsys, tmp_path):
    """The replicas' metrics, and the refusals of the gRPC ingress (which no replica sees)."""
    import numpy as np

    from teacher_service import EmbedRequest, RequestError, TeacherConfig
    from teacher_service.grpc.auth import UnauthenticatedError
    from teacher_service.grpc.client import TeacherGrpcClient
    from teacher_service.grpc.ingress import ingress_address
    from tiny_models import running_app

    app, run = "kd-teacher-dashboard-test", "dash-run"
    exported = prometheus_names(registered_metrics(monkeypatch))
    monkeypatch.undo()  # the replica must register real metrics
    rng = np.random.default_rng(0)
    tokens = np.zeros((4, 8), np.int64)
    tokens[:, 0], tokens[:, 1], tokens[:, 2] = 49406, 320, 49407
    token = tmp_path / "token"
    token.write_text("dash-token\n")
    token.chmod(0o600)
    cfg = TeacherConfig.from_dict(TINY).updated({"serving.app_name": app, "grpc.port": 0,
                                                 "grpc.token_file": str(token)})
    with running_app(cfg) as handle:
        handle.embed.remote(EmbedRequest(keys=[f"k{i}" for i in range(4)], run=run, tokens=tokens,
                                         images=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
                            ).result(timeout_s=120)
        with pytest.raises(RequestError):
            handle.embed.remote(EmbedRequest(keys=[], run=run)).result(timeout_s=60)
        with TeacherGrpcClient(ingress_address(app), app) as client, pytest.raises(UnauthenticatedError):
            client.embed(tokens=tokens)  # no token: refused at the ingress
        after_request = {"ray_kd_teacher_requests_total", "ray_kd_teacher_samples_answered_total",
                         "ray_kd_teacher_samples_computed_total", "ray_kd_teacher_batches_total",
                         "ray_kd_teacher_queue_wait_s_bucket", "ray_kd_teacher_forward_s_bucket",
                         "ray_kd_teacher_batch_fill_ratio_count", "ray_kd_teacher_run_samples_per_s",
                         "ray_kd_teacher_in_flight", "ray_kd_teacher_errors_total"}
        watch_status(app, monkeypatch, capsys)
        deadline, found = time.monotonic() + 90, {}  # Ray exports every few seconds
        while time.monotonic() < deadline and not (after_request <= set(found) and refused_at_ingress(found)):
            time.sleep(2)
            for name, lines in scrape(app).items():  # kept once seen: an idle gauge may leave the export later
                found.setdefault(name, []).extend(lines)
    missing = after_request - set(found)
    assert not missing, f"not at the metrics export port after 90 s: {sorted(missing)}; found {sorted(found)}"
    assert set(found) <= set(exported)  # Ray's naming is what the dashboard test assumes
    assert any(f'run="{run}"' in line for line in found["ray_kd_teacher_samples_answered_total"])
    assert any('kind="invalid"' in line for line in found["ray_kd_teacher_errors_total"])
    assert refused_at_ingress(found), found["ray_kd_teacher_errors_total"]


def refused_at_ingress(found: dict[str, list[str]]) -> bool:
    return any('kind="unauthenticated"' in line and 'run="grpc:127.0.0.1"' in line
               for line in found.get("ray_kd_teacher_errors_total", []))
