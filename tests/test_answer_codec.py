"""Compressed answers (issue 29 item 5): the fp16 / bf16 / int8 codec, its bounds and bytes, the fp16
path unchanged bit for bit, and the dtype carried by the config, the request, the gRPC wire and the cache.

No Ray here: the pool (a mixed-dtype pool computing each sample once) is tested in test_deployment.py,
a gRPC client asking a deployed pool for int8 in test_grpc.py, precompute and hybrid appends in
test_precompute.py and test_cache_training.py.
"""
from __future__ import annotations

import asyncio
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from teacher_service.cache.store import (
    CacheAppender,
    CacheMismatchError,
    EmbeddingCache,
    compact,
    make_meta,
    read_meta,
    rows_table,
    write_table_atomic,
)
from teacher_service.config import ServingConfig, TeacherConfig
from teacher_service.contract.answer_codec import (
    ANSWER_DTYPES,
    EncodedRows,
    answer_rows,
    bf16_bits_to_float32,
    bytes_per_row,
    decode_rows,
    encode_response,
    encode_rows,
    float32_to_bf16_bits,
)
from teacher_service.contract.augment import view_recipe
from teacher_service.contract.protocol import EmbedRequest, EmbedResponse
from teacher_service.grpc.codec import decode_embed_reply, decode_embed_request, encode_embed_reply, tensor_to_proto
from teacher_service.grpc.proto import teacher_pb2 as pb


def unit_rows(n: int, dim: int, seed: int = 0, spread: float = 1.0) -> np.ndarray:
    """L2-normalised float16 rows as the pool answers them; `spread` > 1 gives each dimension its own
    scale (real teachers' embeddings are far from isotropic), up to `spread` times the smallest."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)) * np.geomspace(1.0, spread, dim)[rng.permutation(dim)]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


# ------------------------------------------------------------------------------------------- codec
def test_bf16_is_torchs_rounding_and_within_two_to_the_minus_eight():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(20000) * 10.0 ** rng.integers(-30, 30, 20000),
                        [0.0, -0.0, np.inf, -np.inf, 1e-40, -3e-39, 3.38e38, -3.4e38]]).astype(np.float32)
    ties = (np.arange(1, 2000, dtype=np.uint32) << 16 | np.uint32(0x8000)).view(np.float32)  # exactly halfway
    x = np.concatenate([x, ties, -ties, np.nextafter(ties, np.float32(np.inf))])
    bits = float32_to_bf16_bits(x)
    assert bits.dtype == np.uint16
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bits, want)  # torch's round to nearest, ties to even, bit for bit
    back = bf16_bits_to_float32(bits)
    np.testing.assert_array_equal(back, torch.from_numpy(want.view(np.int16)).view(torch.bfloat16).float().numpy())
    normal = np.isfinite(x) & (np.abs(x) >= np.finfo(np.float32).tiny) & (np.abs(x) < 3.38e38)
    rel = np.abs(back[normal] - x[normal]) / np.abs(x[normal])
    assert rel.max() <= 2.0 ** -8 and rel.max() > 2.0 ** -9  # the bound is reached, never passed
    assert float32_to_bf16_bits(np.array([np.nan], np.float32))[0] == 0x7FC0


@pytest.mark.parametrize("spread", [1.0, 30.0], ids=["isotropic", "anisotropic"])
@pytest.mark.parametrize("dim", [64, 768])
def test_int8_is_within_half_a_scale_and_keeps_rows_unit(dim, spread):
    rows = unit_rows(300, dim, seed=dim, spread=spread)
    enc = encode_rows(rows, "int8")
    assert enc.values.dtype == np.int8 and enc.scales.dtype == np.float32 and np.abs(enc.values).max() == 127
    dec = enc.decode()
    x = rows.astype(np.float32)
    scales = enc.scales if enc.scales.ndim == 2 else enc.scales[:, None]
    assert (np.abs(dec - x) <= scales / 2 + 1e-7).all()  # half a quantisation step an element (+ float32 rounding)
    assert (np.abs(dec - x) > scales / 4).any()  # and the bound is not loose
    assert np.abs(np.linalg.norm(dec, axis=1) - 1).max() < 0.01
    assert ((dec * x).sum(1) / np.linalg.norm(dec, axis=1) / np.linalg.norm(x, axis=1)).min() > 0.999


def test_int8_scale_per_row_or_per_dimension_bounds_and_independence():
    """Both int8 layouts the benchmark weighs stay within half their step an element: per row,
    max|row| / 254 (the codec); per dimension, max|column of the batch| / 254 (benchmarks/answer_codec).
    Only the codec's answer for a row is the same whatever rows share its response or file."""
    from benchmarks.answer_codec import int8_per_dim

    rows = unit_rows(256, 128, seed=5, spread=30.0)
    x = rows.astype(np.float32)
    per_row = encode_rows(rows, "int8").decode()
    assert (np.abs(per_row - x) <= np.abs(x).max(axis=1, keepdims=True) / 254 + 1e-7).all()
    per_dim, scale_bytes = int8_per_dim(rows, 64)
    for start in range(0, 256, 64):
        block = slice(start, start + 64)
        assert (np.abs(per_dim[block] - x[block]) <= np.abs(x[block]).max(axis=0) / 254 + 1e-7).all()
    assert scale_bytes == 4 * 128 * 4  # one float32 a dimension for each of the 4 batches
    alone = np.vstack([encode_rows(rows[i:i + 1], "int8").decode() for i in range(8)])
    np.testing.assert_array_equal(alone, per_row[:8])  # a row's answer does not depend on its batch
    assert not np.array_equal(int8_per_dim(rows[:8], 8)[0], per_dim[:8])  # per dimension, it does


