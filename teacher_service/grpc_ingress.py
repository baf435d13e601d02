"""gRPC ingress: proto <-> protocol conversion, wire limits, status codes, and starting Serve with gRPC.

Ray Serve's gRPC proxy forwards the rpc `Embed` to the deployment method named `Embed` (likewise
`Stats`, `Health`), so the deployment decodes the proto here, runs the same path as the handle's
`embed`, and encodes the reply here. Tensors are raw little-endian bytes with a dtype name from a
short allow-list and a shape, never pickle: a client in any language can build them, and a
malicious payload can at worst be refused.

Serve facts this module works around (checked against ray 2.60 sources):
- The proxy's gRPC options are fixed when Serve starts on a cluster; a later `serve.start` with
  other options is ignored. `start_serve` therefore has to run before anything else starts Serve,
  and says so when it finds Serve already running without the teacher's servicer.
- The proxy binds `[::]:<port>` (all interfaces) and gRPCOptions has no host field, so it cannot
  be limited to loopback from here: keep the port closed at the firewall / security group, and use
  the bearer-token slot of the client once the server checks it.
- The proxy's own message limit is process-wide (env RAY_SERVE_GRPC_MAX_MESSAGE_SIZE, default
  2 GiB, read when the proxy starts). The per-app limit `max_request_bytes` is enforced by the
  deployment before decoding and answered with RESOURCE_EXHAUSTED.
- A deployment sets the status by calling `grpc_context.set_code/set_details` (the method must take
  a `grpc_context` argument) and returning a reply; Serve copies the code to the client.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from .proto import teacher_pb2 as pb
from .protocol import EmbedRequest, EmbedResponse, RequestError

SERVICER_FUNCTION = "teacher_service.proto.teacher_pb2_grpc.add_TeacherServiceServicer_to_server"
SERVICE_NAME = "kd.teacher.v1.TeacherService"
DEFAULT_GRPC_PORT = 9000
DEFAULT_MAX_REQUEST_BYTES = 64 * 2**20
WIRE_DTYPES = ("uint8", "int32", "int64", "float16", "float32")
MAX_DIMS = 8
MAX_DETAILS_CHARS = 2000  # status details travel in HTTP/2 trailers (Serve truncates at 4096)


class RequestTooLargeError(RequestError):
    """A request over the byte limit; answered RESOURCE_EXHAUSTED rather than INVALID_ARGUMENT."""


class GrpcUnavailableError(RuntimeError):
    """Serve runs on this cluster without the teacher's gRPC servicer (options are fixed at start)."""


@dataclass(frozen=True)
class WireLimits:
    """Bounds checked on the raw proto before any array is built."""

    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_dims: int = MAX_DIMS

    def __post_init__(self) -> None:
        if not (isinstance(self.max_request_bytes, int) and self.max_request_bytes >= 1):
            raise ValueError(f"max_request_bytes: expected an int >= 1, got {self.max_request_bytes!r}")


# ------------------------------------------------------------------------------------------ tensors
def tensor_to_proto(array: np.ndarray) -> pb.Tensor:
    """Raw little-endian C-order bytes + dtype name + shape; refuses dtypes outside WIRE_DTYPES."""
    array = np.asarray(array)
    name = array.dtype.name
    if name not in WIRE_DTYPES:
        raise ValueError(f"tensor: dtype {name} cannot go on the wire; expected one of {WIRE_DTYPES}")
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return pb.Tensor(dtype=name, shape=list(array.shape), data=data)


def tensor_from_proto(tensor: pb.Tensor, field: str, max_dims: int = MAX_DIMS) -> np.ndarray:
    """A writable native-order array; RequestError naming `field` when dtype, shape or size is off."""
    if tensor.dtype not in WIRE_DTYPES:
        raise RequestError(f"{field}: dtype {tensor.dtype!r} is not accepted; expected one of {WIRE_DTYPES}")
    shape = tuple(int(d) for d in tensor.shape)
    if len(shape) > max_dims:
        raise RequestError(f"{field}: {len(shape)} dimensions, at most {max_dims} accepted")
    if any(d < 0 for d in shape):
        raise RequestError(f"{field}: negative dimension in shape {list(shape)}")
    dtype = np.dtype(tensor.dtype).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise RequestError(f"{field}: shape {list(shape)} of {tensor.dtype} needs {expected} bytes, "
                           f"got {len(tensor.data)}")
    flat = np.frombuffer(tensor.data, dtype=dtype)
    return flat.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


