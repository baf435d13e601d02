"""The gRPC wire format: proto <-> protocol conversion, wire limits and status codes.

Tensors are raw little-endian bytes with a dtype name from a short allow-list and a shape, never
pickle: a client in any language can build them, and a malicious payload can at worst be refused.
`decode_embed_request` checks the byte limit and the wire format only; the content is checked by
the same `validate_request` the handle path uses, in the replica.

The server that uses this is `teacher_service.grpc.ingress` (our own grpc.aio server in a Ray
actor). Serve's own gRPC proxy is not used: in ray 2.60 it binds `[::]:<port>` with no host
option (`ray/serve/_private/grpc_util.py`) and its options are fixed when Serve starts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from teacher_service.grpc.proto import teacher_pb2 as pb
from teacher_service.contract.answer_codec import ANSWER_DTYPES, DEFAULT_ANSWER_DTYPE, EncodedRows
from teacher_service.contract.protocol import SHA256_BYTES, EmbedRequest, EmbedResponse, ImageRefs, RequestError

SERVICE_NAME = "kd.teacher.v1.TeacherService"
DEFAULT_GRPC_PORT = 9000
DEFAULT_MAX_REQUEST_BYTES = 64 * 2**20
WIRE_DTYPES = ("uint8", "int8", "uint16", "int32", "int64", "float16", "float32")
MAX_DIMS = 8
MAX_DETAILS_CHARS = 2000  # status details travel in HTTP/2 trailers: keep them short
REFUSAL_METADATA = "kd-refusal"  # trailing metadata naming why a request was refused (counter kind)


class RequestTooLargeError(RequestError):
    """A request over the byte limit; answered RESOURCE_EXHAUSTED rather than INVALID_ARGUMENT."""


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
                          weight=float(request.weight), answer_dtype=request.answer_dtype or "")
    if request.images is not None:
        msg.images.CopyFrom(tensor_to_proto(request.images))
    if request.tokens is not None:
        msg.tokens.CopyFrom(tensor_to_proto(request.tokens))
    if request.image_refs is not None:
        msg.image_refs.CopyFrom(encode_image_refs(request.image_refs))
    return msg


def encode_image_refs(refs: ImageRefs) -> pb.ImageRefs:
    """Protocol ImageRefs → proto: the recipe's five fields, the digests as one byte string."""
    r = refs.recipe
    return pb.ImageRefs(shards=list(refs.shards), shard_index=[int(i) for i in refs.shard_index],
                        views=[int(v) for v in refs.views], sha256=np.ascontiguousarray(refs.sha256).tobytes(),
                        augment_function=r["function"], augment_version=r["version"],
                        image_size=int(r["image_size"]), seed=int(r["seed"]), train=bool(r["train"]))


def decode_image_refs(msg: pb.ImageRefs) -> ImageRefs:
    """Proto → protocol ImageRefs; a digest string that is not 32 bytes a sample is refused here."""
    n = len(msg.shard_index)
    if len(msg.sha256) != SHA256_BYTES * n:
        raise RequestError(f"image_refs.sha256: {len(msg.sha256)} bytes for {n} samples, expected {SHA256_BYTES * n}")
    recipe = {"function": msg.augment_function, "version": msg.augment_version, "image_size": msg.image_size,
              "seed": msg.seed, "train": msg.train}
    return ImageRefs(shards=list(msg.shards), shard_index=np.asarray(msg.shard_index, dtype=np.int64),
                     views=np.asarray(msg.views, dtype=np.int64),
                     sha256=np.frombuffer(msg.sha256, dtype=np.uint8).reshape(n, SHA256_BYTES).copy(), recipe=recipe)