def test_students_losses_get_float32_from_every_dtype():
    """Whatever dtype the teacher answered in, the loss modules read float32 features that decode
    the answer exactly (fp16 and bf16 exactly representable, int8 as values x scale)."""
    from student_trainer.teacher.outputs import TeacherOutputs

    rows = unit_rows(6, 40, seed=7)
    for dtype in ANSWER_DTYPES:
        resp = encode_response(EmbedResponse(list("abcdef"), rows, rows[::-1].copy(), 14.0, None, "fp"), dtype)
        tensors = TeacherOutputs.from_response(resp).to_tensors("cpu")
        for name, want in (("image_features", rows), ("text_features", rows[::-1])):
            assert tensors[name].dtype == torch.float32
            np.testing.assert_array_equal(tensors[name].numpy(), decode_rows(answer_rows(want, dtype)).astype(np.float32))


def test_the_answer_dtype_is_no_part_of_the_teachers_identity():
    """A pool answering int8 by default is the same teacher (fingerprint) as one answering fp16: the
    dtype is an encoding of its answers, which caches keep apart by their own metadata."""
    from tiny_models import tiny_teacher_overrides

    from teacher_service.model import load_teacher

    base = TeacherConfig(model="ViT-B-32", overrides=tiny_teacher_overrides(), torch_threads=1)
    int8 = base.updated({"serving.answer_dtype": "int8"})
    assert int8.serving.answer_dtype == "int8" and int8.replica_dict()["serving"]["answer_dtype"] == "int8"
    assert load_teacher(int8).fingerprint == load_teacher(base).fingerprint


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_rows_decode_within_their_bound_and_zero_rows_stay_zero(dtype):
    rows = np.vstack([unit_rows(5, 32), np.zeros((1, 32), np.float16)])
    dec = decode_rows(answer_rows(rows, dtype))
    assert dec.dtype == np.float32 and not dec[-1].any()
    bound = 2.0 ** -8 * np.abs(rows.astype(np.float32)) if dtype == "bf16" else 1 / 254  # |x| <= 1: scale <= 1/127
    assert (np.abs(dec - rows.astype(np.float32)) <= bound).all()