# ------------------------------------------------------------------------------------------ embed
def encode_embed_request(request: EmbedRequest) -> pb.EmbedRequest:
    """Client side: protocol EmbedRequest → proto (validation is the server's job)."""
    msg = pb.EmbedRequest(keys=list(request.keys), run=request.run or "", view=request.view or "",
                          weight=float(request.weight))
    if request.images is not None:
        msg.images.CopyFrom(tensor_to_proto(request.images))
    if request.tokens is not None:
        msg.tokens.CopyFrom(tensor_to_proto(request.tokens))
    return msg


def decode_embed_request(msg: pb.EmbedRequest, limits: WireLimits = WireLimits()) -> EmbedRequest:
    """Server side: proto → protocol EmbedRequest, checking size first (RequestTooLargeError).

    Only the wire format is checked here; the content (shapes vs keys, dtypes, token ids) is
    checked by the same `validate_request` the handle path uses.
    """
    if not isinstance(msg, pb.EmbedRequest):
        raise RequestError(f"request: expected {pb.EmbedRequest.DESCRIPTOR.full_name}, got {type(msg).__name__}")
    size = msg.ByteSize()
    if size > limits.max_request_bytes:
        raise RequestTooLargeError(f"request: {size} bytes exceeds max_request_bytes={limits.max_request_bytes}; "
                                   "split it into smaller requests")
    images = tensor_from_proto(msg.images, "images", limits.max_dims) if msg.HasField("images") else None
    tokens = tensor_from_proto(msg.tokens, "tokens", limits.max_dims) if msg.HasField("tokens") else None
    return EmbedRequest(keys=list(msg.keys), images=images, tokens=tokens, run=msg.run, view=msg.view,
                        weight=msg.weight if msg.weight != 0 else 1.0)


def encode_embed_reply(response: EmbedResponse) -> pb.EmbedReply:
    """Server side: the fp16 features go out byte for byte as the handle path returns them."""
    msg = pb.EmbedReply(keys=list(response.keys), logit_scale=float(response.logit_scale),
                        fingerprint=response.fingerprint)
    if response.image_features is not None:
        msg.image_features.CopyFrom(tensor_to_proto(response.image_features))
    if response.text_features is not None:
        msg.text_features.CopyFrom(tensor_to_proto(response.text_features))
    if response.logit_bias is not None:
        msg.logit_bias = float(response.logit_bias)
    return msg


def decode_embed_reply(msg: pb.EmbedReply) -> EmbedResponse:
    """Client side: proto → protocol EmbedResponse (numpy float16 features)."""
    def features(field: str) -> np.ndarray | None:
        return tensor_from_proto(getattr(msg, field), field) if msg.HasField(field) else None

    return EmbedResponse(keys=list(msg.keys), image_features=features("image_features"),
                         text_features=features("text_features"), logit_scale=msg.logit_scale,
                         logit_bias=msg.logit_bias if msg.HasField("logit_bias") else None,
                         fingerprint=msg.fingerprint)


# ------------------------------------------------------------------------------------ stats/health
def encode_stats_reply(stats: dict[str, Any]) -> pb.StatsReply:
    """Numeric top-level entries → `counters`, per-run numbers → `runs`, everything → `json`."""
    import json

    msg = pb.StatsReply(app_name=str(stats.get("app_name", "")), fingerprint=str(stats.get("fingerprint", "")),
                        json=json.dumps(stats, sort_keys=True, default=str))
    msg.counters.update({k: float(v) for k, v in stats.items() if _is_number(v)})
    for run, counters in sorted(stats.get("runs", {}).items()):
        msg.runs.add(run=run).counters.update({k: float(v) for k, v in counters.items() if _is_number(v)})
    replicas = stats.get("replicas")
    msg.replicas.extend(sorted(replicas) if isinstance(replicas, dict) else [str(stats.get("replica", ""))])
    return msg


