"""Several student runs as tenants of one teacher pool, on the shared local Ray cluster.

- two concurrent `kd train` runs (started by `kd sweep`, each its own process, like separate
  Ray jobs) both finish, and the pool's own counters show every (key, view) computed once (the
  pool identifies samples by pixels and tokens; the runs' equal views make those equal);
- the same with the embedding cache in hybrid mode, across runs and epochs;
- weighted fair share measured on a live app under contention;
- the replica count rising under load and falling after it (Serve autoscaling).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_models import running_app, tiny_teacher_overrides, train_shards

from student_trainer.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    TeacherSourceConfig,
    TrainConfig,
)
from teacher_service.config import ServingConfig, TeacherConfig
from teacher_service.contract.protocol import EmbedRequest

pytestmark = pytest.mark.ray

APP = "kd-teacher-multi-run"
BATCH = 16
STEPS = 3
EPOCHS = 2
TEACHER = TeacherConfig(model="ViT-B-32", overrides=tiny_teacher_overrides(), torch_threads=1,
                        serving=ServingConfig(app_name=APP, num_cpus=0.5, max_batch_size=64,
                                              expected_request_samples=BATCH))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return train_shards(tmp_path_factory)


@pytest.fixture(scope="module")
def epoch_shards(tmp_path_factory) -> str:
    """Exactly one epoch of STEPS batches (2 shards of 24 digits): every epoch sees every key."""
    return train_shards(tmp_path_factory, STEPS * BATCH // 2, "digits-small")


@pytest.fixture(scope="module")
def teacher_app(ray_cluster):
    with running_app(TEACHER) as handle:
        yield handle


def stats(handle) -> dict:
    from teacher_service.app import collect_stats

    return collect_stats(handle)


def train_cfg(shards: str, storage: Path, run: str, mode: str, seed: int, cache: Path | None = None,
              num_views: int | None = None, losses: dict | None = None) -> TrainConfig:
    return TrainConfig(
        run_name=run, storage_path=str(storage), model=ModelConfig(name="digits-student"),
        data=DataConfig(train_shards=shards, image_size=32, batch_size=BATCH, shuffle_buffer=50, num_views=num_views),
        teacher=TeacherSourceConfig(mode=mode, app_name=APP, cache_path=str(cache) if cache else None,
                                    timeout_s=60.0, retries=1),
        losses=losses or {"clip": 1.0, "kl": 1.0}, optim=OptimConfig(lr=1e-3, warmup_steps=1),
        epochs=EPOCHS, max_steps_per_epoch=STEPS, num_workers=1, cpus_per_worker=1, torch_threads=1,
        log_every_steps=0, seed=seed)


def requested_pairs(cfg: TrainConfig) -> list[tuple[str, int]]:
    """Every (key, view) a run of `cfg` asks the teacher for, rebuilt from the data pipeline."""
    from student_trainer.data.batches import train_batches
    from teacher_service.shards import resolve_shards
    from student_trainer.factory import create_student, create_tokenizer

    mc = ModelConfig(name="digits-student")
    tokenizer = create_tokenizer(create_student(mc), mc)
    pairs = []
    for epoch in range(cfg.epochs):
        batches = train_batches(resolve_shards(cfg.data.train_shards), rank=0, world_size=1, batch_size=BATCH,
                                image_size=32, epoch=epoch, seed=cfg.seed, tokenizer=tokenizer, shuffle_buffer=50)
        view = cfg.data.view_of(epoch)
        pairs += [(k, view) for _, b in zip(range(STEPS), batches) for k in b.keys]
    return pairs


def sweep(configs: list[TrainConfig], tmp_path: Path) -> list:
    import ray

    from cluster.sweep import run_sweep

    paths = []
    for cfg in configs:
        path = tmp_path / f"{cfg.run_name}.yaml"
        cfg.to_yaml(path)
        paths.append(str(path))
    outcomes = run_sweep(paths, ray.get_runtime_context().gcs_address)
    assert [o.returncode for o in outcomes] == [0] * len(configs), outcomes
    return outcomes


def test_two_concurrent_runs_compute_each_key_view_once(shards, teacher_app, tmp_path):
    """Two runs over the same data and views (a sweep of loss weights) share every computation."""
    runs = [train_cfg(shards, tmp_path / "runs", "sweep-a", "remote", seed=0),
            train_cfg(shards, tmp_path / "runs", "sweep-b", "remote", seed=0, losses={"clip": 1.0, "fd": 100.0})]
    pairs = requested_pairs(runs[0])
    unique = len(set(pairs))
    before = stats(teacher_app)
    outcomes = sweep(runs, tmp_path)
    after = stats(teacher_app)

    for o in outcomes:
        assert o.metrics["teacher_samples"] == len(pairs)  # each run asked for everything it trained on
    pictures = list((tmp_path / "runs").glob("sweep-*/learning_curves.png"))  # kd sweep draws its runs
    assert len(pictures) == 1 and (pictures[0].parent / "final_metrics.png").is_file()
    computed = after["samples_computed"] - before["samples_computed"]
    reused = (after["samples_coalesced"] - before["samples_coalesced"]
              + after["samples_from_cache"] - before["samples_from_cache"])
    assert computed == unique  # not 2 * unique: the second asker of each (key, view) computed nothing
    assert reused == 2 * len(pairs) - unique
    for run in ("sweep-a", "sweep-b"):
        r = after["runs"][run]
        assert r["samples_requested"] == r["samples"] == len(pairs)  # nothing dropped, nothing duplicated
        assert r["samples_computed"] + r["samples_coalesced"] + r["samples_from_cache"] == len(pairs)


def test_hybrid_runs_compute_each_key_view_once_across_runs_and_epochs(epoch_shards, teacher_app, tmp_path):
    """Two hybrid runs, one view for both epochs: the pool computes each (key, view) once in all;
    epoch 2 of each run is served by the cache it appended to in epoch 1."""
    from teacher_service.cache.store import EmbeddingCache

    cache = tmp_path / "cache"
    runs = [train_cfg(epoch_shards, tmp_path / "runs", f"hybrid-{x}", "hybrid", seed=1, cache=cache, num_views=1,
                      losses={"clip": 1.0, "kl": 1.0 + i}) for i, x in enumerate("ab")]
    wanted = set(requested_pairs(runs[0]))
    before = stats(teacher_app)
    outcomes = sweep(runs, tmp_path)
    after = stats(teacher_app)

    computed = after["samples_computed"] - before["samples_computed"]
    assert computed == len(wanted)
    assert len(wanted) == STEPS * BATCH  # one view of every key
    for o in outcomes:
        hits, misses = o.metrics["teacher_cache_hits"], o.metrics["teacher_cache_misses"]
        # epoch 2 is all hits (this run's own appends); epoch 1 may already hit the other run's appends
        assert hits + misses == EPOCHS * STEPS * BATCH and misses <= STEPS * BATCH, o.metrics
    assert set(EmbeddingCache.open(str(cache)).index) == wanted


# ------------------------------------------------------------------------------------ fair share
class ClosedLoop(threading.Thread):
    """A caller that keeps `window` requests of `size` samples in flight until stopped."""

    def __init__(self, handle, run: str, weight: float, window: int, size: int = 8, image: int = 32):
        super().__init__(daemon=True)
        self.handle, self.run_name, self.weight, self.window = handle, run, weight, window
        rng = np.random.default_rng(abs(hash(run)) % 2**32)
        self.images = rng.integers(0, 255, (size, image, image, 3), dtype=np.uint8)
        self.tokens = np.zeros((size, 16), np.int64)
        self.tokens[:, 0], self.tokens[:, 1] = 49406, 49407
        self.size = size
        self.stop = threading.Event()
        self.answered = 0
        self.errors: list[BaseException] = []

    def request(self, i: int) -> EmbedRequest:
        return EmbedRequest(keys=[f"{self.run_name}-{i}-{j}" for j in range(self.size)], images=self.images,
                            tokens=self.tokens, run=self.run_name, weight=self.weight)

    def run(self) -> None:
        pending, i = [], 0
        try:
            while not self.stop.is_set() or pending:
                while not self.stop.is_set() and len(pending) < self.window:
                    pending.append(self.handle.embed.remote(self.request(i)))
                    i += 1
                pending.pop(0).result(timeout_s=120)
                self.answered += 1
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.errors.append(e)


def test_weighted_fair_share_under_contention(teacher_app):
    """Both runs always have more waiting than their share: each window (10 and 20 requests of 8
    samples) exceeds what a 64-sample batch takes from it, and their sum fits the replica's
    max_ongoing_requests (32), so every waiting request is visible to the replica's scheduler."""
    weights = {"light": 1.0, "heavy": 3.0}
    windows = {"light": 10, "heavy": 20}
    assert sum(windows.values()) <= TEACHER.serving.max_ongoing_requests
    clients = [ClosedLoop(teacher_app, run, w, window=windows[run]) for run, w in weights.items()]
    for c in clients:
        c.start()
    try:
        time.sleep(4)  # both queues full
        first = stats(teacher_app)["runs"]
        time.sleep(8)
        last = stats(teacher_app)["runs"]
    finally:
        for c in clients:
            c.stop.set()
        for c in clients:
            c.join(timeout=120)
    assert not any(c.errors for c in clients), [c.errors for c in clients]
    served = {run: last[run]["samples_computed"] - first[run]["samples_computed"] for run in weights}
    total = sum(served.values())
    assert total > 0
    print(f"fair share over 8 s: {served} samples computed, shares "
          f"{ {run: round(n / total, 3) for run, n in served.items()} }, weights {weights}")
    for run, w in weights.items():
        share, target = served[run] / total, w / sum(weights.values())
        assert abs(share - target) <= 0.1 * target, (served, weights)
    for c in clients:  # a saturated pool slowed callers down; it answered every request
        r = last.get(c.run_name, {})
        assert c.answered > 0 and r.get("errors", 0) == 0


