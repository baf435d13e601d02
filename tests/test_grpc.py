"""gRPC API: committed stubs match the .proto, the tensor codec is exact and strict, and a real grpcio
client against Serve's gRPC proxy gets the handle path's bytes, INVALID_ARGUMENT with the reason,
RESOURCE_EXHAUSTED past the byte limit, Health and Stats."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2

from teacher_service import EmbedRequest, EmbedResponse, RequestError, TeacherConfig
from teacher_service.grpc_ingress import (WIRE_DTYPES, RequestTooLargeError, WireLimits, decode_embed_reply,
                                          decode_embed_request, encode_embed_reply, encode_embed_request,
                                          encode_stats_reply, refuse, tensor_from_proto, tensor_to_proto)
from teacher_service.proto import generate
from teacher_service.proto import teacher_pb2 as pb
from teacher_service.proto import teacher_pb2_grpc as pb_grpc

RPCS = {"Embed", "Stats", "Health"}


# ------------------------------------------------------------------------------------ stubs
def _without_json_names(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """protoc's descriptor sets carry json_name, the embedded descriptor in _pb2.py does not."""
    def strip(messages):
        for m in messages:
            for f in m.field:
                f.ClearField("json_name")
            strip(m.nested_type)

    strip(file.message_type)
    return file


def test_committed_stubs_match_the_proto(tmp_path):
    out = tmp_path / "teacher.pb"
    generate.descriptor_set(out)
    (compiled,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    compiled = _without_json_names(compiled)
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert committed == compiled, "stubs are stale: run `python -m teacher_service.proto.generate`"
    service = pb.DESCRIPTOR.services_by_name["TeacherService"]
    assert {m.name for m in service.methods} == RPCS
    assert {n for n in vars(pb_grpc.TeacherServiceServicer) if not n.startswith("_")} == RPCS
    written = generate.generate(tmp_path)
    assert [p.name for p in written] == ["teacher_pb2.py", "teacher_pb2_grpc.py"]
    assert "from teacher_service.proto import teacher_pb2" in written[1].read_text()  # package import
    compile(written[0].read_text(), str(written[0]), "exec")


# ------------------------------------------------------------------------------------ codec
@pytest.mark.parametrize("dtype", WIRE_DTYPES)
def test_tensor_round_trip_is_exact(dtype):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((3, 5, 2)) * 100).astype(dtype)
    t = tensor_to_proto(a)
    assert t.dtype == dtype and list(t.shape) == [3, 5, 2] and len(t.data) == a.nbytes
    assert t.data == a.astype(a.dtype.newbyteorder("<")).tobytes()  # little-endian on the wire
    b = tensor_from_proto(pb.Tensor.FromString(t.SerializeToString()), "x")
    assert b.dtype == a.dtype and b.shape == a.shape and b.tobytes() == a.tobytes() and b.flags.writeable
    assert tensor_from_proto(tensor_to_proto(a[:, ::2]), "x").tobytes() == np.ascontiguousarray(a[:, ::2]).tobytes()


def test_tensor_decode_refuses_bad_wire_data():
    good = tensor_to_proto(np.zeros((2, 3), np.int64))
    cases = {
        "dtype 'object' is not accepted": pb.Tensor(dtype="object", shape=[1], data=b"\0" * 8),
        "dtype '' is not accepted": pb.Tensor(shape=[1], data=b"\0"),
        "needs 48 bytes, got 47": pb.Tensor(dtype="int64", shape=[2, 3], data=good.data[:-1]),
        "negative dimension": pb.Tensor(dtype="uint8", shape=[-1, 2], data=b""),
        "9 dimensions": pb.Tensor(dtype="uint8", shape=[1] * 9, data=b"\0"),
    }
    for message, tensor in cases.items():
        with pytest.raises(RequestError, match=f"tokens: .*{message}"):
            tensor_from_proto(tensor, "tokens")
    with pytest.raises(ValueError, match="cannot go on the wire"):
        tensor_to_proto(np.array([object()]))
    with pytest.raises(ValueError, match="cannot go on the wire"):
        tensor_to_proto(np.zeros(2, np.float64))


def make_request(n: int = 3, seed: int = 0, run: str = "r") -> EmbedRequest:
    rng = np.random.default_rng(seed)
    tok = np.zeros((n, 8), np.int64)
    tok[:, 0], tok[:, 1:3], tok[:, 3] = 49406, rng.integers(1, 49000, (n, 2)), 49407
    return EmbedRequest(keys=[f"k{seed}-{i}" for i in range(n)], run=run, tokens=tok,
                        images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))