@pytest.mark.parametrize("dim", [64, 128, 512, 768])
def test_exact_bytes_per_dtype(dim):
    rows = unit_rows(16, dim)
    sizes = {dtype: encode_rows(rows, dtype).nbytes for dtype in ANSWER_DTYPES}
    assert sizes == {dtype: 16 * bytes_per_row(dtype, dim) for dtype in ANSWER_DTYPES}
    assert sizes["fp16"] == sizes["bf16"] == 16 * 2 * dim and sizes["int8"] == 16 * (dim + 4)
    # on the wire: exactly those bytes of tensor data per features field
    reply = encode_embed_reply(EmbedResponse(["k"] * 16, answer_rows(rows, "int8"), None, 1.0, None, "fp"))
    assert len(reply.image_features.data) == 16 * dim and len(reply.image_scales.data) == 16 * 4


def test_encoded_rows_refuse_inconsistent_values():
    with pytest.raises(ValueError, match=r"answer_dtype: expected one of \('fp16', 'bf16', 'int8'\), got 'fp8'"):
        encode_rows(unit_rows(2, 4), "fp8")
    with pytest.raises(ValueError, match="int8 rows need scales"):
        EncodedRows("int8", np.zeros((2, 4), np.int8))
    with pytest.raises(ValueError, match=r"bf16 rows are uint16 \[n, D\], got float16"):
        EncodedRows("bf16", np.zeros((2, 4), np.float16))


# -------------------------------------------------------------------------------- the fp16 path
def test_fp16_answers_are_unchanged_bit_for_bit():
    rows = unit_rows(7, 24)
    same = answer_rows(rows, "fp16")
    assert same.dtype == np.float16 and same.tobytes() == rows.tobytes()
    resp = EmbedResponse(keys=list("abcdefg"), image_features=rows, text_features=rows[::-1].copy(),
                         logit_scale=14.25, logit_bias=None, fingerprint="fp")
    assert encode_response(resp, "fp16") is resp
    # the reply's bytes: exactly the message built as before answer_dtype existed
    before = pb.EmbedReply(keys=resp.keys, logit_scale=14.25, fingerprint="fp",
                           image_features=pb.Tensor(dtype="float16", shape=[7, 24], data=rows.tobytes()),
                           text_features=pb.Tensor(dtype="float16", shape=[7, 24], data=rows[::-1].tobytes()))
    assert encode_embed_reply(resp).SerializeToString() == before.SerializeToString()
    back = decode_embed_reply(before)
    assert back.image_features.dtype == np.float16 and back.image_features.tobytes() == rows.tobytes()
    # a request from a client older than the field asks for fp16, whatever the pool's default
    old = pb.EmbedRequest(keys=["a"], tokens=tensor_to_proto(np.ones((1, 4), np.int64)))
    assert decode_embed_request(old).answer_dtype == "fp16"


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_compressed_answers_cross_the_grpc_wire_exactly(dtype):
    rows = unit_rows(5, 16)
    resp = encode_response(EmbedResponse(list("abcde"), rows, None, 1.0, -3.0, "fp"), dtype)
    msg = pb.EmbedReply.FromString(encode_embed_reply(resp).SerializeToString())
    assert msg.answer_dtype == dtype and msg.HasField("image_scales") == (dtype == "int8")
    back = decode_embed_reply(msg)
    assert isinstance(back.image_features, EncodedRows) and back.text_features is None
    np.testing.assert_array_equal(back.image_features.decode(), resp.image_features.decode())
    request = decode_embed_request(pb.EmbedRequest(keys=["a"], answer_dtype=dtype))
    assert request.answer_dtype == dtype