def encode_health_reply(info: dict[str, Any]) -> pb.HealthReply:
    return pb.HealthReply(serving=True, app_name=str(info.get("app_name", "")),
                          fingerprint=str(info.get("fingerprint", "")), model=str(info.get("model", "")),
                          embed_dim=int(info.get("embed_dim", 0)), max_batch_size=int(info.get("max_batch_size", 0)),
                          max_request_samples=int(info.get("max_request_samples", 0)),
                          max_request_bytes=int(info.get("max_request_bytes", 0)),
                          replica=str(info.get("replica", "")), uptime_s=float(info.get("uptime_s", 0.0)))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ----------------------------------------------------------------------------------------- status
def grpc_status_for(error: Exception) -> grpc.StatusCode:
    """UNAUTHENTICATED without the token, RESOURCE_EXHAUSTED for size refusals, INVALID_ARGUMENT for
    other refusals, INTERNAL otherwise."""
    from .auth import UnauthenticatedError

    if isinstance(error, UnauthenticatedError):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(error, RequestTooLargeError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, RequestError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def refuse(grpc_context: Any, error: Exception, empty_reply: Any) -> Any:
    """Answer a refused gRPC request: status code + the reason as details, and an empty reply.

    Without a gRPC context (the method was called through a Serve handle) the error is raised
    instead, so handle callers see the same RequestError as with `embed`.
    """
    if grpc_context is None:
        raise error
    grpc_context.set_code(grpc_status_for(error))
    grpc_context.set_details(str(error)[:MAX_DETAILS_CHARS])
    return empty_reply


# ------------------------------------------------------------------------------------ serve start
def grpc_options(port: int = DEFAULT_GRPC_PORT, request_timeout_s: float | None = None) -> dict[str, Any]:
    """`serve.start(grpc_options=...)` value that registers the teacher service on `port`."""
    return {"port": int(port), "grpc_servicer_functions": [SERVICER_FUNCTION],
            "request_timeout_s": request_timeout_s}


def start_serve(grpc_port: int = DEFAULT_GRPC_PORT, *, http_port: int | None = None,
                http_host: str = "127.0.0.1", request_timeout_s: float | None = None) -> int:
    """Start Serve on the connected cluster with the teacher's gRPC service; return its gRPC port.

    Call it before anything else starts Serve (`serve.run` starts it with default options). When
    Serve already runs, returns the port it serves the teacher service on, or raises
    GrpcUnavailableError: the proxy options cannot change without `serve.shutdown()`.
    """
    from ray import serve

    running = running_grpc_options()
    if running is None:
        http = {"host": http_host, **({"port": int(http_port)} if http_port is not None else {})}
        serve.start(http_options=http, grpc_options=grpc_options(grpc_port, request_timeout_s))
        return int(grpc_port)
    if SERVICER_FUNCTION not in running.get("grpc_servicer_functions", []):
        raise GrpcUnavailableError(
            "Serve is already running on this cluster without the teacher's gRPC service, and Serve fixes "
            "its proxy options when it starts. Shut Serve down (`serve shutdown`, which deletes its apps) "
            f"and start it with teacher_service.grpc_ingress.start_serve(grpc_port=...) before deploying; "
            f"running gRPC options: {running}")
    return int(running["port"])


def running_grpc_options() -> dict[str, Any] | None:
    """The gRPC options of the Serve instance on the connected cluster, or None when Serve is not running.

    Reads the controller's config (a Serve-internal call, kept in this one place).
    """
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    options = ray.get(client._controller.get_grpc_config.remote())
    return {"port": options.port, "grpc_servicer_functions": list(options.grpc_servicer_functions),
            "request_timeout_s": options.request_timeout_s}