def test_embed_messages_round_trip_and_size_limit():
    req = make_request()
    msg = pb.EmbedRequest.FromString(encode_embed_request(req).SerializeToString())
    back = decode_embed_request(msg)
    assert back.keys == req.keys and back.run == "r" and back.view == "" and back.weight == 1.0
    assert np.array_equal(back.images, req.images) and np.array_equal(back.tokens, req.tokens)
    only_text = decode_embed_request(encode_embed_request(EmbedRequest(keys=["a"], tokens=req.tokens[:1],
                                                                       view="ns/3", weight=2.5)))
    assert only_text.images is None and only_text.tokens.shape == (1, 8)
    assert only_text.view == "ns/3" and only_text.weight == 2.5  # coalescing and fair share work over gRPC too
    with pytest.raises(RequestTooLargeError, match=r"\d+ bytes exceeds max_request_bytes=1000; split it"):
        decode_embed_request(msg, WireLimits(max_request_bytes=1000))
    with pytest.raises(ValueError, match="max_request_bytes"):
        WireLimits(max_request_bytes=0)

    feats = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float16)
    for bias in (None, -10.0):
        resp = EmbedResponse(keys=req.keys, image_features=feats, text_features=None, logit_scale=14.285714,
                             logit_bias=bias, fingerprint="fp")
        got = decode_embed_reply(pb.EmbedReply.FromString(encode_embed_reply(resp).SerializeToString()))
        assert got.image_features.tobytes() == feats.tobytes() and got.text_features is None
        assert got.logit_bias == bias and got.logit_scale == 14.285714 and got.fingerprint == "fp"


class FakeContext:
    def __init__(self):
        self.code = self.details = None

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


def test_refusals_map_to_status_codes():
    import grpc

    ctx = FakeContext()
    assert refuse(ctx, RequestError("keys: request is empty"), pb.EmbedReply()) == pb.EmbedReply()
    assert ctx.code == grpc.StatusCode.INVALID_ARGUMENT and ctx.details == "keys: request is empty"
    refuse(ctx, RequestTooLargeError("request: too big"), pb.EmbedReply())
    assert ctx.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(RequestError, match="empty"):  # handle callers get the exception itself
        refuse(None, RequestError("keys: request is empty"), pb.EmbedReply())
    reply = encode_stats_reply({"app_name": "a", "requests": 3, "batch_fill_mean": None, "replica": "r",
                                "runs": {"x": {"samples": 5, "samples_per_s": 1.5}}})
    assert dict(reply.counters) == {"requests": 3.0} and reply.replicas == ["r"]
    assert reply.runs[0].run == "x" and dict(reply.runs[0].counters) == {"samples": 5.0, "samples_per_s": 1.5}