def decode_embed_request(msg: pb.EmbedRequest, limits: WireLimits = WireLimits()) -> EmbedRequest:
    """Server side: proto → protocol EmbedRequest, checking size first (RequestTooLargeError).

    Only the wire format is checked here; the content (shapes vs keys, dtypes, token ids) is
    checked by the same `validate_request` the handle path uses. A request without `answer_dtype`
    (every client older than the field) is answered in fp16, whatever the pool's default.
    """
    if not isinstance(msg, pb.EmbedRequest):
        raise RequestError(f"request: expected {pb.EmbedRequest.DESCRIPTOR.full_name}, got {type(msg).__name__}")
    size = msg.ByteSize()
    if size > limits.max_request_bytes:
        raise RequestTooLargeError(f"request: {size} bytes exceeds max_request_bytes={limits.max_request_bytes}; "
                                   "split it into smaller requests")
    images = tensor_from_proto(msg.images, "images", limits.max_dims) if msg.HasField("images") else None
    tokens = tensor_from_proto(msg.tokens, "tokens", limits.max_dims) if msg.HasField("tokens") else None
    refs = decode_image_refs(msg.image_refs) if msg.HasField("image_refs") else None
    return EmbedRequest(keys=list(msg.keys), images=images, tokens=tokens, run=msg.run, view=msg.view,
                        weight=msg.weight if msg.weight != 0 else 1.0, image_refs=refs,
                        answer_dtype=msg.answer_dtype or DEFAULT_ANSWER_DTYPE)


FEATURE_FIELDS = {"image_features": "image_scales", "text_features": "text_scales"}  # features → their int8 scales


def encode_embed_reply(response: EmbedResponse) -> pb.EmbedReply:
    """Server side: the features go out as the handle path returns them; an fp16 answer byte for byte
    as before `answer_dtype` existed (the field left empty), bf16 and int8 with the field set."""
    msg = pb.EmbedReply(keys=list(response.keys), logit_scale=float(response.logit_scale),
                        fingerprint=response.fingerprint)
    for field, scales in FEATURE_FIELDS.items():
        value = getattr(response, field)
        if isinstance(value, EncodedRows):
            msg.answer_dtype = "" if value.dtype == DEFAULT_ANSWER_DTYPE else value.dtype
            value, scale = value.values, value.scales
            if scale is not None:
                getattr(msg, scales).CopyFrom(tensor_to_proto(scale))
        if value is not None:
            getattr(msg, field).CopyFrom(tensor_to_proto(value))
    if response.logit_bias is not None:
        msg.logit_bias = float(response.logit_bias)
    return msg


def decode_embed_reply(msg: pb.EmbedReply) -> EmbedResponse:
    """Client side: proto → protocol EmbedResponse: float16 features for an fp16 answer,
    `EncodedRows` for bf16 and int8 (`answer_codec.decode_rows` decodes either)."""
    dtype = msg.answer_dtype or DEFAULT_ANSWER_DTYPE
    if dtype not in ANSWER_DTYPES:
        raise ValueError(f"EmbedReply.answer_dtype: {msg.answer_dtype!r} is not one of {ANSWER_DTYPES}")

    def features(field: str) -> np.ndarray | EncodedRows | None:
        if not msg.HasField(field):
            return None
        values = tensor_from_proto(getattr(msg, field), field)
        if dtype == DEFAULT_ANSWER_DTYPE:
            return values
        scales = FEATURE_FIELDS[field]
        scale = tensor_from_proto(getattr(msg, scales), scales) if msg.HasField(scales) else None
        return EncodedRows(dtype, values, scale)

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
    """UNAUTHENTICATED without the token, RESOURCE_EXHAUSTED for size and caller-limit refusals,
    INVALID_ARGUMENT for other refusals, INTERNAL otherwise."""
    from teacher_service.grpc.auth import UnauthenticatedError
    from teacher_service.grpc.caller_limits import CallerLimitError

    if isinstance(error, UnauthenticatedError):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(error, (RequestTooLargeError, CallerLimitError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, RequestError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def refusal_kind(error: Exception) -> str:
    """The counter kind of a refusal (`errors_<kind>` in the teacher's stats), sent as `kd-refusal`."""
    from teacher_service.grpc.auth import UnauthenticatedError
    from teacher_service.grpc.caller_limits import CallerLimitError

    if isinstance(error, UnauthenticatedError):
        return "unauthenticated"
    if isinstance(error, RequestTooLargeError):
        return "too_large"
    if isinstance(error, CallerLimitError):
        return error.reason
    if isinstance(error, RequestError):
        return "invalid"
    return "internal"
