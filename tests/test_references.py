"""Requests by reference: a teacher that reads the shards regenerates the views a student names.

Engine level (no Serve): the shard index reads what the reader reads, a request by reference is
answered exactly like the same pixels, and every way a reference can be wrong is refused naming
the sample. Student level: RemoteTeacher's auto / always / reference choices against an engine
behind a fake handle. Live: both forms over a real Serve handle on the shared cluster.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from student_trainer.config import TeacherSourceConfig
from student_trainer.data.batches import Batch, train_batches
from teacher_service.config import ServingConfig, TeacherConfig
from teacher_service.contract.augment import image_refs
from teacher_service.contract.protocol import EmbedRequest, RequestError, RequestLimits, validate_request
from teacher_service.serve.engine import TeacherEngine
from teacher_service.serve.references import ViewResolver
from teacher_service.shards import read_samples
from teacher_service.shards.index import ShardIndex, ShardIndexError
from teacher_service.shards.reader import ReaderLimits, SampleError, decode_sample
from shard_builders import good_sample, write_tar
from tiny_models import tiny_teacher_overrides

B = 8


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    from student_trainer.data.write_shards import write_digits_shards

    out = tmp_path_factory.mktemp("byref-digits")
    write_digits_shards(out, image_size=32, samples_per_shard=40)
    return out


@pytest.fixture(scope="module")
def batch(shard_dir) -> Batch:
    import open_clip

    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    return next(iter(train_batches(str(shard_dir / "train"), rank=0, world_size=1, batch_size=B, image_size=32,
                                   epoch=2, seed=5, tokenizer=tokenizer, shuffle_buffer=20)))


@pytest.fixture(scope="module")
def teacher():
    from teacher_service.model import load_teacher

    return load_teacher(TeacherConfig(overrides=tiny_teacher_overrides()))


@pytest.fixture()
def engine(teacher, shard_dir) -> TeacherEngine:
    return TeacherEngine(teacher, views=ViewResolver([str(shard_dir)]))


def by_reference(batch: Batch) -> EmbedRequest:
    refs = image_refs(batch.images, batch.origin.shards, batch.origin.view, batch.origin.recipe)
    return EmbedRequest(keys=list(batch.keys), tokens=batch.tokens, run="t", image_refs=refs)


def by_pixels(batch: Batch) -> EmbedRequest:
    return EmbedRequest(keys=list(batch.keys), images=batch.images, tokens=batch.tokens, run="t")


# ------------------------------------------------------------------------------ the shard index
def test_index_reads_every_sample_as_the_reader_does(shard_dir):
    limits = ReaderLimits()
    for shard in sorted(shard_dir.glob("train-*.tar"))[:3]:
        index = ShardIndex.build(str(shard))
        samples = list(read_samples([str(shard)]))
        assert len(index) == len(samples) and index.error is None
        for sample in samples:
            again = decode_sample(index.raw_sample(sample["__key__"], limits), limits)
            assert np.array_equal(again["image"], sample["image"]) and again["txt"] == sample["txt"]


def test_index_of_damaged_duplicate_and_compressed_shards(tmp_path):
    samples = [good_sample(i) for i in range(4)]
    data_path = tmp_path / "cut.tar"
    spans = write_tar(data_path, samples)
    data = data_path.read_bytes()
    data_path.write_bytes(data[:spans[9].header + 100])  # cut inside the 4th sample's header block
    cut = ShardIndex.build(str(data_path))
    assert sorted(cut.samples) == ["s0000", "s0001"] and cut.error  # the sample at the damage is dropped
    twice = tmp_path / "twice.tar"
    write_tar(twice, [samples[0], samples[1], samples[0]])
    with pytest.raises(SampleError, match="two separate samples"):
        ShardIndex.build(str(twice)).raw_sample("s0000", ReaderLimits())
    packed = tmp_path / "packed.tar.gz"
    packed.write_bytes(gzip.compress(data))
    with pytest.raises(ShardIndexError, match="uncompressed"):
        ShardIndex.build(str(packed))


# ------------------------------------------------------------------------------ engine level
def test_engine_answers_references_like_pixels(engine, batch):
    pixels, refs = engine.embed(by_pixels(batch)), engine.embed(by_reference(batch))
    assert refs.keys == batch.keys
    assert np.array_equal(refs.image_features, pixels.image_features)
    assert np.array_equal(refs.text_features, pixels.text_features)
    mixed = engine.embed_many([by_pixels(batch), by_reference(batch)])  # one forward, both forms
    np.testing.assert_allclose(mixed[1].image_features.astype(np.float32),
                               mixed[0].image_features.astype(np.float32), atol=0)
    assert engine.views.stats["reference_samples"] == 2 * B


def test_a_request_by_reference_is_hashed_once_and_shares_rows_with_its_pixels(engine, batch, monkeypatch):
    """The replica's coalescing identities of a request by reference are the digests its reference
    check computed: the pixels are hashed once, and the same views sent later as pixels (under
    another view name) are answered from the rows the reference request left."""
    import asyncio

    import teacher_service.serve.coalesce as coalesce
    import teacher_service.serve.references as references
    from teacher_service.contract.augment import image_sha256

    hashed: list[int] = []

    def counting(images):
        hashed.append(len(images))
        return image_sha256(images)

    monkeypatch.setattr(references, "image_sha256", counting)
    monkeypatch.setattr(coalesce, "image_sha256", counting)
    co = coalesce.Coalescer(100, logit_scale=10.0, logit_bias=None, fingerprint="fp", context_length=16)

    async def compute(part: EmbedRequest):
        return engine.embed(part)

    request, digests = engine.materialize(dataclasses.replace(by_reference(batch), view="refs"))
    assert request.image_refs is None and digests == image_sha256(batch.images)
    first, reuse = asyncio.run(co.embed(request, compute, digests))
    assert hashed == [B] and reuse.computed == B  # the check's hash, none by coalescing
    again, reuse = asyncio.run(co.embed(dataclasses.replace(by_pixels(batch), view="pixels"), compute))
    assert reuse.from_cache == B and hashed == [B, B]
    assert np.array_equal(again.image_features, first.image_features)
    with pytest.raises(ValueError, match="image digests"):
        coalesce.sample_identities(request, "fp", 16, digests[:-1])


def _wrong_digest(req, shard_dir, tmp_path):
    req.image_refs.sha256[3, 0] ^= 1
    return 3, "another SHA-256"


def _wrong_view(req, shard_dir, tmp_path):
    req.image_refs.views[:] += 1
    return 0, "another SHA-256"


def _wrong_key(req, shard_dir, tmp_path):
    req.keys[2] = "digits-nope"
    return 2, "no sample with this key"


def _missing_shard(req, shard_dir, tmp_path):
    req.image_refs.shards[0] = str(shard_dir / "train-999999.tar")
    return int(np.flatnonzero(req.image_refs.shard_index == 0)[0]), "cannot read the shard"


def _outside_roots(req, shard_dir, tmp_path):
    copy = tmp_path / "elsewhere.tar"
    shutil.copyfile(req.image_refs.shards[0], copy)
    req.image_refs.shards[0] = str(copy)
    return int(np.flatnonzero(req.image_refs.shard_index == 0)[0]), "shard_roots"


def _escaping_path(req, shard_dir, tmp_path):
    copy = tmp_path / "escape.tar"
    shutil.copyfile(req.image_refs.shards[0], copy)
    req.image_refs.shards[0] = str(shard_dir / ".." / tmp_path.name / "escape.tar")
    return int(np.flatnonzero(req.image_refs.shard_index == 0)[0]), "shard_roots"


def _relative_path(req, shard_dir, tmp_path):
    req.image_refs.shards[0] = os.path.relpath(req.image_refs.shards[0])
    return int(np.flatnonzero(req.image_refs.shard_index == 0)[0]), "absolute"


@pytest.mark.parametrize("spoil", [_wrong_digest, _wrong_view, _wrong_key, _missing_shard, _outside_roots,
                                   _escaping_path, _relative_path])
def test_wrong_references_are_refused_naming_the_sample(engine, batch, shard_dir, tmp_path, spoil):
    req = by_reference(batch)
    row, reason = spoil(req, shard_dir, tmp_path)
    with pytest.raises(RequestError, match=reason) as refused:
        engine.embed(req)
    assert repr(req.keys[row]) in str(refused.value)
    assert engine.stats["errors"] == 1 and engine.views.stats["reference_refused"] == 1
    assert engine.embed(by_reference(batch)).keys == batch.keys  # the engine serves on


def test_other_augment_version_or_no_shard_roots_are_refused(engine, teacher, batch):
    req = by_reference(batch)
    req.image_refs.recipe["version"] = "0"
    with pytest.raises(RequestError, match="version 0"):
        engine.embed(req)
    with pytest.raises(RequestError, match="shard_roots are empty"):
        TeacherEngine(teacher).embed(by_reference(batch))


def test_a_recipe_naming_the_augment_function_by_its_former_name_is_served(engine, batch):
    """A client from before augment.py moved names the same function as "teacher_service.views.augment_view"."""
    req = by_reference(batch)
    req.image_refs.recipe["function"] = "teacher_service.views.augment_view"
    assert engine.embed(req).keys == batch.keys
    req.image_refs.recipe["function"] = "elsewhere.augment_view"
    with pytest.raises(RequestError, match="views made by elsewhere.augment_view"):
        engine.embed(req)


def test_validation_of_references(batch):
    limits = RequestLimits()
    ok = by_reference(batch)
    validate_request(ok, limits)
    cases = [
        (dict(images=batch.images), "not both"),
        (dict(image_refs=dataclasses.replace(ok.image_refs, sha256=ok.image_refs.sha256[:, :16])), "sha256"),
        (dict(image_refs=dataclasses.replace(ok.image_refs, shard_index=ok.image_refs.shard_index + 99)),
         "shard_index"),
        (dict(image_refs=dataclasses.replace(ok.image_refs, views=ok.image_refs.views[:2])), "views"),
        (dict(image_refs=dataclasses.replace(ok.image_refs, recipe={**ok.image_refs.recipe, "image_size": 0})),
         "image_size"),
        (dict(image_refs=dataclasses.replace(ok.image_refs, shards=[])), "shards"),
    ]
    for change, field in cases:
        with pytest.raises(RequestError, match=field):
            validate_request(dataclasses.replace(ok, **change), limits)


def test_resolver_caches_samples_and_notices_rewritten_shards(engine, batch, shard_dir):
    views = engine.views
    engine.embed(by_reference(batch))
    builds, hits = views.stats["reference_index_builds"], views.stats["reference_image_cache_hits"]
    engine.embed(by_reference(batch))
    assert views.stats["reference_index_builds"] == builds and views.stats["reference_image_cache_hits"] == hits + B
    shard = batch.origin.shards[0]
    stat = os.stat(shard)
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # "rewritten": a new index is built
    engine.embed(by_reference(batch))
    assert views.stats["reference_index_builds"] == builds + 1
    missing = str(shard_dir / "train-999999.tar")
    answer = views.check_shards([shard, missing], [stat.st_size, 10])
    assert answer[shard] == "" and "cannot read" in answer[missing]
    assert "bytes" in views.check_shards([shard], [stat.st_size + 1])[shard]


def test_grpc_codec_keeps_references(batch):
    from teacher_service.grpc.codec import decode_embed_request, encode_embed_request

    req = by_reference(batch)
    back = decode_embed_request(encode_embed_request(req))
    assert back.images is None and back.keys == req.keys
    for name in ("shard_index", "views", "sha256"):
        assert np.array_equal(getattr(back.image_refs, name), getattr(req.image_refs, name))
    assert back.image_refs.shards == req.image_refs.shards and back.image_refs.recipe == req.image_refs.recipe


# ------------------------------------------------------------------------------ the student's side
class _Pending:
    def __init__(self, call):
        self.call = call

    def result(self, timeout_s=None):
        return self.call()

    def cancel(self):
        pass


class _Method:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return _Pending(lambda: self.fn(*args))


class EngineHandle:
    """A Serve handle stand-in answering with a real engine (references resolved in it)."""

    def __init__(self, engine: TeacherEngine, by_reference: bool = True):
        self.engine, self.sent = engine, []
        info = {**engine.teacher.info(), "by_reference": by_reference}
        self.info = _Method(lambda: info)
        self.embed = _Method(self._embed)
        self.check_shards = _Method(lambda paths, sizes: engine.views.check_shards(paths, sizes))

    def _embed(self, request):
        self.sent.append(request)
        return self.engine.embed(request)


def remote_source(monkeypatch, handle, send_pixels: str):
    import teacher_service.app as app
    from student_trainer.teacher.sources import RemoteTeacher

    monkeypatch.setattr(app, "get_teacher_handle", lambda name, timeout_s=None: handle)
    return RemoteTeacher(TeacherSourceConfig(mode="remote", send_pixels=send_pixels, retries=0, patience_s=0,
                                             prefetch=1), run="r")


def test_remote_source_sends_references_and_falls_back_to_pixels(monkeypatch, engine, teacher, batch):
    handle = EngineHandle(engine)
    auto = remote_source(monkeypatch, handle, "auto")
    expected = engine.embed(by_pixels(batch))
    out = [o for _, o in auto.stream([batch, batch])]
    assert all(r.image_refs is not None and r.images is None for r in handle.sent)
    assert all(np.array_equal(o.image_features, expected.image_features) for o in out)
    assert auto.stats.samples_by_reference == 2 * B
    handle.engine = TeacherEngine(teacher, views=ViewResolver(["/nonexistent-root"]))  # the pool loses the shards
    out = [o for _, o in auto.stream([batch, batch, batch])]
    assert all(np.array_equal(o.image_features, expected.image_features) for o in out)
    sent = handle.sent[2:]
    assert sent[-1].image_refs is None and sent[-1].images is not None  # pixels from the refusal on
    assert auto.stats.samples_by_reference == 2 * B


def test_remote_source_always_and_reference(monkeypatch, engine, batch):
    handle = EngineHandle(engine)
    list(remote_source(monkeypatch, handle, "always").stream([batch]))
    assert handle.sent[-1].image_refs is None
    list(remote_source(monkeypatch, handle, "reference").stream([batch]))
    assert handle.sent[-1].image_refs is not None
    with pytest.raises(ValueError, match="reads no shards"):
        remote_source(monkeypatch, EngineHandle(engine, by_reference=False), "reference")
    assert all(r.image_refs is None for r in _sent_by(monkeypatch, EngineHandle(engine, by_reference=False), batch))


def _sent_by(monkeypatch, handle, batch) -> list:
    list(remote_source(monkeypatch, handle, "auto").stream([batch]))
    return handle.sent


# ------------------------------------------------------------------------------ live, over Serve
@pytest.mark.ray
def test_both_forms_answer_alike_over_serve(ray_cluster, shard_dir, batch):
    import ray

    from tiny_models import running_app
    import teacher_service.serve.engine as engine_module

    @ray.remote
    def module_file() -> str:
        import teacher_service.serve.engine as m

        return m.__file__

    assert ray.get(module_file.remote()) == engine_module.__file__  # workers import this checkout
    cfg = TeacherConfig(overrides=tiny_teacher_overrides(), torch_threads=1,
                        serving=ServingConfig(app_name="kd-teacher-byref", num_cpus=0.5, max_batch_size=64,
                                              expected_request_samples=B, shard_roots=[str(shard_dir)]))
    with running_app(cfg) as handle:
        assert handle.info.remote().result(timeout_s=60)["by_reference"] is True
        pixels = handle.embed.remote(by_pixels(batch)).result(timeout_s=60)
        refs = handle.embed.remote(by_reference(batch)).result(timeout_s=60)
        np.testing.assert_allclose(refs.image_features.astype(np.float32),
                                   pixels.image_features.astype(np.float32), atol=2e-3)
        bad = by_reference(batch)
        bad.image_refs.sha256[5, 7] ^= 0xFF
        with pytest.raises(Exception, match=repr(batch.keys[5])) as refused:
            handle.embed.remote(bad).result(timeout_s=60)
        assert isinstance(refused.value, RequestError) or "RequestError" in type(refused.value).__name__
        shard = batch.origin.shards[0]
        assert handle.check_shards.remote([shard], [os.path.getsize(shard)]).result(timeout_s=60) == {shard: ""}
        stats = handle.stats.remote().result(timeout_s=60)
        assert stats["reference_samples"] == B and stats["reference_refused"] == 1
        assert stats["errors_invalid"] == 1
