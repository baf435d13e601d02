"""The Serve deployment on the real local Ray cluster, and the shipped Serve config file."""
from __future__ import annotations

import importlib
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from teacher_service import (
    EmbedRequest,
    EmbedResponse,
    RequestError,
    TeacherConfig,
    TeacherEngine,
    load_teacher,
)
from teacher_service.contract.answer_codec import ANSWER_DTYPES, EncodedRows, decode_rows, encode_rows
from teacher_service.scores import teacher_scores

SERVE_YAML = Path(__file__).resolve().parents[1] / "cluster" / "configs" / "serve_teacher.yaml"
APP = "kd-teacher-test"
ATOL = 2e-3


def yaml_args() -> dict:
    return yaml.safe_load(SERVE_YAML.read_text())["applications"][0]["args"]


def yaml_teacher(**serving) -> TeacherConfig:
    """serve_teacher.yaml's teacher with these `serving` fields changed."""
    return TeacherConfig.from_dict(yaml_args()).updated({f"serving.{k}": v for k, v in serving.items()})


def test_serve_config_validates_and_builds():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(SERVE_YAML.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.name == "kd-teacher" and app.route_prefix is None
    assert app.import_path == "teacher_service.serve.deployment:app_builder"
    module, attr = app.import_path.split(":")
    builder = getattr(importlib.import_module(module), attr)
    cfg = TeacherConfig.from_dict(app.args)  # every arg is a TeacherConfig field
    assert cfg.pretrained is None and cfg.serving.app_name == "kd-teacher" and cfg.serving.num_cpus <= 1
    assert builder(app.args) is not None
    assert cfg.serving.autoscaling["max_replicas"] >= cfg.serving.autoscaling["min_replicas"] >= 1
    with pytest.raises(ValueError, match="unknown keys"):
        builder({**app.args, "max_batch": 3})
    # a Serve config written before the sections (flat args) still builds, with one deprecation line
    flat = {**{k: v for k, v in app.args.items() if k != "serving"}, **app.args["serving"]}
    with pytest.warns(FutureWarning, match=r"^Serve config args: flat keys are deprecated: app_name -> "
                                           r"serving.app_name, .*max_batch_size -> serving.max_batch_size") as said:
        assert builder(flat) is not None
    assert len(said) == 1


def request(n, seed, h=32, w=32) -> EmbedRequest:
    rng = np.random.default_rng(seed)
    tok = np.zeros((n, 10), np.int64)
    tok[:, 0] = 49406
    tok[:, 1:3] = rng.integers(1, 49000, (n, 2))
    tok[:, 3] = 49407
    return EmbedRequest(keys=[f"{seed}-{i}" for i in range(n)],
                        images=rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8), tokens=tok, run=f"r{seed % 3}")


def assert_same(got: EmbedResponse, want: EmbedResponse) -> None:
    assert got.keys == want.keys and got.fingerprint == want.fingerprint
    for field in ("image_features", "text_features"):
        g, w = getattr(got, field), getattr(want, field)
        assert g.dtype == np.float16
        np.testing.assert_allclose(g.astype(np.float32), w.astype(np.float32), atol=ATOL)