# ------------------------------------------------------------------------------------ across replicas
def test_identical_requests_from_two_runs_meet_on_one_replica(ray_cluster):
    """Two replicas, two runs sending the same batches at once: with view-affine routing every
    (key, view) is computed once over the whole pool, and both replicas take a share of the work."""
    app = "kd-teacher-two-replicas"
    cfg = TeacherConfig(model="ViT-B-32", overrides=tiny_teacher_overrides(), torch_threads=1,
                        serving=ServingConfig(app_name=app, num_cpus=0.25, num_replicas=2, max_batch_size=64,
                                              expected_request_samples=8))
    assert cfg.serving.routing == "view_affinity"
    batches = [[f"k{b}-{j}" for j in range(8)] for b in range(24)]
    with running_app(cfg) as handle:
        clients = [Replay(handle, f"run-{x}", batches) for x in "ab"]
        for c in clients:
            c.start()
        for c in clients:
            c.join(timeout=180)
        assert not any(c.errors for c in clients) and all(len(c.answers) == len(batches) for c in clients)
        for a, b in zip(*(c.answers for c in clients)):
            np.testing.assert_array_equal(a.image_features, b.image_features)
        s = stats(handle)
    assert s["samples_computed"] == 24 * 8
    assert s["samples_coalesced"] + s["samples_from_cache"] == 24 * 8
    assert s["replicas_answered"] == 2 and all(r["batches"] > 0 for r in s["replicas"].values())


