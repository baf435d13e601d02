"""gRPC API: committed stubs match the .proto, the tensor codec is exact and strict, and a real grpcio
client against the app's gRPC ingress (`grpc.ingress`, a Ray actor) gets the handle path's bytes in
every answer dtype, INVALID_ARGUMENT with the reason, RESOURCE_EXHAUSTED past the byte limit and the
caller's limits, Health and Stats; the ingress listens on loopback only unless configured otherwise, refuses
callers without the token, grants each caller its weight (1 without a token, the token's cap with
one), never lets a caller's view and keys change another caller's answer, and goes away with its app."""
from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2

from teacher_service import EmbedRequest, EmbedResponse, RequestError, TeacherConfig
from teacher_service.contract.answer_codec import EncodedRows
from teacher_service.grpc.codec import (
    WIRE_DTYPES,
    RequestTooLargeError,
    WireLimits,
    decode_embed_reply,
    decode_embed_request,
    encode_embed_reply,
    encode_embed_request,
    encode_stats_reply,
    grpc_status_for,
    refusal_kind,
    tensor_from_proto,
    tensor_to_proto,
)
from teacher_service.grpc.proto import generate
from teacher_service.grpc.proto import teacher_pb2 as pb
from teacher_service.grpc.proto import teacher_pb2_grpc as pb_grpc
from reliability_record import record

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
    assert committed == compiled, "stubs are stale: run `python -m teacher_service.grpc.proto.generate`"
    service = pb.DESCRIPTOR.services_by_name["TeacherService"]
    assert {m.name for m in service.methods} == RPCS
    assert {n for n in vars(pb_grpc.TeacherServiceServicer) if not n.startswith("_")} == RPCS
    written = generate.generate(tmp_path)
    assert [p.name for p in written] == ["teacher_pb2.py", "teacher_pb2_grpc.py"]
    assert "from teacher_service.grpc.proto import teacher_pb2" in written[1].read_text()  # package import
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


