"""Training from the embedding cache on the shared local Ray cluster.

`cache` mode trains with no teacher app at all; `hybrid` mode sends only misses to the Serve
pool, appends them, and serves them from the cache afterwards (later batches/epochs with the same
view, and the next run) — counted with the source's metrics and the app's own counters. In
training the view id is the epoch, so epoch 2 of a run meets new views; what epoch 1 appended is
served to every later run (and to any epoch that repeats a view).
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from tiny_models import shared_teacher, train_shards

from student_trainer.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    TeacherSourceConfig,
    TrainConfig,
)
from teacher_service.cache.store import (
    APPEND_PREFIX,
    CacheMismatchError,
    CacheMissError,
    EmbeddingCache,
    compact,
    teacher_dir,
)
from teacher_service.contract.augment import view_recipe

pytestmark = pytest.mark.ray

BATCH = 16
STEPS = 3
TEACHER = shared_teacher()  # the session's app (tiny_teacher_app) for hybrid, an actor of its own for precompute
APP = TEACHER.serving.app_name


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """Two train shards of 100 digits, as a brace spec (what a user passes to kd train)."""
    return train_shards(tmp_path_factory)


@pytest.fixture(scope="module")
def precomputed(ray_cluster, shards, tmp_path_factory) -> Path:
    """Views 0 and 1 (epochs 0 and 1) of both shards, computed by a local teacher actor."""
    from teacher_service.shards import resolve_shards
    from teacher_service.cache.precompute import precompute

    out = tmp_path_factory.mktemp("cache")
    precompute(resolve_shards(shards), str(out), views=2, teacher=TEACHER, seed=0, image_size=32,
               num_cpus=0.5, batch_size=50, progress=False)
    return out


def train_cfg(shards: str, storage: Path, run: str, mode: str, cache: Path, epochs: int) -> TrainConfig:
    return TrainConfig(
        run_name=run, storage_path=str(storage), model=ModelConfig(name="digits-student"),
        data=DataConfig(train_shards=shards, image_size=32, batch_size=BATCH, shuffle_buffer=50),
        teacher=TeacherSourceConfig(mode=mode, cache_path=str(cache), app_name=APP, timeout_s=60.0, retries=1),
        losses={"clip": 1.0, "kl": 1.0, "fd": 100.0}, optim=OptimConfig(lr=1e-3, warmup_steps=1),
        epochs=epochs, max_steps_per_epoch=STEPS, num_workers=1, cpus_per_worker=1, torch_threads=1,
        log_every_steps=0, seed=0)


def epoch_batches(shards: str, epoch: int, n: int = STEPS):
    from student_trainer.config import ModelConfig as MC
    from student_trainer.data.batches import train_batches
    from teacher_service.shards import resolve_shards
    from student_trainer.factory import create_student, create_tokenizer

    tokenizer = create_tokenizer(create_student(MC(name="digits-student")), MC(name="digits-student"))
    batches = train_batches(resolve_shards(shards), rank=0, world_size=1, batch_size=BATCH, image_size=32,
                            epoch=epoch, seed=0, tokenizer=tokenizer, shuffle_buffer=50)
    return [b for _, b in zip(range(n), batches)]


# ---------------------------------------------------------------------------------------------
# cache mode: no teacher anywhere


def test_cache_mode_trains_with_no_teacher_running(ray_cluster, shards, precomputed, tmp_path):
    from ray import serve

    from student_trainer.train import run_training

    cfg = train_cfg(shards, tmp_path, "cache-run", "cache", precomputed, epochs=2)
    cfg.teacher.app_name = "kd-teacher-never-deployed"  # the module's app may run: this run's never does
    assert cfg.teacher.app_name not in serve.status().applications  # nothing to fall back on
    result = run_training(cfg)
    m = result.metrics
    assert m["teacher_mode"] == "cache" and m["epoch"] == 2
    assert m["teacher_fingerprint"] == EmbeddingCache.open(str(precomputed)).fingerprint
    assert m["teacher_requests"] == 0 and m["teacher_samples"] == 0  # counters are cumulative per worker
    assert m["teacher_cache_hits"] == 2 * STEPS * BATCH and m["teacher_cache_misses"] == 0
    assert np.isfinite(m["loss"]) and m["kl_loss"] > 0 and m["fd_loss"] > 0


def test_cache_source_serves_exact_rows_and_refuses_misses(shards, precomputed):
    from student_trainer.teacher.sources import CachedTeacher, make_teacher_source

    cfg = TeacherSourceConfig(mode="cache", cache_path=str(precomputed))
    source = make_teacher_source(cfg, run="unit", recipe=view_recipe(32, 0))
    assert isinstance(source, CachedTeacher) and source.embed_dim == 48
    batches = epoch_batches(shards, 1, n=2)
    outs = list(source.stream(batches, view=1))
    cache = EmbeddingCache.open(str(precomputed))
    want = cache.fetch(cache.locate(batches[1].keys, 1))
    np.testing.assert_array_equal(outs[1][1].image_features, want["image_emb"])
    assert outs[1][1].logit_scale == pytest.approx(cache.meta["teacher"]["logit_scale"])
    assert source.stats.cache.hits == 2 * BATCH and source.stats.requests == 0
    # the epoch-1 pixels looked up as view 0: digests catch it instead of serving wrong targets
    with pytest.raises(CacheMismatchError, match="other pixels"):
        next(source.stream(batches, view=0))
    # a view nobody precomputed stops the run, naming the sample, the view and the cache
    epoch2 = epoch_batches(shards, 2, n=1)
    with pytest.raises(CacheMissError, match=rf"no view 2 of sample '{epoch2[0].keys[0]}'.*--views 3") as err:
        next(source.stream(epoch2, view=2))
    assert str(precomputed) in str(err.value)
    with pytest.raises(CacheMismatchError, match="seed 0 vs 5"):
        make_teacher_source(cfg, run="unit", recipe=view_recipe(32, 5))
    # by default a sample of each batch's hits is verified; verify_rows=None checks every row
    strict = CachedTeacher(cfg, run="unit", verify_rows=None)
    seg, row = strict.cache.index[(batches[0].keys[5], 1)]
    segment = strict.cache.segments[seg]
    segment.image_digest = segment.image_digest.copy()
    segment.image_digest[row] ^= np.uint64(1)  # one row of 16 now claims other pixels
    with pytest.raises(CacheMismatchError, match=f"view 1 of sample '{batches[0].keys[5]}' \\(1 of 16"):
        next(strict.stream(batches, view=1))


# ---------------------------------------------------------------------------------------------
# hybrid mode: misses from the pool, appended, then served from the cache


@pytest.fixture(scope="module")
def teacher_app(tiny_teacher_app):
    """The session's shared app: the tests below count its samples by differences."""
    return tiny_teacher_app


