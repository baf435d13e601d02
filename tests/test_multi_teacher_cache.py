"""Several teachers in one embedding cache root (issue 17): `kd precompute` with two tiny teachers of
different widths and depths writes each one's rows under its fingerprint; each teacher's rows are
that teacher's forward on the student's pixels (checked against the teacher loaded here, not through
the cache code); `kd cache info/audit/compact` go over both, an audit flags only the teacher whose
rows were tampered with; a cache-mode ensemble trains from the one root; a reader that does not say
which teacher it wants is refused naming them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from tiny_models import tiny_teacher_overrides, train_shards

from student_trainer.config import DataConfig, ModelConfig, OptimConfig, TeacherSourceConfig, TrainConfig
from teacher_service.cache.store import (
    TEACHERS_DIR,
    CacheAmbiguousError,
    CacheAppender,
    CacheMismatchError,
    EmbeddingCache,
    cache_teachers,
    column_matrix,
    read_centroids,
    read_meta,
    rows_table,
    write_table_atomic,
)
from teacher_service.config import ServingConfig, TeacherConfig

pytestmark = pytest.mark.ray

BATCH, STEPS = 16, 3


def _narrow_overrides() -> dict:
    """Another architecture than the wide teacher: 32 wide embeddings, one vision block."""
    overrides = tiny_teacher_overrides(32)
    overrides["vision_cfg"]["layers"] = 1
    return overrides


TEACHERS = {"wide": TeacherConfig(model="ViT-B-32", overrides=tiny_teacher_overrides(48), torch_threads=1,
                                  serving=ServingConfig(num_cpus=0.5)),
            "narrow": TeacherConfig(model="ViT-B-32", overrides=_narrow_overrides(), torch_threads=1,
                                    serving=ServingConfig(num_cpus=0.5))}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return train_shards(tmp_path_factory, name="digits-multicache")


@pytest.fixture(scope="module")
def engines():
    from teacher_service.model import load_teacher
    from teacher_service.serve.engine import TeacherEngine

    return {name: TeacherEngine(load_teacher(cfg)) for name, cfg in TEACHERS.items()}


@pytest.fixture(scope="module")
def fingerprints(engines) -> dict[str, str]:
    return {name: engine.teacher.fingerprint for name, engine in engines.items()}


def _precompute(root: Path, shards: str, yamls: list[Path], *extra: str) -> None:
    from cluster.cli import main

    argv = ["precompute", "--shards", shards, "--out", str(root), "--views", "1", "--seed", "0",
            "--batch-size", "50", "--num-cpus", "0.5", "--json", *extra]
    for path in yamls:
        argv += ["--teacher-config", str(path)]
    assert main(argv) == 0


@pytest.fixture(scope="module")
def root(ray_cluster, shards, tmp_path_factory) -> Path:
    """Both teachers precomputed into one root by one `kd precompute` (views 0, seed 0)."""
    work = tmp_path_factory.mktemp("multicache")
    yamls = []
    for name, cfg in TEACHERS.items():
        cfg.to_yaml(work / f"{name}.yaml")
        yamls.append(work / f"{name}.yaml")
    _precompute(work / "cache", shards, yamls)
    return work / "cache"


def test_each_teacher_has_its_own_rows_under_its_fingerprint(root, fingerprints):
    teachers = cache_teachers(str(root))
    assert sorted(teachers) == sorted(fingerprints.values())
    for name, fp in fingerprints.items():
        assert teachers[fp] == str(root / TEACHERS_DIR / fp)
        assert sorted(p.name for p in Path(teachers[fp]).iterdir()) == ["train-000000.parquet", "train-000001.parquet"]
        meta = read_meta(str(Path(teachers[fp]) / "train-000000.parquet"))
        assert meta["fingerprint"] == fp and meta["teacher_config"] == TEACHERS[name].replica_dict()
    widths = {fp: EmbeddingCache.open(str(root), teacher=fp).embed_dim for fp in teachers}
    assert widths == {fingerprints["wide"]: 48, fingerprints["narrow"]: 32}


def test_each_teachers_rows_are_its_forward_on_the_students_pixels(root, shards, engines, fingerprints):
    """The rows of each teacher against that teacher loaded here, on the batches training yields."""
    from student_trainer.data.batches import train_batches
    from student_trainer.factory import create_student, create_tokenizer
    from teacher_service.contract.protocol import EmbedRequest
    from teacher_service.shards import resolve_shards

    student = ModelConfig(name="digits-student")
    tokenizer = create_tokenizer(create_student(student), student)
    batch = next(iter(train_batches(resolve_shards(shards), rank=0, world_size=1, batch_size=24, image_size=32,
                                    epoch=0, seed=0, tokenizer=tokenizer, shuffle_buffer=50)))
    for name, engine in engines.items():
        rows_dir = root / TEACHERS_DIR / fingerprints[name]
        tables = [pq.read_table(p) for p in sorted(rows_dir.glob("*.parquet"))]  # plain Parquet, no cache code
        where = {k: (t, i) for t in tables for i, k in enumerate(t.column("key").to_pylist())}
        image = np.stack([column_matrix(where[k][0], "image_emb")[where[k][1]] for k in batch.keys])
        text = np.stack([column_matrix(where[k][0], "text_emb")[where[k][1]] for k in batch.keys])
        live = engine.embed(EmbedRequest(keys=batch.keys, images=batch.images, tokens=batch.tokens))
        assert image.shape[1] == live.image_features.shape[1] == {"wide": 48, "narrow": 32}[name]
        np.testing.assert_allclose(image.astype(np.float32), live.image_features.astype(np.float32), atol=2e-3)
        np.testing.assert_allclose(text.astype(np.float32), live.text_features.astype(np.float32), atol=2e-3)


def test_rerun_skips_each_teachers_done_shards_and_writes_centroids_per_teacher(root, shards, fingerprints,
                                                                                tmp_path, capsys):
    yamls = [root.parent / f"{name}.yaml" for name in TEACHERS]
    rerun = tmp_path / "cache"
    shutil.copytree(root, rerun)  # the centroids it writes stay out of the module's root
    capsys.readouterr()
    _precompute(rerun, shards, yamls)
    again = json.loads(capsys.readouterr().out)
    assert sorted(again) == sorted(fingerprints.values())
    assert all(r["computed"] == [] and len(r["skipped"]) == 2 for r in again.values())
    _precompute(rerun, shards, yamls, "--class-centroids", "2")
    capsys.readouterr()
    for name, fp in fingerprints.items():
        centroids, meta = read_centroids(str(rerun), fingerprint=fp)
        assert centroids.shape == (10, {"wide": 48, "narrow": 32}[name]) and meta["fingerprint"] == fp


def test_info_audit_and_compact_go_over_every_teacher(root, fingerprints, capsys):
    from cluster.cli import main

    capsys.readouterr()
    assert main(["cache", "info", str(root), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {fp: (i["rows"], i["embed_dim"]) for fp, i in info.items()} == {
        fingerprints["wide"]: (200, 48), fingerprints["narrow"]: (200, 32)}
    assert main(["cache", "audit", str(root), "--samples", "12", "--json"]) == 0  # each from its recorded config
    audit = json.loads(capsys.readouterr().out)
    assert sorted(audit) == sorted(fingerprints.values()) and all(r["ok"] and r["rows"] == 12 for r in audit.values())
    assert main(["cache", "compact", str(root), "--json"]) == 0
    assert {fp: r["merged_files"] for fp, r in json.loads(capsys.readouterr().out).items()} == {
        fp: 0 for fp in fingerprints.values()}


def test_an_audit_flags_only_the_teacher_whose_rows_are_wrong(root, fingerprints, tmp_path, capsys):
    from cluster.cli import main

    bad = tmp_path / "tampered"
    shutil.copytree(root, bad)
    path = str(bad / TEACHERS_DIR / fingerprints["narrow"] / "train-000000.parquet")
    table, meta = pq.read_table(path), read_meta(path)
    image = column_matrix(table, "image_emb")[::-1]  # every row now holds another row's embedding
    write_table_atomic(rows_table(meta, table.column("key").to_pylist(), table.column("view").to_numpy(), image,
                                  column_matrix(table, "text_emb"), table.column("image_digest").to_numpy(),
                                  table.column("text_digest").to_numpy()), path)
    capsys.readouterr()
    assert main(["cache", "audit", str(bad), "--samples", "40", "--seed", "2", "--json"]) == 1
    captured = capsys.readouterr()
    audit = json.loads(captured.out)
    assert audit[fingerprints["wide"]]["ok"] and not audit[fingerprints["narrow"]]["ok"]
    assert f"FAILED for teacher {fingerprints['narrow']}" in captured.err and fingerprints["wide"] not in captured.err


def test_a_reader_that_names_no_teacher_is_refused_naming_them(root, shards, fingerprints, tmp_path):
    from student_trainer.preflight import check_run

    listed = ".*".join(sorted(fingerprints.values()))
    with pytest.raises(CacheAmbiguousError, match=f"holds 2 teachers: {listed}"):
        EmbeddingCache.open(str(root))
    with pytest.raises(CacheAmbiguousError, match="2 teachers of model 'ViT-B-32'"):
        EmbeddingCache.open(str(root), teacher="ViT-B-32")  # both are ViT-B-32 with other overrides
    with pytest.raises(CacheMismatchError, match=f"{listed}.*'0123456789abcdef'"):
        EmbeddingCache.open(str(root), teacher="0123456789abcdef")
    # a run in cache mode on the shared root: refused on the driver, before any worker starts
    cfg = _run_cfg(shards, tmp_path, "ambiguous", TeacherSourceConfig(mode="cache", cache_path=str(root)))
    with pytest.raises(CacheAmbiguousError, match=f"{listed}.*teacher.cache_teacher"):
        check_run(cfg)


def test_a_hybrid_teacher_new_to_the_root_appends_beside_the_others(root, tmp_path):
    """What a hybrid source does on a miss (open with its app's info, create; append): its own directory."""
    from teacher_service.contract.augment import view_recipe

    shared = tmp_path / "shared"
    shutil.copytree(root, shared)
    wide = EmbeddingCache.open(str(shared), teacher=next(iter(cache_teachers(str(root)))))
    info = {**wide.meta["teacher"], "fingerprint": "fedcba9876543210"}
    cache = EmbeddingCache.open(str(shared), teacher_info=info, recipe=view_recipe(32, 0), create=True)
    assert cache.path == str(shared / TEACHERS_DIR / "fedcba9876543210") and len(cache) == 0
    appender = CacheAppender(cache.path, cache.meta, run="hybrid")
    dim = cache.embed_dim
    appender.add(["k-1"], 0, np.ones((1, dim)), np.ones((1, dim)), np.ones(1, np.uint64), np.ones(1, np.uint64))
    appender.flush()
    assert len(cache_teachers(str(shared))) == 3
    assert len(EmbeddingCache.open(str(shared), teacher="fedcba9876543210")) == 1


def _run_cfg(shards: str, storage: Path, run: str, teacher: TeacherSourceConfig) -> TrainConfig:
    return TrainConfig(
        run_name=run, storage_path=str(storage), model=ModelConfig(name="digits-student"),
        data=DataConfig(train_shards=shards, image_size=32, batch_size=BATCH, shuffle_buffer=50, num_views=1),
        teacher=teacher, losses={"clip": 1.0, "kl": 1.0, "fd": 100.0}, optim=OptimConfig(lr=1e-3, warmup_steps=1),
        epochs=1, max_steps_per_epoch=STEPS, num_workers=1, cpus_per_worker=1, torch_threads=1,
        log_every_steps=0, seed=0)


def test_a_cache_ensemble_trains_from_one_root(root, shards, fingerprints, tmp_path):
    from student_trainer.checkpoint import PROVENANCE_FILE
    from student_trainer.train import run_training

    sources = [{"name": "wide", "cache_teacher": fingerprints["wide"]},
               {"name": "narrow", "cache_teacher": fingerprints["narrow"]}]
    cfg = _run_cfg(shards, tmp_path / "runs", "multicache-run",
                   TeacherSourceConfig(mode="cache", cache_path=str(root), sources=sources))
    result = run_training(cfg)
    metrics = result.metrics
    assert np.isfinite(metrics["loss"]) and metrics["teacher_mode"] == "ensemble"
    assert metrics["teacher_cache_hits"] == 2 * STEPS * BATCH and metrics["teacher_cache_misses"] == 0
    record = json.loads((Path(result.checkpoint.path) / PROVENANCE_FILE).read_text())
    assert [(t["name"], t["fingerprint"], t["cache_teacher"]) for t in record["teachers"]] == [
        ("wide", fingerprints["wide"], fingerprints["wide"]), ("narrow", fingerprints["narrow"], fingerprints["narrow"])]
