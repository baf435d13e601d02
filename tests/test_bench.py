"""The benchmark suite (`kd bench`): its pure parts, and a smoke run of every section at tiny
sizes on the shared Ray cluster, so the suite cannot rot. No timed assertions: only that every
section produced well-formed records (finite values, the median within min..max, context)."""
from __future__ import annotations

import ast
import builtins
import json
import math
import os
from pathlib import Path

import pytest

from benchmarks.suite.config import SECTIONS, preset
from benchmarks.suite.cores import plan_cores
from benchmarks.suite.pool import identity_us_per_sample, reference_us_per_sample, reference_wire_bytes, wire_bytes
from benchmarks.suite.records import Record
from benchmarks.suite.report import write_outputs
from teacher_service.affinity import pin_process


def test_record_summary_is_median_and_spread_never_best_run():
    r = Record("pool", "x", "samples/s", [3.0, 1.0, 2.0, 10.0])
    s = r.summary()
    assert s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 10.0
    assert s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]
    assert r.to_dict()["repeats"] == 4
    with pytest.raises(ValueError):
        Record("pool", "x", "s", [])


def test_core_plan_separates_sides_or_says_it_cannot():
    plan = plan_cores(True, cores=[0, 1, 2, 3])
    assert plan.separated and set(plan.teacher).isdisjoint(plan.student)
    assert plan.teacher_threads == len(plan.teacher) == 2
    shared = plan_cores(True, cores=[0])
    assert not shared.separated and not shared.teacher and "share" in shared.note
    assert not plan_cores(False, cores=[0, 1]).teacher


def test_pin_process_pins_this_process():
    before = os.sched_getaffinity(0)
    core = min(before)
    try:
        assert pin_process([core]) == [core]
        assert pin_process([]) is None
        with pytest.raises(ValueError):
            pin_process([10_000])
    finally:
        os.sched_setaffinity(0, before)


TWO_CORES = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")