def app_samples(handle) -> int:
    return int(handle.stats.remote().result(timeout_s=30)["samples"])


@pytest.fixture
def hybrid_cache(shards, teacher_app, tmp_path) -> Path:
    """A hybrid cache as the runs of the next test leave it: epoch 0's views, and one batch of epoch 1's."""
    from student_trainer.teacher.sources import make_teacher_source

    cfg = TeacherSourceConfig(mode="hybrid", cache_path=str(tmp_path / "hybrid"), app_name=APP, prefetch=2)
    list(make_teacher_source(cfg, run="fill", recipe=view_recipe(32, 0)).stream(epoch_batches(shards, 0), view=0))
    list(make_teacher_source(cfg, run="rerun", recipe=view_recipe(32, 0)).stream(epoch_batches(shards, 1, n=1),
                                                                                 view=1))
    return tmp_path / "hybrid"


def test_hybrid_fills_then_serves_repeated_views_from_cache(shards, teacher_app, tmp_path):
    from student_trainer.teacher.sources import HybridTeacher, make_teacher_source

    hybrid_cache = tmp_path / "cache"
    cfg = TeacherSourceConfig(mode="hybrid", cache_path=str(hybrid_cache), app_name=APP, prefetch=2)
    source = make_teacher_source(cfg, run="fill", recipe=view_recipe(32, 0))
    assert isinstance(source, HybridTeacher)
    batches = epoch_batches(shards, 0)
    start = app_samples(teacher_app)
    first = list(source.stream(batches, view=0))
    assert source.stats.requests == STEPS and app_samples(teacher_app) - start == STEPS * BATCH
    assert source.stats.cache.misses == STEPS * BATCH and source.stats.cache.appends == STEPS * BATCH
    files = [f for f in os.listdir(teacher_dir(str(hybrid_cache))) if f.startswith(APPEND_PREFIX)]
    assert len(files) == 1 and files[0].startswith(f"{APPEND_PREFIX}fill-0-")  # flushed at stream end
    # the same view again (the next epoch of a run whose views repeat): no teacher call at all
    second = list(source.stream(batches, view=0))
    assert source.stats.requests == STEPS and app_samples(teacher_app) - start == STEPS * BATCH
    assert source.stats.cache.hits == STEPS * BATCH
    for (_, a), (_, b) in zip(first, second):
        np.testing.assert_array_equal(a.image_features, b.image_features)
        np.testing.assert_array_equal(a.text_features, b.text_features)
    # the next run finds them on disk; a new view goes to the pool
    rerun = make_teacher_source(cfg, run="rerun", recipe=view_recipe(32, 0))
    list(rerun.stream(batches, view=0))
    list(rerun.stream(epoch_batches(shards, 1, n=1), view=1))
    assert rerun.stats.cache.hits == STEPS * BATCH and rerun.stats.cache.misses == BATCH
    assert rerun.stats.requests == 1 and app_samples(teacher_app) - start == (STEPS + 1) * BATCH
    assert len(EmbeddingCache.open(str(hybrid_cache))) == (STEPS + 1) * BATCH


