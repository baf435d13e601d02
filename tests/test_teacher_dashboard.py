"""The teacher dashboard: the Grafana dashboard names only metrics `teacher_service.stats.METRICS`
declares (under Ray's Prometheus names, with their tags), and so does docs/cluster.md; at the node's
Prometheus export port every counter and gauge is at 0 as soon as the app deploys and for a run at
its first call, then counts; `kd teacher status --watch` redraws without sleeping in tests."""
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
from teacher_service.stats import ERROR_KINDS, METRICS, zero_series

DASHBOARD = Path(cluster.__file__).parent / "grafana" / "kd_teacher_dashboard.json"
CLUSTER_DOC = Path(cluster.__file__).parent.parent / "docs" / "cluster.md"
METRIC = re.compile(r"\bray_kd_teacher_[a-z0-9_]+")
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
SPECS = {spec.name: spec for spec in METRICS}


def prometheus_names() -> dict[str, str]:
    """Exported series name -> the declared metric: Ray prefixes `ray_`, counters end `_total` and
    histograms come as `_bucket`/`_sum`/`_count` (the live test below checks this against Ray)."""
    return {f"ray_{spec.name}{suffix}": spec.name for spec in METRICS for suffix in SUFFIXES[spec.kind]}


def queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target and template variable of the dashboard."""
    doc = json.loads(DASHBOARD.read_text())
    found = [(panel["title"], target["expr"]) for panel in doc["panels"] for target in panel["targets"]]
    return found + [(f"variable {v['name']}", v["definition"]) for v in doc["templating"]["list"] if "definition" in v]


def query_labels(expr: str) -> set[str]:
    """Labels a query selects or groups by: `{label=~...}`, `by (a, b)`, `label_values(metric, label)`."""
    labels = set(re.findall(r"[{,]\s*(\w+)\s*[=!]~?", expr))
    for group in re.findall(r"\bby\s*\(([^)]*)\)", expr) + re.findall(r"label_values\([^,]+,([^)]*)\)", expr):
        labels |= {label.strip() for label in group.split(",") if label.strip()}
    return labels


# ------------------------------------------------------------------------------ the dashboard JSON
def test_dashboard_names_only_declared_metrics_and_covers_each():
    exported = prometheus_names()
    referenced = {name for _, expr in queries() for name in METRIC.findall(expr)}
    unknown = referenced - set(exported)
    assert not unknown, f"the dashboard names metrics stats.METRICS does not declare: {sorted(unknown)}"
    unused = set(SPECS) - {exported[m] for m in referenced}
    assert not unused, f"metrics the replicas export but the dashboard never shows: {sorted(unused)}"


def test_dashboard_queries_only_labels_their_metrics_carry():
    """A panel grouping by a label its metric lacks reads one unlabelled series (or nothing)."""
    exported = prometheus_names()
    for title, expr in queries():
        for name in METRIC.findall(expr):
            spec = SPECS[exported[name]]
            allowed = {*spec.tags, *(("le",) if name.endswith("_bucket") else ())}
            assert query_labels(expr) <= allowed, (title, expr, spec.tags)


def test_cluster_doc_lists_exactly_the_declared_metrics():
    text = CLUSTER_DOC.read_text()
    rows = {name: (kind, tuple(t.strip() for t in tags.split(","))) for name, kind, tags in
            re.findall(r"^\| `(ray_kd_teacher_\w+)` \| (\w+) \| ([\w, ]+) \|", text, re.MULTILINE)}
    names = {**prometheus_names(), **{f"ray_{name}": name for name in SPECS}}  # a histogram by its own name
    assert {names[name]: row for name, row in rows.items()} == {
        spec.name: (spec.kind, spec.tags) for spec in METRICS}, "docs/cluster.md's metric table (name, kind, tags)"
    documented = set(METRIC.findall(text))
    unknown = documented - set(names)
    assert not unknown, f"docs/cluster.md names metrics stats.METRICS does not declare: {sorted(unknown)}"


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
        if all(re.search(r"_(bucket|sum|count)\b", target["expr"]) for target in panel["targets"]):
            # Ray exports no histogram before its first observation: say why the panel is empty
            assert panel["fieldConfig"]["defaults"]["noValue"] == "no forwards yet", panel["title"]
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
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
Sample = tuple[str, dict[str, str], float]  # (series name, labels, value)


def scrape(app: str) -> list[Sample]:
    """Every ray_kd_teacher_* sample tagged with `app`, from every alive node's metrics export port."""
    import ray

    found: list[Sample] = []
    for node in ray.nodes():
        if not node.get("Alive") or not node.get("MetricsExportPort"):
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        for line in text.splitlines():
            m = METRIC.match(line)
            if m and f'app="{app}"' in line:
                labels, value = line[m.end():].rsplit("}", 1)
                found.append((m.group(0), dict(LABEL.findall(labels)), float(value.split()[0])))
    return found


def poll(app: str, done, timeout_s: float = 90) -> list[Sample]:
    """Scrape every 2 s (Ray exports every 10 s) until `done(samples)` or the timeout; samples are
    kept once seen (an idle gauge may leave the export later)."""
    deadline, seen = time.monotonic() + timeout_s, []
    while True:
        seen += scrape(app)
        if done(seen) or time.monotonic() > deadline:
            return seen
        time.sleep(2)