class Replay(ClosedLoop):
    """Sends `batches` (lists of keys) in order with view "ns/0", keeping a window of 4 in flight.
    Batch b's pixels are drawn from seed b: the same in every run, different between batches (the
    pool identifies samples by their pixels, so equal pixels under other keys would be shared)."""

    def __init__(self, handle, run: str, batches: list[list[str]]):
        super().__init__(handle, run, 1.0, window=4)
        self.pixels = [np.random.default_rng(b).integers(0, 255, self.images.shape, dtype=np.uint8)
                       for b in range(len(batches))]
        self.batches, self.answers = batches, []

    def run(self) -> None:
        pending = []
        try:
            for keys, images in zip(self.batches, self.pixels):
                pending.append(self.handle.embed.remote(EmbedRequest(
                    keys=keys, images=images, tokens=self.tokens, run=self.run_name, view="ns/0")))
                if len(pending) >= self.window:
                    self.answers.append(pending.pop(0).result(timeout_s=120))
            self.answers += [p.result(timeout_s=120) for p in pending]
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.errors.append(e)


# ------------------------------------------------------------------------------------ autoscaling
def running_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in status.deployments.values())


def wait_for(predicate, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.5)
    raise AssertionError(f"{what} not reached in {timeout_s:.0f} s")


def test_replicas_rise_under_load_and_fall_after(ray_cluster):
    from ray import serve

    from teacher_service.app import deploy

    app = "kd-teacher-autoscale"
    autoscaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 1,
                   "downscale_delay_s": 3, "metrics_interval_s": 0.5, "look_back_period_s": 2}
    cfg = TeacherConfig(model="ViT-B-32", overrides=tiny_teacher_overrides(), torch_threads=1,
                        serving=ServingConfig(app_name=app, num_cpus=0.25, max_batch_size=16,
                                              expected_request_samples=8, max_ongoing_requests=8,
                                              autoscaling=autoscaling))
    handle = deploy(cfg)
    try:
        handle.info.remote().result(timeout_s=120)
        assert running_replicas(app) == 1
        clients = [ClosedLoop(handle, f"load-{i}", 1.0, window=8) for i in range(2)]
        for c in clients:
            c.start()
        try:
            up = wait_for(lambda: running_replicas(app) == 2, 90, "2 replicas under load")
        finally:
            for c in clients:
                c.stop.set()
            for c in clients:
                c.join(timeout=120)
        assert not any(c.errors for c in clients)
        down = wait_for(lambda: running_replicas(app) == 1, 90, "back to 1 replica when idle")
        print(f"autoscaling: 1 -> 2 replicas {up:.1f} s after the load started, 2 -> 1 {down:.1f} s after it stopped")
    finally:
        serve.delete(app)


def test_autoscaling_config_needs_an_explicit_max_and_is_checked_by_serve():
    with pytest.raises(ValueError, match="max_replicas explicitly"):
        TeacherConfig(serving=ServingConfig(autoscaling={"min_replicas": 1}))
    with pytest.raises(ValueError, match="autoscaling"):
        TeacherConfig(serving=ServingConfig(autoscaling={"min_replicas": 3, "max_replicas": 2}))
    opts = ServingConfig(autoscaling={"min_replicas": 1, "max_replicas": 4}).serve_options()
    assert opts["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in opts
