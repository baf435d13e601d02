"""validate_request: every class of malformed request is refused with a message naming the field."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from teacher_service import EmbedRequest, EmbedResponse, RequestError, RequestLimits, validate_request

LIMITS = RequestLimits(max_samples=8, max_image_side=64, max_context_length=32, vocab_size=1000)


def good(n=2, images=True, tokens=True) -> EmbedRequest:
    tok = np.zeros((n, 6), np.int64)
    tok[:, 0], tok[:, 1], tok[:, 2] = 998, 5, 999
    return EmbedRequest(
        keys=[f"s{i}" for i in range(n)],
        images=np.zeros((n, 32, 40, 3), np.uint8) if images else None,
        tokens=tok if tokens else None,
        run="run-a",
    )


@pytest.mark.parametrize("req", [good(), good(images=False), good(tokens=False), good(8),
                                 dataclasses.replace(good(), tokens=good().tokens.astype(np.int32))])
def test_valid_requests_pass(req):
    assert validate_request(req, LIMITS) is None


def _with(**kw) -> EmbedRequest:
    return dataclasses.replace(good(), **kw)


def _tokens(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


BAD = {
    "not a request": ({"keys": ["a"]}, r"request: expected EmbedRequest, got dict"),
    "empty": (_with(keys=[], images=None, tokens=None), r"keys: request is empty"),
    "keys not a list": (_with(keys="ab"), r"keys: expected a list of str"),
    "key not str": (_with(keys=["a", 3]), r"keys: entry 1 is int"),
    "neither": (_with(images=None, tokens=None), r"images/tokens: request carries neither"),
    "too many samples": (good(9), r"keys: request has 9 samples, more than max_samples=8"),
    "run not str": (_with(run=3), r"run: expected str"),
    "view not str": (_with(view=3), r"view: expected str"),
    "view too long": (_with(view="v" * 257), r"view: 257 characters, more than 256"),
    "weight zero": (_with(weight=0), r"weight: 0 outside \(0, max_weight=100.0\]"),
    "weight nan": (_with(weight=float("nan")), r"weight: nan outside"),
    "weight too large": (_with(weight=101.0), r"weight: 101.0 outside"),
    "weight not a number": (_with(weight="2"), r"weight: expected a number, got str"),
    "answer dtype unknown": (_with(answer_dtype="fp8"), r"answer_dtype: expected one of \('fp16', 'bf16', 'int8'\)"),
    "images not ndarray": (_with(images=[[0]]), r"images: expected a numpy array, got list"),
    "images float": (_with(images=np.zeros((2, 32, 32, 3), np.float32)), r"images: expected dtype uint8"),
    "images grayscale": (_with(images=np.zeros((2, 32, 32), np.uint8)), r"images: .*grayscale"),
    "images 4 channels": (_with(images=np.zeros((2, 32, 32, 4), np.uint8)), r"images: expected shape \[b, H, W, 3\]"),
    "images channels first": (_with(images=np.zeros((2, 3, 32, 32), np.uint8)), r"images: expected shape"),
    "images count": (_with(images=np.zeros((3, 32, 32, 3), np.uint8)), r"images: 3 images for 2 keys"),
    "images empty side": (_with(images=np.zeros((2, 0, 32, 3), np.uint8)), r"images: empty image side"),
    "images too large": (_with(images=np.zeros((2, 65, 32, 3), np.uint8)), r"images: side 65 exceeds max_image_side=64"),
    "tokens not ndarray": (_with(tokens=[[1, 2]]), r"tokens: expected a numpy array"),
    "tokens float": (_with(tokens=np.ones((2, 4), np.float32)), r"tokens: expected an integer dtype"),
    "tokens 1d": (_with(tokens=np.ones(2, np.int64)), r"tokens: expected shape \[b, L\]"),
    "tokens count": (_with(tokens=np.ones((3, 4), np.int64)), r"tokens: 3 rows for 2 keys"),
    "tokens too long": (_with(tokens=np.ones((2, 33), np.int64)), r"tokens: length 33 outside 1..max_context_length=32"),
    "tokens zero length": (_with(tokens=np.ones((2, 0), np.int64)), r"tokens: length 0"),
    "tokens negative": (_with(tokens=_tokens([[5, -1], [5, 999]])), r"tokens: negative id -1"),
    "tokens out of vocab": (_with(tokens=_tokens([[5, 1000], [5, 999]])), r"tokens: id 1000 out of vocabulary range \[0, 1000\)"),
    "tokens all padding": (_with(tokens=_tokens([[5, 999], [0, 0]])), r"tokens: row 1 is all padding"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_requests_are_refused_with_named_field(name):
    req, pattern = BAD[name]
    with pytest.raises(RequestError, match=pattern):
        validate_request(req, LIMITS)


def test_request_error_is_a_value_error_and_vocab_unchecked_without_size():
    assert issubclass(RequestError, ValueError)
    req = _with(tokens=_tokens([[5, 10**6], [5, 999]]))
    validate_request(req, dataclasses.replace(LIMITS, vocab_size=None))
    with pytest.raises(RequestError):
        validate_request(req, LIMITS)


def test_len_counts_samples_and_never_raises():
    assert len(good(5)) == 5
    assert len(EmbedRequest(keys=None)) == 0  # batch_size_fn must survive malformed requests
    resp = EmbedResponse(keys=["a", "b"], image_features=np.zeros((2, 4), np.float16), text_features=None,
                         logit_scale=14.3, logit_bias=None, fingerprint="f" * 16)
    assert len(resp) == 2