# ------------------------------------------------------------------------------------ on Serve
APP = "kd-teacher-grpc-test"
TINY = {"model": "ViT-B-32", "pretrained": None, "precision": "fp32", "device": "cpu", "seed": 0,
        "torch_threads": 1,
        "overrides": {"embed_dim": 32,
                      "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
                      "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}}
MAX_BYTES = 100_000


@pytest.fixture(scope="module")
def grpc_app(ray_cluster, grpc_port):
    from ray import serve

    from teacher_service.deployment import deploy, get_teacher_handle
    from teacher_service.grpc_client import TeacherGrpcClient
    from teacher_service.grpc_ingress import running_grpc_options, start_serve

    assert start_serve(grpc_port) == grpc_port  # Serve already runs with the service: same port back
    assert running_grpc_options()["port"] == grpc_port
    cfg = TeacherConfig.from_dict({**TINY, "app_name": APP, "num_cpus": 0.25, "max_batch_size": 64})
    deploy(cfg, grpc=True, max_request_bytes=MAX_BYTES)
    handle = get_teacher_handle(APP, timeout_s=300)
    target = f"127.0.0.1:{grpc_port}"
    with TeacherGrpcClient(target, APP) as client:
        client.wait_ready(timeout_s=60)  # the proxy routes to a new app shortly after it runs
    yield handle, target
    serve.delete(APP)


@pytest.mark.ray
def test_grpc_round_trip_equals_handle_path_bit_for_bit(grpc_app):
    from teacher_service.grpc_client import TeacherGrpcClient

    handle, target = grpc_app
    info = handle.info.remote().result(timeout_s=60)
    with TeacherGrpcClient(target, APP) as client:
        health = client.health()
        assert health["serving"] and health["fingerprint"] == info["fingerprint"]
        assert health["max_request_bytes"] == MAX_BYTES and health["embed_dim"] == 32
        for req in (make_request(3, seed=1, run="grpc"), EmbedRequest(keys=["t"], tokens=make_request(1).tokens),
                    EmbedRequest(keys=["i0", "i1"], images=make_request(2, seed=5).images)):
            via_grpc = client.embed(req.images, req.tokens, req.keys, run="grpc")
            via_handle = handle.embed.remote(req).result(timeout_s=60)  # sequential: same one-request forward
            assert via_grpc.keys == via_handle.keys and via_grpc.fingerprint == via_handle.fingerprint
            assert via_grpc.logit_scale == via_handle.logit_scale and via_grpc.logit_bias is None
            for field, sent in (("image_features", req.images), ("text_features", req.tokens)):
                g, h = getattr(via_grpc, field), getattr(via_handle, field)
                assert (g is None) == (h is None) == (sent is None)
                if sent is not None:
                    assert g.dtype == h.dtype == np.float16 and g.shape == h.shape and g.tobytes() == h.tobytes()


@pytest.mark.ray
def test_grpc_refusals_and_stats(grpc_app):
    import grpc

    from teacher_service.grpc_client import TeacherGrpcClient

    handle, target = grpc_app
    before = handle.stats.remote().result(timeout_s=60)
    with grpc.insecure_channel(target) as channel:  # the raw stub: status codes as any client sees them
        stub = pb_grpc.TeacherServiceStub(channel)
        meta = (("application", APP),)
        gray = pb.EmbedRequest(keys=["a", "b"], images=tensor_to_proto(np.zeros((2, 32, 32), np.uint8)))
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(gray, metadata=meta, timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "grayscale" in e.value.details()
        torn = pb.EmbedRequest(keys=["a"], images=pb.Tensor(dtype="uint8", shape=[1, 32, 32, 3], data=b"\0" * 10))
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(torn, metadata=meta, timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == "images: shape [1, 32, 32, 3] of uint8 needs 3072 bytes, got 10"
    with TeacherGrpcClient(target, APP, token="secret") as client:
        with pytest.raises(RequestError, match="tokens: row 0 is all padding") as e:
            client.embed(tokens=np.zeros((1, 8), np.int64), run="bad")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        fits = make_request(12, seed=3)  # ~38 KB: under the limit
        client.embed(fits.images, fits.tokens, fits.keys, run="grpc")
        huge = make_request(40, seed=4)  # ~124 KB: over it
        with pytest.raises(RequestTooLargeError, match=f"exceeds max_request_bytes={MAX_BYTES}") as e:
            client.embed_request(huge)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED

        one = client.stats()
        merged = client.stats(all_replicas=True)
    for stats in (one, merged):
        delta = {k: stats[k] - before[k] for k in ("requests_received", "requests", "errors_invalid",
                                                    "errors_too_large", "samples_requested", "samples")}
        assert delta == {"requests_received": 5, "requests": 1, "errors_invalid": 3, "errors_too_large": 1,
                         "samples_requested": 12, "samples": 12}
    assert merged["replicas_answered"] == 1 and list(merged["replicas"]) == [one["replica"]]
    assert one["runs"]["grpc"]["samples"] >= 12 and one["runs"]["bad"]["errors"] == 1


# ------------------------------------------------------------------------------------ bearer token
def token_file(path, text: str, mode: int = 0o600):
    path.write_text(text)
    path.chmod(mode)
    return path


def test_token_file_must_be_private_and_nonempty(tmp_path):
    from teacher_service.auth import TokenCheck, UnauthenticatedError, read_token_file

    path = token_file(tmp_path / "token", "s3cret\n", 0o644)
    with pytest.raises(ValueError, match="readable by other users .*chmod 600"):
        read_token_file(str(path))
    with pytest.raises(ValueError, match="readable by other users"):
        TeacherConfig.from_dict({**TINY, "grpc_token_file": str(path)})
    path.chmod(0o600)
    assert read_token_file(str(path)) == "s3cret"
    with pytest.raises(ValueError, match="is empty"):
        read_token_file(str(token_file(tmp_path / "empty", " \n")))
    with pytest.raises(ValueError, match="No such file"):
        read_token_file(str(tmp_path / "missing"))
    check = TokenCheck.from_file(str(path))
    check.check([("application", "x"), ("authorization", "Bearer s3cret")])
    for metadata in ([], [("authorization", "Bearer wrong")], [("authorization", "s3cret")], None):
        with pytest.raises(UnauthenticatedError):
            check.check(metadata)


def test_grpc_refuses_calls_without_the_bearer_token(ray_cluster, grpc_port, tmp_path):
    from ray import serve

    from teacher_service.auth import UnauthenticatedError
    from teacher_service.deployment import collect_stats, deploy, get_teacher_handle
    from teacher_service.grpc_client import TeacherGrpcClient

    token = token_file(tmp_path / "token", "kd-test-token")
    app = "kd-teacher-grpc-token"
    cfg = TeacherConfig.from_dict({**TINY, "app_name": app, "num_cpus": 0.25, "max_batch_size": 64,
                                   "grpc_token_file": str(token)})
    deploy(cfg, grpc=True)
    try:
        handle = get_teacher_handle(app, timeout_s=300)
        target = f"127.0.0.1:{grpc_port}"
        with TeacherGrpcClient(target, app, token="kd-test-token") as client:
            client.wait_ready(timeout_s=60)
            assert client.embed(tokens=make_request(2).tokens).text_features.shape[0] == 2
        for token_sent in (None, "wrong"):
            with TeacherGrpcClient(target, app, token=token_sent) as client:
                for call in (lambda: client.embed(tokens=make_request(2).tokens), client.stats, client.health):
                    with pytest.raises(UnauthenticatedError) as refused:
                        call()
                    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert collect_stats(handle)["errors_unauthenticated"] == 6
        # inside the cluster the handle path needs no token
        assert handle.embed.remote(make_request(2)).result(timeout_s=60).keys == make_request(2).keys
    finally:
        serve.delete(app)