def _in_a_fresh_process(code: str) -> str:
    """Affinity and Ray's state belong to a process: run `code` in a new interpreter, return stdout."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


@TWO_CORES
def test_a_process_started_on_the_teachers_core_can_pin_itself_to_a_students_core():
    """A worker forked by a raylet kept on the teacher's cores widens its own set to the students'."""
    out = _in_a_fresh_process(
        "import os; from teacher_service.affinity import pin_process\n"
        "cores = sorted(os.sched_getaffinity(0)); os.sched_setaffinity(0, {cores[-1]})\n"
        "print(pin_process([cores[0]]) == [cores[0]] == sorted(os.sched_getaffinity(0)))")
    assert out == "True"


@TWO_CORES
def test_an_embedded_benchs_driver_and_ray_processes_go_to_the_teachers_cores_and_nothing_else_moves():
    from benchmarks.suite.cores import keep_ray_on_teacher_cores

    out = _in_a_fresh_process(
        "import os; from benchmarks.suite.cores import keep_ray_on_teacher_cores, plan_cores\n"
        "cores = sorted(os.sched_getaffinity(0)); plan = plan_cores(True, cores=cores)\n"
        "os.environ.pop('RAY_ADDRESS', None)\n"
        "print(keep_ray_on_teacher_cores(plan, None) == plan.teacher == sorted(os.sched_getaffinity(0)),"
        " 'teacher' in plan.note)")
    assert out == "True True"
    before = os.sched_getaffinity(0)
    separated = plan_cores(True, cores=sorted(before))
    assert keep_ray_on_teacher_cores(separated, "ray://elsewhere:10001") is None  # an existing cluster
    assert keep_ray_on_teacher_cores(plan_cores(False, cores=sorted(before)), None) is None  # --no-pin
    assert os.sched_getaffinity(0) == before


def test_identity_cost_is_a_positive_time_per_sample_per_repeat():
    values = identity_us_per_sample(side=16, batch=4, context_length=8, repeats=2, rounds=1)
    assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values)


def test_multi_clients_send_new_pixels_every_step_and_equal_ones_across_runs():
    """The pool coalesces by content: a client repeating its pixels would be answered from recent rows."""
    import numpy as np

    from benchmarks.suite.multi import step_views
    from teacher_service.contract.augment import image_sha256

    base = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    steps = [image_sha256(step_views(base, step)) for step in range(300)]
    assert len({d for digests in steps for d in digests}) == 300 * 4
    assert image_sha256(step_views(base.copy(), 7)) == steps[7]


def test_wire_bytes_are_uint8_images_and_fp16_embeddings():
    request, response = wire_bytes(8, 224, 77, 768)
    assert 224 * 224 * 3 + 77 * 8 < request < 224 * 224 * 3 + 77 * 8 + 200
    assert 2 * 768 * 2 < response < 2 * 768 * 2 + 100


def test_requests_by_reference_are_small_and_their_cost_is_measured():
    """A sample by reference: its key, tokens and ~45 bytes (shard index, view, SHA-256), at any side."""
    for side in (64, 224):
        assert 77 * 8 + 32 < reference_wire_bytes(8, side, 77) < 77 * 8 + 32 + 24 + 80
    values = reference_us_per_sample(side=16, batch=4, repeats=2, rounds=1)
    assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values)


def test_presets_validate():
    for name in ("smoke", "cpu", "gpu"):
        assert preset(name).validate().preset == name
    cfg = preset("smoke")
    cfg.students.modes = ["none", "cache"]  # cache without precompute needs the hybrid run's cache
    with pytest.raises(ValueError, match="hybrid"):
        cfg.validate()
    cfg = preset("cpu")
    cfg.students.pool_batch_requests = 0
    with pytest.raises(ValueError, match="pool_batch_requests"):
        cfg.validate()


def _imports_of_benchmarks(tree: ast.AST) -> list[ast.stmt]:
    return [node for node in ast.walk(tree)
            if (isinstance(node, ast.Import) and any(a.name.split(".")[0] == "benchmarks" for a in node.names))
            or (isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "benchmarks")]


def test_only_the_kd_bench_entry_imports_measurement_code_and_only_when_it_runs():
    """Measurement lives apart from the product (issue 27): no module of the product packages imports
    `benchmarks`, except `kd bench`'s argument wiring, and that one inside its functions only."""
    root = Path(__file__).resolve().parents[1]
    importers = {}
    for package in ("teacher_service", "student_trainer", "cluster"):
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            if _imports_of_benchmarks(tree):
                importers[path.relative_to(root).as_posix()] = tree
    assert set(importers) == {"cluster/cli/bench.py"}
    wiring = importers["cluster/cli/bench.py"]
    assert not [node for node in wiring.body if node in _imports_of_benchmarks(wiring)]  # none at module level