# ------------------------------------------------------------------------------------------ config
def test_a_bad_answer_dtype_is_refused_naming_the_choices():
    from student_trainer.config import TeacherSourceConfig, TrainConfig
    from teacher_service.contract.protocol import RequestError, RequestLimits, validate_request

    choices = r"expected one of \('fp16', 'bf16', 'int8'\)"
    with pytest.raises(ValueError, match=rf"serving.answer_dtype: {choices}, got 'fp8'"):
        TeacherConfig.from_dict({"serving": {"answer_dtype": "fp8"}})
    assert TeacherConfig.from_dict({"serving": {"answer_dtype": "int8"}}).serving.answer_dtype == "int8"
    assert ServingConfig().answer_dtype == "fp16"
    with pytest.raises(ValueError, match=rf"teacher.answer_dtype 'int4': {choices} or null"):
        TrainConfig(teacher=TeacherSourceConfig(mode="remote", answer_dtype="int4")).validate()
    with pytest.raises(ValueError, match=r"answer_dtype 'int8': mode 'cache' reads rows in the dtype `kd precompute"):
        TrainConfig(teacher=TeacherSourceConfig(mode="cache", cache_path="/c", answer_dtype="int8")).validate()
    request = EmbedRequest(keys=["a"], tokens=np.ones((1, 4), np.int64), answer_dtype="fp32")
    with pytest.raises(RequestError, match=rf"answer_dtype: {choices} or None"):
        validate_request(request, RequestLimits())


# ------------------------------------------------------------------------------------------- cache
INFO = {"fingerprint": "fp-Q", "embed_dim": 48, "model": "m", "context_length": 16, "logit_scale": 10.0}
RECIPE = view_recipe(32, 0)


def write_rows(path, rows: np.ndarray, dtype: str, keys: list[str] | None = None) -> str:
    keys = keys or [f"k{i:04d}" for i in range(len(rows))]
    meta = make_meta({**INFO, "embed_dim": rows.shape[1]}, RECIPE, kind="shard", views=1, answer_dtype=dtype)
    n = len(keys)
    return write_table_atomic(rows_table(meta, keys, 0, rows, rows[::-1], np.arange(n), np.arange(n)), str(path))


@pytest.mark.parametrize("dtype", ANSWER_DTYPES)
def test_a_cache_stores_reads_appends_and_compacts_in_its_dtype(tmp_path, dtype):
    rows = unit_rows(200, 48, seed=3)
    write_rows(tmp_path / "train-000000.parquet", rows, dtype)
    assert read_meta(str(tmp_path / "train-000000.parquet"))["dtype"] == {"fp16": "float16", "bf16": "bfloat16",
                                                                         "int8": "int8"}[dtype]
    cache = EmbeddingCache.open(str(tmp_path))
    assert cache.answer_dtype == dtype
    keys = [f"k{i:04d}" for i in range(200)]
    got = cache.fetch(cache.locate(keys, 0))
    want = decode_rows(answer_rows(rows, dtype))
    assert got["image_emb"].dtype == want.dtype  # fp16 rows as stored; bf16 and int8 decoded to float32
    np.testing.assert_array_equal(got["image_emb"], want)  # the reader decodes what the codec encoded
    np.testing.assert_array_equal(got["text_emb"], decode_rows(answer_rows(rows[::-1], dtype)))
    # appended rows (hybrid) go in the cache's dtype, and are served in memory as they are on disk
    more = unit_rows(10, 48, seed=4)
    extra = [f"x{i}" for i in range(10)]
    cache.add(extra, 0, more, more, np.arange(10), np.arange(10))
    appender = CacheAppender(cache.path, cache.meta, run="r")
    appender.add(extra, 0, more, more, np.arange(10), np.arange(10))
    stored = read_meta(appender.flush())["dtype"]
    assert stored == read_meta(str(tmp_path / "train-000000.parquet"))["dtype"]
    in_memory = cache.fetch(cache.locate(extra, 0))["image_emb"]
    reopened = EmbeddingCache.open(str(tmp_path))
    np.testing.assert_allclose(reopened.fetch(reopened.locate(extra, 0))["image_emb"], in_memory, rtol=0, atol=1e-6)
    report = compact(str(tmp_path))
    assert report.rows_written == 10 and read_meta(report.out_path)["dtype"] == stored
    # a cache holds one dtype: asking for another is refused, naming both
    other = next(d for d in ANSWER_DTYPES if d != dtype)
    with pytest.raises(CacheMismatchError, match=f"stores its rows in {dtype}, but .* writes {other}"):
        EmbeddingCache.open(str(tmp_path), answer_dtype=other)


