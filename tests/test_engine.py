"""TeacherEngine: one forward over many requests equals answering each request alone."""
from __future__ import annotations

import numpy as np
import pytest

from teacher_service import EmbedRequest, EmbedResponse, RequestError, RequestLimits, TeacherConfig, TeacherEngine, load_teacher

TINY = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
ATOL = 2e-3  # fp16 output rounding + batched-vs-single float32 summation order


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(TeacherConfig(overrides=TINY))


def request(n, h=32, w=32, images=True, tokens=True, length=12, seed=0, prefix="k") -> EmbedRequest:
    rng = np.random.default_rng(seed)
    tok = np.zeros((n, length), np.int64)
    tok[:, 0] = 49406
    tok[:, 1:4] = rng.integers(1, 49000, (n, 3))
    tok[:, 4] = 49407
    return EmbedRequest(keys=[f"{prefix}{seed}-{i}" for i in range(n)],
                        images=rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8) if images else None,
                        tokens=tok if tokens else None, run="test")


def mixed_requests():
    return [
        request(3, seed=1),                              # both, native size
        request(2, 48, 40, tokens=False, seed=2),        # images only, needs resizing
        request(4, images=False, length=24, seed=3),     # tokens only, longer than context
        request(1, 20, 20, seed=4, length=8),            # both, upsampled, short tokens
    ]


def test_batched_equals_per_request(teacher):
    reqs = mixed_requests()
    batched_engine, single_engine = TeacherEngine(teacher), TeacherEngine(teacher)
    batched = batched_engine.embed_many(reqs)
    singles = [single_engine.embed(r) for r in reqs]
    for req, b, s in zip(reqs, batched, singles):
        assert isinstance(b, EmbedResponse) and b.keys == req.keys
        for field in ("image_features", "text_features"):
            bv, sv = getattr(b, field), getattr(s, field)
            sent = (req.images if field == "image_features" else req.tokens) is not None
            assert (bv is not None) == sent and (sv is not None) == sent
            if sent:
                assert bv.dtype == np.float16 and bv.shape == (len(req), 64)
                np.testing.assert_allclose(bv.astype(np.float32), sv.astype(np.float32), atol=ATOL)
        assert b.fingerprint == teacher.fingerprint and b.logit_scale == teacher.logit_scale
        assert b.logit_bias is None
    assert batched_engine.stats["batches"] == 1 and single_engine.stats["batches"] == 4
    assert batched_engine.stats["requests"] == 4 and batched_engine.stats["samples"] == 10
    assert batched_engine.stats["max_batch_samples"] == 10


def test_engine_matches_teacher_encode(teacher):
    req = request(3, 40, 40, seed=7)
    resp = TeacherEngine(teacher).embed(req)
    direct = teacher.encode(req.images, req.tokens)
    np.testing.assert_array_equal(resp.image_features, direct["image_features"])
    np.testing.assert_array_equal(resp.text_features, direct["text_features"])


def test_bad_request_gets_its_error_others_answered(teacher):
    engine = TeacherEngine(teacher)
    good_a, good_b = request(2, seed=1), request(3, seed=2)
    bad_vocab = request(2, seed=3)
    bad_vocab.tokens[0, 2] = 49408  # engine fills vocab_size from the teacher
    bad_shape = EmbedRequest(keys=["x"], images=np.zeros((1, 32, 32), np.uint8))
    out = engine.embed_many([good_a, bad_vocab, good_b, bad_shape])
    assert isinstance(out[1], RequestError) and "out of vocabulary" in str(out[1])
    assert isinstance(out[3], RequestError) and "grayscale" in str(out[3])
    alone = TeacherEngine(teacher).embed_many([good_a, good_b])
    for got, want in zip((out[0], out[2]), alone):
        np.testing.assert_array_equal(got.image_features, want.image_features)
        np.testing.assert_array_equal(got.text_features, want.text_features)
    assert engine.stats["errors"] == 2 and engine.stats["requests"] == 2 and engine.stats["batches"] == 1
    with pytest.raises(RequestError, match="grayscale"):
        engine.embed(bad_shape)
    all_bad = engine.embed_many([bad_shape])
    assert isinstance(all_bad[0], RequestError) and engine.stats["batches"] == 1  # no empty forward


def test_limits_are_enforced_and_outputs_are_independent(teacher):
    engine = TeacherEngine(teacher, RequestLimits(max_samples=2))
    assert engine.limits.vocab_size == 49408
    with pytest.raises(RequestError, match="max_samples=2"):
        engine.embed(request(3))
    a, b = engine.embed_many([request(2, seed=1), request(2, seed=2)])
    assert a.image_features.base is None or a.image_features.base is not b.image_features.base
    before = b.image_features.copy()
    a.image_features[:] = 0
    np.testing.assert_array_equal(b.image_features, before)


def test_nan_features_fail_only_their_request_and_are_never_answered(teacher, monkeypatch):
    """A broken teacher (NaN/Inf out): the request holding the bad row gets TeacherOutputError
    naming the sample; the others in the same forward are answered as usual."""
    from teacher_service.serve.engine import TeacherOutputError

    engine = TeacherEngine(teacher)
    real = teacher.encode_tensors

    def broken(pixels=None, tokens=None):
        out = real(pixels, tokens)
        out["image_features"][5] = np.nan  # row 5: the second request's third sample
        return out

    monkeypatch.setattr(teacher, "encode_tensors", broken)
    good, bad = request(3, prefix="a"), request(4, seed=1, prefix="b")
    results = engine.embed_many([good, bad])
    assert isinstance(results[0], EmbedResponse) and np.isfinite(results[0].image_features).all()
    assert isinstance(results[1], TeacherOutputError)
    assert "NaN/Inf image_features for 1 of 4 samples (first: 'b1-2')" in str(results[1])
    with pytest.raises(TeacherOutputError):
        engine.embed(request(6, prefix="c"))


def test_each_response_carries_its_share_of_the_forward_seconds(teacher):
    """`compute_s`: the forward's seconds split by the requests' samples (3 : 2 : 4 : 1 here),
    together the forward's time (the run's teacher-seconds add these up)."""
    engine = TeacherEngine(teacher)
    reqs = mixed_requests()
    responses = engine.embed_many(reqs)
    shares = [r.compute_s for r in responses]
    assert sum(shares) == pytest.approx(engine.stats["forward_s"]) and all(s > 0 for s in shares)
    assert [s / shares[3] for s in shares] == pytest.approx([3, 2, 4, 1])
    alone = engine.embed(request(2, seed=5))
    assert alone.compute_s == pytest.approx(engine.stats["forward_s"] - sum(shares))  # a forward of its own