def matching(samples: list[Sample], name: str, tags: dict[str, str]) -> list[Sample]:
    """Samples of `name` carrying `tags` (an empty value: the label empty or absent, as Prometheus reads it)."""
    return [s for s in samples if s[0] == name and all(s[1].get(k, "") == v for k, v in tags.items())]


def exporters(samples: list[Sample], name: str, tags: dict[str, str]) -> int:
    """How many processes (Ray workers) export the series."""
    return len({s[1].get("WorkerId") for s in matching(samples, name, tags)})


def most(samples: list[Sample], name: str, **tags: str) -> float | None:
    return max((s[2] for s in matching(samples, name, tags)), default=None)


def zero_series_of(app: str, run: str) -> list[tuple[str, dict[str, str], int]]:
    """(Prometheus name, tags, processes exporting it) of the series `stats.zero_series` exports at 0
    for `app` at deploy (run '') or for `run` at its first call; the replica's name is Serve's, not
    the test's, so series are matched without it."""
    out = []
    for spec in METRICS:
        if run and "run" not in spec.tags:
            continue
        for tags in zero_series(spec, app, "", run):
            tags.pop("replica", None)
            out.append((f"ray_{spec.name}{SUFFIXES[spec.kind][0]}", tags, len(spec.sources) if not run else 1))
    return out


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
    """At 0 from the deploy (the replica's, and the gRPC ingress's refusal counters), per run from
    its first call, then counting, including the ingress's refusals (which no replica sees)."""
    import numpy as np

    from teacher_service import EmbedRequest, RequestError, TeacherConfig
    from teacher_service.grpc.auth import UnauthenticatedError
    from teacher_service.grpc.client import TeacherGrpcClient
    from teacher_service.grpc.ingress import ingress_address
    from tiny_models import running_app

    app, run = "kd-teacher-dashboard-test", "dash-run"
    rng = np.random.default_rng(0)
    tokens = np.zeros((4, 8), np.int64)
    tokens[:, 0], tokens[:, 1], tokens[:, 2] = 49406, 320, 49407
    token = tmp_path / "token"
    token.write_text("dash-token\n")
    token.chmod(0o600)
    cfg = TeacherConfig.from_dict(TINY).updated({"serving.app_name": app, "grpc.port": 0,
                                                 "grpc.token_file": str(token)})
    at_deploy, per_run = zero_series_of(app, ""), zero_series_of(app, run)
    with running_app(cfg) as handle:
        deployed = poll(app, lambda seen: all(exporters(seen, n, t) >= k for n, t, k in at_deploy))
        handle.embed.remote(EmbedRequest(keys=[f"k{i}" for i in range(4)], run=run, tokens=tokens,
                                         images=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
                            ).result(timeout_s=120)
        with pytest.raises(RequestError):
            handle.embed.remote(EmbedRequest(keys=[], run=run)).result(timeout_s=60)
        with TeacherGrpcClient(ingress_address(app), app) as client, pytest.raises(UnauthenticatedError):
            client.embed(tokens=tokens)  # no token: refused at the ingress
        watch_status(app, monkeypatch, capsys)
        found = poll(app, lambda seen: counted(seen, run) and all(matching(seen, n, t) for n, t, _ in per_run))
    missing = [(n, t, k) for n, t, k in at_deploy if exporters(deployed, n, t) < k]
    assert not missing, f"not at the export port after the deploy (name, tags, exporters): {missing}"
    assert [s for s in deployed if s[2] != 0] == []  # before any request: every series at 0, no histogram
    assert counted(found, run), sorted({s[0] for s in found})
    assert not [(n, t) for n, t, _ in per_run if not matching(found, n, t)], "a run's series missing"
    assert {s[0] for s in found} <= set(prometheus_names())  # Ray's naming is what the dashboard test assumes
    counts = {name: most(found, f"ray_kd_teacher_{name}_total", run=run) for name in (
        "requests", "samples_requested", "samples_computed", "samples_answered", "samples_coalesced",
        "samples_from_cache")}
    assert counts == {"requests": 1, "samples_requested": 4, "samples_computed": 4, "samples_answered": 4,
                      "samples_coalesced": 0, "samples_from_cache": 0}  # the refused request was not accepted
    errors = "ray_kd_teacher_errors_total"
    assert {kind: most(found, errors, run=run, kind=kind) for kind in ERROR_KINDS} == {
        kind: int(kind == "invalid") for kind in ERROR_KINDS}
    assert most(found, errors, run="grpc:127.0.0.1", kind="unauthenticated") == 1


def counted(found: list[Sample], run: str) -> bool:
    """What the two requests to the replica and the refusal at the ingress counted has arrived."""
    errors = "ray_kd_teacher_errors_total"
    return ((most(found, "ray_kd_teacher_samples_answered_total", run=run) or 0) >= 4
            and (most(found, "ray_kd_teacher_batches_total") or 0) >= 1
            and (most(found, errors, run=run, kind="invalid") or 0) >= 1
            and (most(found, errors, run="grpc:127.0.0.1", kind="unauthenticated") or 0) >= 1
            and {"ray_kd_teacher_queue_wait_s_bucket", "ray_kd_teacher_forward_s_bucket",
                 "ray_kd_teacher_batch_fill_ratio_count"} <= {s[0] for s in found})