def test_hybrid_refuses_a_cache_of_another_teacher(precomputed, teacher_app, tmp_path):
    import pyarrow.parquet as pq

    from student_trainer.teacher.sources import make_teacher_source
    from teacher_service.cache.store import META_KEY, read_meta, write_table_atomic

    other = tmp_path / "other"
    other.mkdir()
    src = os.path.join(teacher_dir(str(precomputed)), "train-000000.parquet")
    meta = read_meta(src)
    fake = "0123456789abcdef"
    meta = {**meta, "fingerprint": fake, "teacher": {**meta["teacher"], "fingerprint": fake}}
    table = pq.read_table(src).replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
    write_table_atomic(table, str(other / "train-000000.parquet"))
    live = teacher_app.info.remote().result(timeout_s=30)["fingerprint"]
    cfg = TeacherSourceConfig(mode="hybrid", cache_path=str(other), app_name=APP)
    with pytest.raises(CacheMismatchError, match=f"{fake}.*{live}"):
        make_teacher_source(cfg, run="x")


def test_concurrent_hybrid_runs_append_without_loss_or_duplicates(shards, teacher_app, tmp_path):
    """Two runs missing the same keys at once both append; readers serve each (key, view) once."""
    from student_trainer.teacher.sources import make_teacher_source

    cfg = TeacherSourceConfig(mode="hybrid", cache_path=str(tmp_path / "shared"), app_name=APP)
    batches = epoch_batches(shards, 0)
    outputs: dict[str, list] = {}
    errors: list[BaseException] = []

    def run(name: str, subset: list) -> None:
        try:
            source = make_teacher_source(cfg, run=name, recipe=view_recipe(32, 0))
            outputs[name] = list(source.stream(subset, view=0))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=("a", batches)), threading.Thread(target=run, args=("b", batches[1:]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    cache = EmbeddingCache.open(str(tmp_path / "shared"))
    keys = [k for b in batches for k in b.keys]
    assert len(cache) == len(keys) and set(cache.index) == {(k, 0) for k in keys}
    assert cache.duplicates <= 2 * BATCH  # run b's rows may repeat run a's on disk, never in what is served
    rows = cache.fetch(cache.locate(keys, 0))
    served = np.concatenate([o.image_features for _, o in outputs["a"]])
    np.testing.assert_allclose(rows["image_emb"].astype(np.float32), served.astype(np.float32), atol=2e-3)
    report = compact(str(tmp_path / "shared"))
    assert report.rows_written == len(keys) and report.duplicates_dropped == cache.duplicates
    assert EmbeddingCache.open(str(tmp_path / "shared")).duplicates == 0


def test_hybrid_asks_and_appends_in_its_answer_dtype(shards, teacher_app, tmp_path):
    """A run asking for int8: its misses come back int8 and go to the cache as int8; a later run
    that names no dtype asks in the cache's, and one naming another dtype is refused."""
    from student_trainer.teacher.sources import make_teacher_source
    from teacher_service.cache.store import read_meta
    from teacher_service.contract.protocol import EmbedRequest

    cfg = TeacherSourceConfig(mode="hybrid", cache_path=str(tmp_path / "int8"), app_name=APP, answer_dtype="int8")
    (batch,) = epoch_batches(shards, 0, n=1)
    (_, got), = list(make_teacher_source(cfg, run="int8", recipe=view_recipe(32, 0)).stream([batch], view=0))
    full = teacher_app.embed.remote(EmbedRequest(keys=batch.keys, images=batch.images, tokens=batch.tokens,
                                                 answer_dtype="fp16")).result(timeout_s=60)
    for name in ("image_features", "text_features"):  # within int8's half step (<= 1/254) of the fp16 rows
        assert getattr(got, name).dtype == np.float32
        assert np.abs(getattr(got, name) - getattr(full, name).astype(np.float32)).max() <= 1 / 254 + 2e-3
    (append,) = [f for f in os.listdir(teacher_dir(str(tmp_path / "int8"))) if f.startswith(APPEND_PREFIX)]
    assert read_meta(os.path.join(teacher_dir(str(tmp_path / "int8")), append))["dtype"] == "int8"
    cache = EmbeddingCache.open(str(tmp_path / "int8"))
    np.testing.assert_allclose(cache.fetch(cache.locate(batch.keys, 0))["image_emb"], got.image_features, atol=1e-6)
    later = make_teacher_source(TeacherSourceConfig(mode="hybrid", cache_path=str(tmp_path / "int8"), app_name=APP),
                                run="later", recipe=view_recipe(32, 0))
    assert later.remote.answer_dtype == "int8" and later.appender.meta["dtype"] == "int8"
    with pytest.raises(CacheMismatchError, match="stores its rows in int8, but .* writes fp16"):
        make_teacher_source(TeacherSourceConfig(mode="hybrid", cache_path=str(tmp_path / "int8"), app_name=APP,
                                                answer_dtype="fp16"), run="other")


def test_hybrid_training_serves_hits_and_appends_misses(shards, teacher_app, hybrid_cache, tmp_path):
    """A 2-epoch hybrid run: what earlier runs appended is served (no teacher call), the rest is
    computed by the pool once and appended, so the cache then holds both epochs' views."""
    from student_trainer.train import run_training

    wanted = [(k, epoch) for epoch in (0, 1) for b in epoch_batches(shards, epoch) for k in b.keys]
    before = EmbeddingCache.open(str(hybrid_cache), create=True, teacher_info=teacher_app.info.remote().result())
    hits = sum(pair in before for pair in wanted)
    assert 0 < hits < len(wanted)  # the fixture left epoch 0 and part of epoch 1
    start = app_samples(teacher_app)
    m = run_training(train_cfg(shards, tmp_path, "hybrid-train", "hybrid", hybrid_cache, epochs=2)).metrics
    misses = len(wanted) - hits
    assert m["teacher_cache_hits"] == hits and m["teacher_cache_misses"] == misses  # cumulative, both epochs
    assert m["teacher_cache_appends"] == misses and m["teacher_samples"] == misses
    assert app_samples(teacher_app) - start == misses  # the pool computed only the misses
    after = EmbeddingCache.open(str(hybrid_cache))
    assert all(pair in after for pair in wanted) and len(after) == len(before) + misses
    assert np.isfinite(m["loss"]) and m["teacher_fingerprint"] == after.fingerprint


def test_hybrid_epoch_two_is_served_entirely_from_what_epoch_one_appended(shards, teacher_app, tmp_path):
    """With one view per sample (data.num_views=1) every epoch trains on view 0: epoch 1 misses and
    appends everything, epoch 2 is all hits and the pool computes nothing more."""
    from student_trainer.train import run_training

    cfg = train_cfg(shards, tmp_path, "hybrid-one-view", "hybrid", tmp_path / "cache", epochs=2)
    cfg.data.num_views = 1
    # whole epochs (200 samples = 10 batches of 20), so both epochs meet exactly the same samples
    cfg.data.batch_size, cfg.max_steps_per_epoch = 20, None
    start = app_samples(teacher_app)
    m = run_training(cfg).metrics  # counters are cumulative over both epochs
    per_epoch = 200
    assert m["epoch"] == 2
    assert m["teacher_cache_misses"] == per_epoch and m["teacher_cache_appends"] == per_epoch  # epoch 1
    assert m["teacher_cache_hits"] == per_epoch  # epoch 2: every sample from the cache
    assert m["teacher_samples"] == per_epoch and app_samples(teacher_app) - start == per_epoch
    assert len(EmbeddingCache.open(str(tmp_path / "cache"))) == per_epoch  # view 0 only, no duplicates