def test_refusals_map_to_status_codes_and_counter_kinds():
    from teacher_service.grpc.auth import UnauthenticatedError
    from teacher_service.grpc.caller_limits import CallerLimitError, InvalidCallerError

    cases = [(RequestError("keys: request is empty"), grpc.StatusCode.INVALID_ARGUMENT, "invalid"),
             (InvalidCallerError("kd-caller: bad"), grpc.StatusCode.INVALID_ARGUMENT, "invalid"),
             (RequestTooLargeError("request: too big"), grpc.StatusCode.RESOURCE_EXHAUSTED, "too_large"),
             (CallerLimitError("slow down", "rate_limited"), grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limited"),
             (CallerLimitError("wait", "in_flight_limit"), grpc.StatusCode.RESOURCE_EXHAUSTED, "in_flight_limit"),
             (UnauthenticatedError("no token"), grpc.StatusCode.UNAUTHENTICATED, "unauthenticated"),
             (RuntimeError("boom"), grpc.StatusCode.INTERNAL, "internal")]
    for error, code, kind in cases:
        assert (grpc_status_for(error), refusal_kind(error)) == (code, kind), error
    reply = encode_stats_reply({"app_name": "a", "requests": 3, "batch_fill_mean": None, "replica": "r",
                                "runs": {"x": {"samples": 5, "samples_per_s": 1.5}}})
    assert dict(reply.counters) == {"requests": 3.0} and reply.replicas == ["r"]
    assert reply.runs[0].run == "x" and dict(reply.runs[0].counters) == {"samples": 5.0, "samples_per_s": 1.5}


# ------------------------------------------------------------------------------------ on Ray
APP = "kd-teacher-grpc-test"
TINY = {"model": "ViT-B-32", "pretrained": None, "precision": "fp32", "device": "cpu", "seed": 0,
        "torch_threads": 1,
        "overrides": {"embed_dim": 32,
                      "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
                      "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}}
MAX_BYTES = 100_000


def with_grpc(**options) -> TeacherConfig:
    """TINY with these gRPC options (`config.GrpcOptions` fields)."""
    return TeacherConfig.from_dict({**TINY, "grpc": options})


def grpc_teacher(app: str, **options) -> TeacherConfig:
    """A tiny teacher with a gRPC ingress on a free loopback port, and these other gRPC options."""
    return TeacherConfig.from_dict({**TINY, "serving": {"app_name": app, "num_cpus": 0.25, "max_batch_size": 64},
                                    "grpc": {"port": 0, **options}})


@pytest.fixture(scope="module")
def grpc_app(ray_cluster):
    from teacher_service.app import delete_teacher, deploy, get_teacher_handle
    from teacher_service.grpc.client import TeacherGrpcClient
    from teacher_service.grpc.ingress import ingress_address

    deploy(grpc_teacher(APP, max_request_bytes=MAX_BYTES))
    handle = get_teacher_handle(APP, timeout_s=300)
    target = ingress_address(APP)
    with TeacherGrpcClient(target, APP) as client:
        client.wait_ready(timeout_s=60)
    yield handle, target
    delete_teacher(APP)


@pytest.mark.ray
def test_grpc_round_trip_equals_handle_path_bit_for_bit(grpc_app):
    from teacher_service.grpc.client import TeacherGrpcClient

    handle, target = grpc_app
    info = handle.info.remote().result(timeout_s=60)
    with TeacherGrpcClient(target, APP, caller="round-trip") as client:
        health = client.health()
        assert health["serving"] and health["fingerprint"] == info["fingerprint"]
        assert health["max_request_bytes"] == MAX_BYTES and health["embed_dim"] == 32
        for req in (make_request(3, seed=1), EmbedRequest(keys=["t"], tokens=make_request(1).tokens),
                    EmbedRequest(keys=["i0", "i1"], images=make_request(2, seed=5).images)):
            via_grpc = client.embed(req.images, req.tokens, req.keys)
            via_handle = handle.embed.remote(req).result(timeout_s=60)  # sequential: same one-request forward
            assert via_grpc.keys == via_handle.keys and via_grpc.fingerprint == via_handle.fingerprint
            assert via_grpc.logit_scale == via_handle.logit_scale and via_grpc.logit_bias is None
            for field, sent in (("image_features", req.images), ("text_features", req.tokens)):
                g, h = getattr(via_grpc, field), getattr(via_handle, field)
                assert (g is None) == (h is None) == (sent is None)
                if sent is not None:
                    assert g.dtype == h.dtype == np.float16 and g.shape == h.shape and g.tobytes() == h.tobytes()
        req = make_request(3, seed=2)
        for dtype in ("int8", "bf16"):  # a client asking for a compressed answer: the handle path's, exactly
            via_grpc = client.embed(req.images, req.tokens, req.keys, answer_dtype=dtype)
            via_handle = handle.embed.remote(dataclasses.replace(req, answer_dtype=dtype)).result(timeout_s=60)
            for field in ("image_features", "text_features"):
                g, h = getattr(via_grpc, field), getattr(via_handle, field)
                assert isinstance(g, EncodedRows) and g.dtype == h.dtype == dtype
                assert g.values.tobytes() == h.values.tobytes() and g.nbytes == h.nbytes
                np.testing.assert_array_equal(g.decode(), h.decode())
        assert client.stats()["runs"]["grpc:round-trip"]["samples"] >= 6  # the caller is the replica's run


@pytest.mark.ray
def test_grpc_refusals_and_stats(grpc_app):
    from teacher_service.grpc.client import TeacherGrpcClient

    _, target = grpc_app
    keys = ("requests_received", "requests", "errors_invalid", "errors_too_large", "samples_requested", "samples")
    with TeacherGrpcClient(target, APP) as client:
        before_one, before_all = client.stats(), client.stats(all_replicas=True)
    with grpc.insecure_channel(target) as channel:  # the raw stub: status codes as any client sees them
        stub = pb_grpc.TeacherServiceStub(channel)
        meta = (("application", APP),)
        gray = pb.EmbedRequest(keys=["a", "b"], images=tensor_to_proto(np.zeros((2, 32, 32), np.uint8)))
        with pytest.raises(grpc.RpcError) as e:  # refused by the replica's validation
            stub.Embed(gray, metadata=meta, timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "grayscale" in e.value.details()
        torn = pb.EmbedRequest(keys=["a"], images=pb.Tensor(dtype="uint8", shape=[1, 32, 32, 3], data=b"\0" * 10))
        with pytest.raises(grpc.RpcError) as e:  # refused by the ingress's decoder
            stub.Embed(torn, metadata=meta, timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == "images: shape [1, 32, 32, 3] of uint8 needs 3072 bytes, got 10"
        with pytest.raises(grpc.RpcError) as e:  # a client that meant another teacher is told so
            stub.Health(pb.HealthRequest(), metadata=(("application", "other-teacher"),), timeout=60)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and repr(APP) in e.value.details()
    with TeacherGrpcClient(target, APP, caller="bad") as client:
        with pytest.raises(RequestError, match="tokens: row 0 is all padding") as e:
            client.embed(tokens=np.zeros((1, 8), np.int64))
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with TeacherGrpcClient(target, APP, token="secret", caller="good") as client:  # no token needed: ignored
        fits = make_request(12, seed=3)  # ~38 KB: under the limit
        client.embed(fits.images, fits.tokens, fits.keys)
        huge = make_request(40, seed=4)  # ~124 KB: over it
        with pytest.raises(RequestTooLargeError, match=f"exceeds max_request_bytes={MAX_BYTES}") as e:
            client.embed_request(huge)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        one = client.stats()
        merged = client.stats(all_replicas=True)
    for stats, before in ((one, before_one), (merged, before_all)):
        delta = {k: stats[k] - before[k] for k in keys}
        assert delta == {"requests_received": 5, "requests": 1, "errors_invalid": 3, "errors_too_large": 1,
                         "samples_requested": 12, "samples": 12}
    assert merged["replicas_answered"] == 1 and list(merged["replicas"]) == [one["replica"]]
    assert one["runs"]["grpc:good"]["samples"] >= 12 and one["runs"]["grpc:good"]["errors"] >= 1
    assert one["runs"]["grpc:bad"]["errors"] >= 1
    assert one["runs"]["grpc:127.0.0.1"]["errors"] >= 2  # no kd-caller: the peer's host names the caller
    assert merged["grpc_ingress"]["address"] == target


@pytest.mark.ray
def test_a_grpc_caller_cannot_plant_rows_under_another_callers_view_and_keys(grpc_app):
    """The attacker sends the victim's view and keys with all-255 pixels first; the victim is then
    answered with the teacher's forward of its own pixels (on main: with the attacker's rows)."""
    import dataclasses

    from teacher_service import TeacherEngine, load_teacher
    from teacher_service.grpc.client import TeacherGrpcClient

    _, target = grpc_app
    victim = dataclasses.replace(make_request(4, seed=21), view="ns-integrity/0")
    with TeacherGrpcClient(target, APP, caller="attacker") as attacker:
        planted = attacker.embed(np.full_like(victim.images, 255), victim.tokens, victim.keys, view=victim.view)
    with TeacherGrpcClient(target, APP, caller="victim") as client:
        got = client.embed(victim.images, victim.tokens, victim.keys, view=victim.view)
    local = TeacherEngine(load_teacher(TeacherConfig.from_dict(TINY)))
    assert got.fingerprint == local.teacher.fingerprint  # seeded init: the replica's weights
    want = local.embed(dataclasses.replace(victim, view=""))
    for field in ("image_features", "text_features"):
        np.testing.assert_allclose(getattr(got, field).astype(np.float32), getattr(want, field).astype(np.float32),
                                   atol=2e-3)
    assert np.abs(planted.image_features.astype(np.float32) - want.image_features.astype(np.float32)).max() > 0.05


@pytest.mark.ray
def test_an_unauthenticated_grpc_caller_runs_at_weight_one_whatever_it_asks(grpc_app):
    from teacher_service.grpc.client import TeacherGrpcClient

    _, target = grpc_app
    with TeacherGrpcClient(target, APP, caller="greedy") as client:
        client.embed_request(EmbedRequest(keys=["g0", "g1"], tokens=make_request(2).tokens, weight=100.0))
        assert client.stats()["runs"]["grpc:greedy"]["weight"] == 1.0  # what the replica scheduled it at


# ------------------------------------------------------------------------------------ bind address
def local_addresses() -> list[str]:
    """IPv4 addresses of this machine's interfaces, loopback excluded."""
    import psutil

    return sorted({a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                   if a.family.name == "AF_INET" and not a.address.startswith("127.")})


def as_ipv4(ip: str) -> str:
    """An IPv4-mapped IPv6 address (::ffff:a.b.c.d, how a dual-stack socket reports it) as a.b.c.d."""
    import ipaddress

    mapped = getattr(ipaddress.ip_address(ip), "ipv4_mapped", None)
    return str(mapped) if mapped else ip


def connects(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except OSError:
        return False


@pytest.mark.ray
def test_ingress_listens_on_loopback_only(grpc_app):
    """Bound to 127.0.0.1: the listening socket says so, and neither 127.0.0.2 (another address on
    lo, always there on Linux) nor this machine's other interface addresses reach it."""
    import psutil

    from teacher_service.grpc.client import TeacherGrpcClient

    _, target = grpc_app
    host, port = target.rsplit(":", 1)
    port = int(port)
    assert host == "127.0.0.1" and port > 0
    listening = [c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port]
    assert listening and {as_ipv4(ip) for ip in listening} == {"127.0.0.1"}, listening  # gRPC may say ::ffff:127.0.0.1
    assert connects("127.0.0.1", port)
    others = ["127.0.0.2", *local_addresses()]
    record("grpc_loopback_only", {"target": target, "listening": sorted({as_ipv4(ip) for ip in listening}),
                                  "refused_on": others})
    print(f"ingress on {target}; not reachable on {others}")
    for address in others:
        assert not connects(address, port), f"the ingress answered on {address}:{port}"
    with TeacherGrpcClient(f"127.0.0.2:{port}", APP, timeout_s=5) as client, pytest.raises(grpc.RpcError) as e:
        client.health()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_bind_address_comes_from_config_and_only_explicitly_leaves_loopback():
    default = TeacherConfig.from_dict(TINY).grpc
    assert (default.host, default.port, default.is_loopback()) == ("127.0.0.1", None, True)
    for host in ("0.0.0.0", "::", "10.1.2.3"):
        assert not with_grpc(host=host).grpc.is_loopback()
    assert with_grpc(host="::1").grpc.is_loopback()
    with pytest.raises(ValueError, match="grpc.host: expected an IP address .* got 'localhost'"):
        with_grpc(host="localhost")  # a name could resolve to any interface
    with pytest.raises(ValueError, match="grpc.port"):
        with_grpc(port=70000)
    with pytest.raises(ValueError, match="grpc.caller_max_in_flight"):
        with_grpc(caller_max_in_flight=0)
    with pytest.raises(ValueError, match="grpc.caller_samples_per_s"):
        with_grpc(caller_samples_per_s=-1)
    from cluster.cli import build_parser
    from cluster.cli.teacher import teacher_config_from_args

    flags = ["teacher", "serve", "--grpc-port", "9000"]
    assert teacher_config_from_args(build_parser().parse_args(flags)).grpc.host == "127.0.0.1"
    wide = teacher_config_from_args(build_parser().parse_args([*flags, "--grpc-host", "0.0.0.0",
                                                               "--grpc-insecure"])).grpc
    assert (wide.host, wide.port, wide.is_loopback()) == ("0.0.0.0", 9000, False)
    # without --grpc-insecure it needs TLS and a token: tests/test_grpc_tls.py


def test_a_port_in_use_is_an_error_naming_the_address():
    """SO_REUSEPORT is off: a second server on a taken port fails instead of sharing it."""
    import asyncio
    import socket

    from teacher_service.grpc.ingress import GrpcBindError, TeacherServicer, serve_grpc

    servicer = TeacherServicer(TeacherConfig.from_dict(TINY), backend=None)

    async def bind_twice() -> None:
        first, port = await serve_grpc(servicer, "127.0.0.1", 0)
        try:
            with pytest.raises(GrpcBindError, match=f"cannot listen on 127.0.0.1:{port}"):
                await serve_grpc(servicer, "127.0.0.1", port)
        finally:
            await first.stop(None)

    asyncio.run(bind_twice())
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        with pytest.raises(GrpcBindError, match="cannot listen"):
            asyncio.run(serve_grpc(servicer, "127.0.0.1", held.getsockname()[1]))


@pytest.mark.ray
def test_ingress_goes_away_with_its_app(ray_cluster):
    """Deleting the app with plain `serve.delete` (not `kd teacher stop`) stops the ingress too:
    the actor is gone and the port can be bound again."""
    import socket
    import time

    from ray import serve

    from teacher_service.app import deploy
    from teacher_service.grpc.ingress import (
        WATCH_INTERVAL_S,
        find_ingress,
        ingress_address,
    )

    app = "kd-teacher-grpc-lifetime"
    deploy(grpc_teacher(app))
    port = int(ingress_address(app).rsplit(":", 1)[1])
    assert connects("127.0.0.1", port)
    serve.delete(app)
    deadline = time.monotonic() + 10 * WATCH_INTERVAL_S + 30
    while find_ingress(app) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert find_ingress(app) is None, "the ingress outlived its app"
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free again


# ------------------------------------------------------------------------------------ bearer token
def token_file(path, text: str, mode: int = 0o600):
    path.write_text(text)
    path.chmod(mode)
    return path


def test_token_file_must_be_private_and_nonempty(tmp_path):
    from teacher_service.grpc.auth import TokenCheck, UnauthenticatedError, read_token_file

    path = token_file(tmp_path / "token", "s3cret\n", 0o644)
    with pytest.raises(ValueError, match="readable by other users .*chmod 600"):
        read_token_file(str(path))
    with pytest.raises(ValueError, match="readable by other users"):
        with_grpc(token_file=str(path))
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


TABLE = """# caller  max-weight  token
capped   4    tok-capped-1
capped   4    tok-capped-2
wide     50   tok-wide
"""


def test_a_token_table_maps_tokens_to_names_and_weight_caps(tmp_path):
    from teacher_service.grpc.auth import TokenCheck, UnauthenticatedError, read_token_table
    from teacher_service.grpc.caller_limits import CallerGrant

    table = read_token_table(str(token_file(tmp_path / "table", TABLE)), max_weight=100.0)
    assert table == {"tok-capped-1": CallerGrant("capped", 4.0), "tok-capped-2": CallerGrant("capped", 4.0),
                     "tok-wide": CallerGrant("wide", 50.0)}
    one = read_token_table(str(token_file(tmp_path / "one", "s3cret\n")), 100.0)
    assert one == {"s3cret": CallerGrant(None, 100.0)}  # a one-token file: as before
    check = TokenCheck(table)
    assert check.check([("authorization", "Bearer tok-wide")]) == CallerGrant("wide", 50.0)
    with pytest.raises(UnauthenticatedError):
        check.check([("authorization", "Bearer capped")])  # a name is not a token
    bad = {"two fields": ("capped tok-x-secret", "got 2 fields"),
           "bad name": ("-x 4 tok-x-secret", "caller name"),
           "weight": ("x four tok-x-secret", "not a number"),
           "cap": ("x 101 tok-x-secret", r"outside \(0, serving.max_run_weight=100\]"),
           "duplicate": ("a 1 tok-x-secret\nb 2 tok-x-secret", "already given to 'a'"),
           "empty": ("# only a comment", "no token")}
    for name, (text, message) in bad.items():
        with pytest.raises(ValueError, match=message) as e:
            read_token_table(str(token_file(tmp_path / name.replace(" ", "-"), text)), max_weight=100.0)
        assert "secret" not in str(e.value), name  # errors never echo a token
    with pytest.raises(ValueError, match="serving.max_run_weight=3"):  # a cap over the pool's limit: refused at once
        TeacherConfig.from_dict({**TINY, "serving": {"max_run_weight": 3.0},
                                 "grpc": {"token_file": str(tmp_path / "table")}})


class RecordingBackend:
    """Stands in for the teacher app behind the ingress: records the (run, weight) each request reaches it with."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, float]] = []

    async def embed(self, request: EmbedRequest) -> EmbedResponse:
        self.seen.append((request.run, request.weight))
        return EmbedResponse(keys=list(request.keys), image_features=None,
                             text_features=np.zeros((len(request), 4), np.float16), logit_scale=1.0,
                             logit_bias=None, fingerprint="fake")


def reached_backend_as(cfg: TeacherConfig, calls: list[tuple[dict, float]]) -> list[tuple[str, float]]:
    """Send one request per (client options, weight asked) through a real ingress server; what the backend saw."""
    import asyncio

    from teacher_service.grpc.client import TeacherGrpcClient
    from teacher_service.grpc.ingress import TeacherServicer, serve_grpc

    def send(target: str, options: dict, weight: float) -> None:
        with TeacherGrpcClient(target, **options) as client:
            client.embed_request(EmbedRequest(keys=["a"], tokens=make_request(1).tokens, weight=weight))

    async def scenario() -> list[tuple[str, float]]:
        backend = RecordingBackend()
        server, port = await serve_grpc(TeacherServicer(cfg, backend), "127.0.0.1", 0)
        try:
            for options, weight in calls:
                await asyncio.to_thread(send, f"127.0.0.1:{port}", options, weight)
        finally:
            await server.stop(None)
        return backend.seen

    return asyncio.run(scenario())


def test_the_ingress_grants_weights_and_names_from_the_token_not_the_request(tmp_path):
    open_door = TeacherConfig.from_dict(TINY)
    assert reached_backend_as(open_door, [({"caller": "greedy"}, 100.0), ({"caller": "modest"}, 0.5)]) == [
        ("grpc:greedy", 1.0), ("grpc:modest", 1.0)]  # unauthenticated: weight 1 whatever was asked
    shared = with_grpc(token_file=str(token_file(tmp_path / "one", "s3cret")))
    assert reached_backend_as(shared, [({"token": "s3cret", "caller": "x"}, 100.0), ({"token": "s3cret"}, 7.0)]) == [
        ("grpc:x", 100.0), ("grpc:127.0.0.1", 7.0)]  # one shared token: as before (self-named, up to max_run_weight)
    table = with_grpc(token_file=str(token_file(tmp_path / "table", TABLE)))
    calls = [({"token": "tok-capped-1", "caller": "wide"}, 100.0), ({"token": "tok-capped-2"}, 2.0),
             ({"token": "tok-wide", "caller": "capped"}, 100.0)]
    assert reached_backend_as(table, calls) == [("grpc:capped", 4.0), ("grpc:capped", 2.0), ("grpc:wide", 50.0)]


class RecordingSink:
    """The part of `stats.MetricsSink` a refusal reaches."""

    def __init__(self) -> None:
        self.errors: list[tuple[str, str]] = []

    def error(self, run: str, kind: str) -> None:
        self.errors.append((run, kind))


def test_the_ingress_mirrors_its_refusals_to_its_metrics_sink(tmp_path):
    """What the ingress refuses never reaches a replica, so only the ingress can export it: each
    refusal goes to its sink (Ray metrics in the ingress actor) under the caller and kind."""
    import asyncio

    from teacher_service.grpc.auth import UnauthenticatedError
    from teacher_service.grpc.client import TeacherGrpcClient
    from teacher_service.grpc.ingress import TeacherServicer, serve_grpc

    cfg = with_grpc(token_file=str(token_file(tmp_path / "token", "s3cret")))
    sink, backend = RecordingSink(), RecordingBackend()

    def send(target: str, token: str) -> None:
        with TeacherGrpcClient(target, token=token, caller="probe") as client:
            client.embed_request(EmbedRequest(keys=["a"], tokens=make_request(1).tokens))

    async def scenario() -> None:
        server, port = await serve_grpc(TeacherServicer(cfg, backend, sink=sink), "127.0.0.1", 0)
        try:
            with pytest.raises(UnauthenticatedError):
                await asyncio.to_thread(send, f"127.0.0.1:{port}", "wrong")
            await asyncio.to_thread(send, f"127.0.0.1:{port}", "s3cret")
        finally:
            await server.stop(None)

    asyncio.run(scenario())
    assert sink.errors == [("grpc:127.0.0.1", "unauthenticated")] and len(backend.seen) == 1


@pytest.mark.ray
def test_grpc_refuses_calls_without_the_bearer_token(ray_cluster, tmp_path):
    from teacher_service.grpc.auth import UnauthenticatedError
    from teacher_service.app import collect_stats, delete_teacher, deploy, get_teacher_handle
    from teacher_service.grpc.client import TeacherGrpcClient
    from teacher_service.grpc.ingress import find_ingress, ingress_address

    token = token_file(tmp_path / "token", "kd-test-token")
    app = "kd-teacher-grpc-token"
    deploy(grpc_teacher(app, token_file=str(token)))
    try:
        handle = get_teacher_handle(app, timeout_s=300)
        target = ingress_address(app)
        with TeacherGrpcClient(target, app, token="kd-test-token") as client:
            client.wait_ready(timeout_s=60)
            assert client.embed(tokens=make_request(2).tokens).text_features.shape[0] == 2
            client.embed_request(EmbedRequest(keys=["w"], tokens=make_request(1).tokens, weight=7.0))
        assert collect_stats(handle)["runs"]["grpc:127.0.0.1"]["weight"] == 7.0  # one shared token: as before
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
        delete_teacher(app)
    assert find_ingress(app) is None  # `kd teacher stop` (delete_teacher) stops the ingress at once


@pytest.mark.ray
def test_a_token_mapped_to_a_cap_is_clamped_to_it_under_its_own_name(ray_cluster, tmp_path):
    from teacher_service.app import collect_stats, delete_teacher, deploy, get_teacher_handle
    from teacher_service.grpc.client import TeacherGrpcClient
    from teacher_service.grpc.ingress import ingress_address

    app = "kd-teacher-grpc-grants"
    deploy(grpc_teacher(app, token_file=str(token_file(tmp_path / "table", TABLE))))
    try:
        handle = get_teacher_handle(app, timeout_s=300)
        with TeacherGrpcClient(ingress_address(app), app, token="tok-capped-1", caller="wide") as client:
            client.wait_ready(timeout_s=60)
            client.embed_request(EmbedRequest(keys=["c0"], tokens=make_request(1).tokens, weight=100.0))
            runs = collect_stats(handle)["runs"]
    finally:
        delete_teacher(app)
    assert runs["grpc:capped"]["weight"] == 4.0 and runs["grpc:capped"]["samples"] == 1
    assert "grpc:wide" not in runs  # the name comes from the token, not from kd-caller


# ------------------------------------------------------------------------------------ caller limits
FLOOD_THREADS = 8


@pytest.mark.ray
def test_a_flooding_caller_is_refused_while_a_light_caller_is_answered(ray_cluster):
    """`flood` keeps 8 requests going (retrying refusals after 5 ms) against a limit of 4 in
    flight and 100 samples/s; `light` sends 8 samples every 0.25 s (32 samples/s) under its own
    name. The flood is refused both ways and counted; only admitted flood requests reach the
    replica; every light request is answered, none waits long behind the flood."""
    import threading
    import time

    from teacher_service.grpc.caller_limits import CallerLimitError
    from teacher_service.app import collect_stats, delete_teacher, deploy, get_teacher_handle
    from teacher_service.grpc.client import TeacherGrpcClient
    from teacher_service.grpc.ingress import find_ingress, ingress_address

    app = "kd-teacher-grpc-limits"
    deploy(grpc_teacher(app, caller_max_in_flight=4, caller_samples_per_s=100.0, caller_burst_samples=32))
    stop = threading.Event()
    flood = {"answered": 0, "rate_limited": 0, "in_flight_limit": 0, "other": []}
    light: dict = {"latencies": [], "errors": []}
    lock = threading.Lock()

    def flooder(client: TeacherGrpcClient, seed: int) -> None:
        request = make_request(8, seed=100 + seed)
        while not stop.is_set():
            try:
                client.embed(request.images, request.tokens)
                outcome = "answered"
            except CallerLimitError as e:
                outcome = e.reason
                time.sleep(0.005)
            except Exception as e:  # noqa: BLE001 - reported by the test
                outcome = None
                flood["other"].append(e)
            with lock:
                if outcome:
                    flood[outcome] += 1

    def light_caller(client: TeacherGrpcClient) -> None:
        for i in range(16):
            request = make_request(8, seed=200 + i)
            started = time.monotonic()
            try:
                client.embed(request.images, request.tokens, request.keys)
                light["latencies"].append(time.monotonic() - started)
            except Exception as e:  # noqa: BLE001 - reported by the test
                light["errors"].append(e)
            time.sleep(max(0.0, 0.25 - (time.monotonic() - started)))

    try:
        handle = get_teacher_handle(app, timeout_s=300)
        target = ingress_address(app)
        flood_client = TeacherGrpcClient(target, app, caller="flood")
        light_client = TeacherGrpcClient(target, app, caller="light")
        flood_client.wait_ready(timeout_s=60)
        threads = [threading.Thread(target=flooder, args=(flood_client, i), daemon=True) for i in range(FLOOD_THREADS)]
        for t in threads:
            t.start()
        light_caller(light_client)  # ~4 s under the flood
        stop.set()
        for t in threads:
            t.join(timeout=60)
        stats = collect_stats(handle)
        flood_client.close()
        light_client.close()
    finally:
        stop.set()
        delete_teacher(app)
    latencies = sorted(light["latencies"])
    record("grpc_caller_limits", {"flood_threads": FLOOD_THREADS, "flood_answered": flood["answered"],
                                  "flood_refused_rate_limited": flood["rate_limited"],
                                  "flood_refused_in_flight_limit": flood["in_flight_limit"],
                                  "light_answered": len(latencies), "light_sent": 16,
                                  "light_p50_ms": round(1000 * latencies[len(latencies) // 2]),
                                  "light_max_ms": round(1000 * latencies[-1])})
    print(f"flood: {flood['answered']} answered, {flood['rate_limited']} refused rate_limited, "
          f"{flood['in_flight_limit']} refused in_flight_limit; light: {len(latencies)}/16 answered, "
          f"latency p50 {1000 * latencies[len(latencies) // 2]:.0f} ms, max {1000 * latencies[-1]:.0f} ms")
    assert not flood["other"] and not light["errors"], (flood["other"], light["errors"])
    assert len(latencies) == 16 and latencies[-1] < 5.0  # generous: a forward here takes milliseconds
    assert flood["answered"] > 0 and flood["rate_limited"] > 0 and flood["in_flight_limit"] > 0
    assert stats["errors_rate_limited"] == flood["rate_limited"]
    assert stats["errors_in_flight_limit"] == flood["in_flight_limit"]
    runs = stats["runs"]
    assert runs["grpc:flood"]["requests"] == flood["answered"]  # refused requests never reached the replica
    assert runs["grpc:flood"]["requests_received"] == flood["answered"] + flood["rate_limited"] + flood["in_flight_limit"]
    assert runs["grpc:light"]["requests"] == 16 and runs["grpc:light"]["errors"] == 0
    assert find_ingress(app) is None