@pytest.mark.ray
@pytest.mark.parametrize("batcher", ["fill", "serve"])
def test_teacher_deployment_batches_and_isolates_errors(ray_cluster, batcher):
    from ray import serve

    from teacher_service.app import TeacherUnavailableError, deploy, get_teacher_handle

    cfg = yaml_teacher(app_name=APP, num_cpus=0.5, max_batch_size=64, batch_wait_timeout_s=0.25, batcher=batcher,
                       autoscaling=None)  # one replica: the batch counts below are its own
    handle = deploy(cfg)
    try:
        local = load_teacher(cfg)
        info = handle.info.remote().result(timeout_s=60)
        assert info["fingerprint"] == local.fingerprint  # seeded init: same weights in the replica
        assert info["embed_dim"] == 64 and info["max_batch_size"] == 64

        # several callers, each with several requests in flight (4 samples each, mixed sizes)
        reqs = [request(4, seed, 32 + 8 * (seed % 2), 32) for seed in range(12)]
        results: dict[int, EmbedResponse] = {}

        def caller(idx: list[int]) -> None:
            responses = [(i, handle.embed.remote(reqs[i])) for i in idx]
            for i, r in responses:
                results[i] = r.result(timeout_s=60)

        threads = [threading.Thread(target=caller, args=(list(range(c, 12, 4)),)) for c in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert sorted(results) == list(range(12))
        want = TeacherEngine(local).embed_many(reqs)
        for i in range(12):
            assert_same(results[i], want[i])
        stats = handle.stats.remote().result(timeout_s=30)
        assert stats["requests"] == 12 and stats["samples"] == 48
        assert stats["batches"] < stats["requests"] and stats["max_batch_samples"] > 4  # batching happened

        # a bad request fails alone, concurrently with good ones; the replica keeps answering
        bad = EmbedRequest(keys=["a", "b"], images=np.zeros((2, 32, 32), np.uint8))
        good_refs = [handle.embed.remote(reqs[0]), handle.embed.remote(reqs[1])]
        with pytest.raises(RequestError, match="grayscale"):
            handle.embed.remote(bad).result(timeout_s=60)
        for ref, w in zip(good_refs, want[:2]):
            assert_same(ref.result(timeout_s=60), w)

        # a request larger than max_batch_size bypasses the batch queue instead of failing
        big = request(70, seed=99)
        assert_same(handle.embed.remote(big).result(timeout_s=60), TeacherEngine(local).embed(big))
        stats = handle.stats.remote().result(timeout_s=30)
        assert stats["errors"] == 1 and stats["requests"] == 15

        # later jobs attach by name (the app is detached); absent names are explained
        assert get_teacher_handle(APP, timeout_s=5).info.remote().result(timeout_s=30)["fingerprint"] == local.fingerprint
        with pytest.raises(TeacherUnavailableError, match=rf"no running teacher app 'nope'.*{APP}"):
            get_teacher_handle("nope", timeout_s=0)
    finally:
        serve.delete(APP)
    assert APP not in serve.status().applications


@pytest.mark.ray
def test_access_log_is_off_unless_asked_for(ray_cluster):
    """`deploy(access_log=False)` (`kd demo` without --verbose): the replica writes no per-request
    "CALL ..." line, to its log file or to the console Ray forwards to the deploying driver (Serve
    filters both handlers with the same flag); deployed again with it on, the lines are back."""
    import time

    from ray import serve
    from ray._private.worker import _global_node

    from teacher_service.app import deploy

    app = "kd-teacher-access-log"
    cfg = yaml_teacher(app_name=app, num_cpus=0.5, autoscaling=None)
    logs = Path(_global_node.get_session_dir_path()) / "logs" / "serve"

    def access_lines() -> int:
        return sum(p.read_text(errors="replace").count("CALL info") for p in logs.glob(f"replica_{app}_*.log"))

    try:
        handle = deploy(cfg, access_log=False)
        for _ in range(3):
            handle.info.remote().result(timeout_s=120)
        assert list(logs.glob(f"replica_{app}_*.log")), "the replica keeps its log file, only without access lines"
        assert access_lines() == 0
        handle = deploy(cfg, access_log=True)
        handle.info.remote().result(timeout_s=120)
        deadline = time.monotonic() + 30
        while access_lines() == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert access_lines() >= 1
    finally:
        serve.delete(app)


@pytest.mark.ray
def test_a_run_cannot_plant_rows_under_another_runs_view_and_keys(tiny_teacher_app):
    """Over Serve handles: run "attacker" sends run "victim"'s view and keys with all-255 pixels
    first; the victim is then answered with the forward of its own pixels (on main: with the
    attacker's rows). The victim's pixels under other keys and another view come from the
    replica's recent rows: coalescing follows the content. Three runs then ask for the same samples
    with scores in fp16, bf16 and int8: one forward, each run's rows in its dtype, the same scores."""
    import dataclasses

    from tiny_models import shared_teacher

    handle = tiny_teacher_app  # the session's shared app: counted below by differences
    victim = dataclasses.replace(request(4, seed=31), run="victim", view="ns-integrity/0")
    attack = dataclasses.replace(victim, run="attacker", images=np.full_like(victim.images, 255))
    renamed = dataclasses.replace(victim, run="third", view="other-ns/5", keys=[f"x{i}" for i in range(4)])
    mixed = [dataclasses.replace(request(4, seed=32), run=f"run-{d}", view="ns-dtypes/0", answer_dtype=d,
                                 scores=True) for d in ANSWER_DTYPES]
    planted = handle.embed.remote(attack).result(timeout_s=60)
    got = handle.embed.remote(victim).result(timeout_s=60)
    before = handle.stats.remote().result(timeout_s=30)
    again = handle.embed.remote(renamed).result(timeout_s=60)
    after = handle.stats.remote().result(timeout_s=30)
    answers = [ref.result(timeout_s=60) for ref in [handle.embed.remote(r) for r in mixed]]  # sent at once
    mixed_stats = handle.stats.remote().result(timeout_s=30)
    local = TeacherEngine(load_teacher(shared_teacher()))
    want = local.embed(dataclasses.replace(victim, view=""))
    assert_same(got, want)
    assert np.abs(planted.image_features.astype(np.float32) - want.image_features.astype(np.float32)).max() > 0.05
    assert again.keys == renamed.keys and again.image_features.tobytes() == got.image_features.tobytes()
    assert (after["samples_from_cache"] - before["samples_from_cache"],
            after["samples_computed"] - before["samples_computed"]) == (4, 0)
    # one pool answering three runs in fp16, bf16 and int8 computed their shared samples once; the fp16
    # run got what it gets alone, and the others exactly its rows, encoded in their own dtype
    assert mixed_stats["samples_computed"] - after["samples_computed"] == 4
    assert mixed_stats["samples_requested"] - after["samples_requested"] == 12
    fp16, bf16, int8 = answers
    assert_same(fp16, local.embed(dataclasses.replace(mixed[0], view="", answer_dtype=None, scores=False)))
    # the scores come from the full-precision rows before encoding: the same for every dtype
    want_scores = teacher_scores(fp16.image_features, fp16.text_features, fp16.logit_scale)
    for answer in answers:
        np.testing.assert_array_equal(answer.scores, want_scores)
    for field in ("image_features", "text_features"):
        rows = getattr(fp16, field)
        for answer, dtype in ((bf16, "bf16"), (int8, "int8")):
            enc = getattr(answer, field)
            assert isinstance(enc, EncodedRows) and enc.dtype == dtype and len(enc) == 4
            np.testing.assert_array_equal(enc.values, encode_rows(rows, dtype).values)
            np.testing.assert_array_equal(decode_rows(enc), encode_rows(rows, dtype).decode())