def test_int8_and_bf16_rows_take_the_bytes_they_should_on_disk(tmp_path):
    """Parquet has no 8- or 16-bit integers: rows go as raw bytes, so int8 is about half of fp16."""
    dim, n = 512, 1000
    rows = unit_rows(n, dim)
    size = {d: os.path.getsize(write_rows(tmp_path / f"{d}.parquet", rows, d)) / n for d in ANSWER_DTYPES}
    assert 4 * dim <= size["fp16"] <= 4 * dim + 64 and 4 * dim <= size["bf16"] <= 4 * dim + 64
    assert 2 * (dim + 4) <= size["int8"] <= 2 * (dim + 4) + 64
    table = pq.read_table(tmp_path / "int8.parquet")
    assert table.schema.field("image_emb").type == pa.binary(dim) and table.schema.field("image_scale").type == pa.float32()
    assert pq.read_table(tmp_path / "fp16.parquet").schema.field("image_emb").type == pa.list_(pa.float16(), dim)


def test_kd_cache_info_shows_the_dtype(tmp_path, capsys):
    from cluster.cli import main

    write_rows(tmp_path / "train-000000.parquet", unit_rows(20, 48), "int8")
    assert main(["cache", "info", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["answer_dtype"] == "int8" and info["rows"] == 20


# ------------------------------------------------------------------------------------------- gRPC
class EncodingBackend:
    """Stands in for the pool behind a real ingress: answers fp16 rows encoded in the dtype asked."""

    def __init__(self, rows: np.ndarray) -> None:
        self.rows, self.asked = rows, []

    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        self.asked.append(request.answer_dtype)
        resp = EmbedResponse(list(request.keys), None, self.rows[:len(request)], 1.0, None, "fake")
        return encode_response(resp, request.answer_dtype or "int8")  # int8: a pool whose default is int8


def test_a_grpc_client_asks_for_int8_and_an_old_one_still_gets_fp16():
    from teacher_service.grpc.client import TeacherGrpcClient
    from teacher_service.grpc.ingress import TeacherServicer, serve_grpc

    rows = unit_rows(4, 32)
    tokens = np.ones((4, 8), np.int64)

    async def scenario(backend) -> list:
        server, port = await serve_grpc(TeacherServicer(TeacherConfig(), backend), "127.0.0.1", 0)
        try:
            def calls():
                with TeacherGrpcClient(f"127.0.0.1:{port}") as client:
                    return [client.embed(tokens=tokens, answer_dtype=d) for d in ("int8", "bf16", None)]
            return await asyncio.to_thread(calls)
        finally:
            await server.stop(None)

    backend = EncodingBackend(rows)
    int8, bf16, default = asyncio.run(scenario(backend))
    assert backend.asked == ["int8", "bf16", "fp16"]  # no field on the wire: fp16, not the pool's default
    assert isinstance(int8.text_features, EncodedRows) and int8.text_features.dtype == "int8"
    np.testing.assert_array_equal(int8.text_features.values, encode_rows(rows, "int8").values)
    np.testing.assert_array_equal(decode_rows(bf16.text_features), decode_rows(answer_rows(rows, "bf16")))
    assert default.text_features.dtype == np.float16 and default.text_features.tobytes() == rows.tobytes()