def test_report_without_matplotlib_still_writes_json_and_markdown(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    doc = {"preset": "smoke", "command": "kd bench", "started": "t0", "finished": "t1", "wall_s": 1.0,
           "repeats": 1, "machine": {"summary": "m", "load_average": [[0, 0, 0]]}, "architectures": {},
           "core_plan": {"note": "n"}, "sections": {}}
    paths = write_outputs(doc, [Record("pool", "x", "samples/s", [1.0])], tmp_path)
    written = json.loads(paths["json"].read_text())
    assert written["plots"] == [] and "matplotlib" in written["plots_skipped"]
    assert "plots skipped" in paths["md"].read_text()
    assert not list(tmp_path.glob("*.tmp-*"))


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_smoke_run_of_every_section(ray_cluster, tmp_path):
    """Every section, and of the student modes the three whose bench code differs: none (the base of
    every ratio), hybrid (a cold cache per repeat, pool seconds) and cache (the precompute it reads);
    remote and inline are hybrid's and none's path with another mode string (and have their own
    training tests)."""
    from cluster.cli import main

    modes = ["none", "hybrid", "cache"]
    assert main(["bench", "--preset", "smoke", "--modes", *modes, "--out", str(tmp_path / "results")]) == 0
    out = tmp_path / "results"
    doc = json.loads((out / "bench.json").read_text())
    assert (out / "bench.md").is_file()
    assert doc["preset"] == "smoke" and doc["machine"]["summary"] and doc["command"].startswith("kd bench")
    for section in SECTIONS:
        assert "error" not in doc["sections"][section], doc["sections"][section]
        records = [r for r in doc["records"] if r["section"] == section]
        assert records, f"section {section} produced no records"
        for r in records:
            assert r["repeats"] == len(r["values"]) >= 1
            assert all(math.isfinite(v) and v >= 0 for v in r["values"]), r
            assert r["min"] <= r["q1"] <= r["median"] <= r["q3"] <= r["max"], r
            assert r["unit"] and r["params"] is not None and r["kind"] in ("measured", "derived", "model")
            assert {"machine", "command", "architectures", "started"} <= set(r["context"])
            if r["unit"].endswith("/s"):
                assert r["median"] > 0, r
    names = {r["name"] for r in doc["records"]}
    for mode in modes:
        assert f"samples/s ({mode})" in names and f"step compute ({mode})" in names
        assert f"step background_cpu ({mode})" in names and f"step compute_cpu ({mode})" in names
    assert "teacher wait, first step (hybrid)" in names and "teacher wait, first step (none)" not in names
    assert {"teacher wait, later steps (hybrid)", "pool headroom (hybrid)"} <= names
    assert not any(n.endswith(("later steps (cache)", "headroom (cache)", "headroom (none)")) for n in names)
    assert any(n.startswith("served / direct") for n in names)
    assert any(n.startswith("answered without own forward (shared, 2 run(s))") for n in names)
    assert all(r["kind"] == "model" or r["kind"] == "derived" for r in doc["records"] if r["section"] == "scale")
    fed = {r["name"].rsplit("(", 1)[1]: r for r in doc["records"] if "NIC keeps fed" in r["name"]}
    assert set(fed) == {"pixels)", "by reference)"}  # by reference, far fewer bytes: far more GPUs per NIC
    assert fed["by reference)"]["median"] > 10 * fed["pixels)"]["median"]
    md = (out / "bench.md").read_text()
    assert "not a measurement" in md and "Smoke run" in md


def test_the_smoke_form_of_a_preset_keeps_its_structure_at_smoke_sizes():
    """`kd bench --preset gpu --smoke-form`: the gpu preset's sections, modes, layouts and
    architecture families, thinned so a CPU box runs it (the full run: see issue 16's note)."""
    import open_clip

    from benchmarks.suite.config import smoke_form

    gpu = preset("gpu")
    form = smoke_form(gpu).validate()
    assert form.preset == "gpu-smoke-form" and form.repeats == 1 and not form.use_gpu
    assert form.models.precision == "fp32" and form.models.image_size == 32
    assert (form.models.teacher, form.models.student) == (gpu.models.teacher, gpu.models.student)
    assert form.students.modes == gpu.students.modes and form.students.precompute == gpu.students.precompute
    assert form.multi.layouts == gpu.multi.layouts and form.multi.students == gpu.multi.students
    assert form.sections == gpu.sections and form.cache.synthetic_dims == gpu.cache.synthetic_dims
    assert form.students.steps == preset("smoke").students.steps
    assert smoke_form(gpu, gpu=True).use_gpu and smoke_form(gpu, gpu=True).models.precision == gpu.models.precision
    for name, overrides in ((form.models.teacher, form.models.teacher_overrides),
                            (form.models.student, form.models.student_overrides)):
        model = open_clip.create_model(name, pretrained=None, **overrides)
        assert sum(p.numel() for p in model.parameters()) < 10_000_000, name  # thinned, not ViT-L-14's 428 M
