"""Fuzzing what the teacher accepts from the network: any bytes, and any well-formed message with
hostile field values, must end as a servable request or a RequestError naming the field — never
another exception (a replica crash) and never a silently wrong array. Each test prints how many cases
it ran (`pytest -s tests/test_fuzz_codec.py`)."""
from __future__ import annotations

from collections import Counter

import numpy as np
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teacher_service.grpc.codec import WireLimits, decode_embed_request
from teacher_service.grpc.proto import teacher_pb2 as pb
from teacher_service.contract.protocol import RequestError, RequestLimits, validate_request

LIMITS = WireLimits(max_request_bytes=1 << 20)
REQUEST_LIMITS = RequestLimits(max_samples=64, max_image_side=64, max_context_length=32, vocab_size=1000)
CASES: Counter[str] = Counter()  # the cases the running fuzzer tried; each test starts from zero
SETTINGS = settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))

dtypes = st.sampled_from(["uint8", "int32", "int64", "float16", "float32", "float64", "object", "", "<u1",
                          "S10", "bool", "uint8\0", "int64 "])
shapes = st.lists(st.integers(min_value=-3, max_value=70), max_size=6)


@st.composite
def tensors(draw) -> pb.Tensor:
    shape = draw(shapes)
    size = int(np.prod([max(d, 0) for d in shape])) if shape else 0
    itemsize = draw(st.sampled_from([1, 2, 4, 8]))
    exact = size * itemsize if size * itemsize <= 50_000 else 0
    length = draw(st.one_of(st.just(exact), st.integers(min_value=0, max_value=2048)))
    return pb.Tensor(dtype=draw(dtypes), shape=shape, data=draw(st.binary(min_size=length, max_size=length)))


@st.composite
def messages(draw) -> pb.EmbedRequest:
    msg = pb.EmbedRequest(keys=draw(st.lists(st.text(max_size=12), max_size=70)), run=draw(st.text(max_size=80)),
                          view=draw(st.text(max_size=300)),
                          weight=draw(st.floats(allow_nan=True, allow_infinity=True, width=64)))
    if draw(st.booleans()):
        msg.images.CopyFrom(draw(tensors()))
    if draw(st.booleans()):
        msg.tokens.CopyFrom(draw(tensors()))
    return msg


@st.composite
def near_valid(draw) -> pb.EmbedRequest:
    """A valid request, then maybe one field broken: reaches the checks a random message never does."""
    b, h, w, length = (draw(st.integers(1, 4)), draw(st.integers(1, 9)), draw(st.integers(1, 9)),
                       draw(st.integers(1, 8)))
    images = np.frombuffer(draw(st.binary(min_size=b * h * w * 3, max_size=b * h * w * 3)), np.uint8)
    tokens = np.asarray(draw(st.lists(st.integers(-2, 1100), min_size=b * length, max_size=b * length)), np.int64)
    msg = pb.EmbedRequest(keys=[str(i) for i in range(b)], run="fuzz", view=draw(st.sampled_from(["", "ns/0"])),
                          weight=draw(st.sampled_from([0.0, 1.0, 3.5, 1e9, float("nan")])))
    msg.images.CopyFrom(pb.Tensor(dtype="uint8", shape=[b, h, w, 3], data=images.tobytes()))
    msg.tokens.CopyFrom(pb.Tensor(dtype="int64", shape=[b, length], data=tokens.tobytes()))
    broken = draw(st.sampled_from(["none", "keys", "shape", "data", "dtype", "drop"]))
    if broken == "keys":
        msg.keys.append("extra")
    elif broken == "shape":
        msg.images.shape[draw(st.integers(0, 3))] += draw(st.sampled_from([-1, 1]))
    elif broken == "data":
        msg.tokens.data = msg.tokens.data[:-1]
    elif broken == "dtype":
        msg.tokens.dtype = draw(dtypes)
    elif broken == "drop":
        msg.ClearField(draw(st.sampled_from(["images", "tokens"])))
    return msg


def decode_and_validate(msg: pb.EmbedRequest) -> bool:
    """True when servable; False when refused with a RequestError. Anything else fails the test."""
    try:
        request = decode_embed_request(msg, LIMITS)
        validate_request(request, REQUEST_LIMITS)
    except RequestError as e:
        assert str(e).split(":")[0] in {"request", "keys", "run", "view", "weight", "images", "tokens",
                                        "images/tokens"}, e
        return False
    for name in ("images", "tokens"):
        array = getattr(request, name)
        wire = getattr(msg, name)
        if array is not None:  # what the replica computes on is exactly what was sent
            assert array.shape == tuple(wire.shape) and array.tobytes() == wire.data
    return True


@SETTINGS
@given(st.binary(max_size=4096))
def fuzz_any_bytes(data):
    CASES["bytes"] += 1
    try:
        msg = pb.EmbedRequest.FromString(data)
    except DecodeError:
        return  # the proxy answers this itself; never reaches the replica
    decode_and_validate(msg)


def test_any_bytes_are_refused_or_decoded_cleanly():
    CASES.clear()
    fuzz_any_bytes()
    print(f"decoder fuzz: {CASES['bytes']} random byte strings")
    assert CASES["bytes"] > 0  # hypothesis may stop early, but not before a case ran


@SETTINGS
@given(st.one_of(messages(), near_valid()))
def fuzz_hostile_messages(msg):
    CASES["messages"] += 1
    CASES["servable"] += decode_and_validate(msg)


def test_hostile_messages_are_refused_with_the_field_named_or_served_exactly():
    CASES.clear()
    fuzz_hostile_messages()
    print(f"decoder fuzz: {CASES['messages']} hostile messages ({CASES['servable']} of them servable)")
    assert CASES["messages"] > 0
