"""A small Python client for the teacher's gRPC API, for callers outside the Ray cluster.

It talks to the app's gRPC ingress (`teacher_service.grpc.ingress`, `kd teacher serve --grpc-port`).
Inside Ray, use the Serve handle (`teacher_service.app.get_teacher_handle`): it skips the ingress hop.
Both paths run the same batched code and return the same `EmbedResponse`, bit for bit.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Sequence

import grpc
import numpy as np

from teacher_service.grpc.auth import UnauthenticatedError
from teacher_service.grpc.caller_limits import CALLER_METADATA, REFUSAL_REASONS, CallerLimitError
from teacher_service.grpc.codec import (
    REFUSAL_METADATA,
    RequestTooLargeError,
    decode_embed_reply,
    encode_embed_request,
)
from teacher_service.grpc.proto import teacher_pb2 as pb
from teacher_service.grpc.proto import teacher_pb2_grpc as pb_grpc
from teacher_service.contract.protocol import EmbedRequest, EmbedResponse, RequestError
from teacher_service.private_files import check_owner_only

DEFAULT_MAX_RECEIVE_BYTES = 256 * 2**20  # gRPC's client default (4 MiB) is too small for big batches
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


@dataclass(frozen=True)
class TlsOptions:
    """How a client speaks TLS to the ingress: PEM file paths, read when the channel is made.

    `root_ca`: the CA that signed the server's certificate (None: gRPC's bundled public roots);
    `client_cert` / `client_key`: this client's certificate and key, for a server that requires
    mutual TLS (the key must be owner-only, as on the server); `server_name`: the name to check the
    server's certificate against when `target` is an address the certificate does not list.
    """

    root_ca: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.client_cert) != bool(self.client_key):
            raise ValueError("TlsOptions: client_cert and client_key come together (mutual TLS needs both)")
        if self.client_key:
            check_owner_only(self.client_key, "client_key")
        return grpc.ssl_channel_credentials(root_certificates=_read(self.root_ca), private_key=_read(self.client_key),
                                            certificate_chain=_read(self.client_cert))

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


class TeacherGrpcClient:
    """`embed` / `stats` / `health` against one teacher app's gRPC ingress.

    `caller` goes out as `kd-caller` metadata: the name the ingress applies per-caller limits to
    and the run the replicas account and fair-share this client's requests under ("grpc:<caller>");
    without it the ingress uses the client's host, and a token the server's token file maps to a
    name overrides it. The fair-share weight a request asks for is granted by the server: 1
    without a token, at most the token's cap with one. `app_name`, when set, goes out as
    ("application", name) and the ingress refuses it NOT_FOUND if it serves another app. `token`,
    when set, is sent as "authorization: Bearer <token>"; a teacher with `grpc.token_file` refuses
    calls without it (UnauthenticatedError). Refusals raise RequestError (INVALID_ARGUMENT),
    RequestTooLargeError (RESOURCE_EXHAUSTED, over the byte limit), CallerLimitError
    (RESOURCE_EXHAUSTED, over this caller's in-flight or samples/s limit: retry later) or
    UnauthenticatedError (UNAUTHENTICATED) with the server's reason, and the gRPC status as
    `.code`; other failures raise grpc.RpcError.

    TLS (`TlsOptions`, or `tls_root_ca=` etc.): the server's certificate is checked against
    `root_ca` (a PEM file; gRPC's bundled public roots when None) and the name in `target` (or
    `server_name`); `client_cert` + `client_key` answer a server that requires mutual TLS. Without
    TLS the channel is plaintext, and a TLS-only ingress fails the call UNAVAILABLE.
    """

    def __init__(self, target: str = "127.0.0.1:9000", app_name: str | None = None, *,
                 token: str | None = None, caller: str | None = None, timeout_s: float = 60.0,
                 max_receive_bytes: int = DEFAULT_MAX_RECEIVE_BYTES, tls: TlsOptions | None = None,
                 channel: grpc.Channel | None = None):
        self.target = target
        self.app_name = app_name
        self.timeout_s = timeout_s
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", max_receive_bytes)]
        if channel is None and tls is not None:
            channel = grpc.secure_channel(target, tls.credentials(), options=options + tls.channel_options())
        self._channel = channel or grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.TeacherServiceStub(self._channel)
        self._metadata: tuple[tuple[str, str], ...] = ()
        if app_name:
            self._metadata += (("application", app_name),)
        if caller:
            self._metadata += ((CALLER_METADATA, caller),)
        if token:
            self._metadata += (("authorization", f"Bearer {token}"),)

    def embed(self, images: np.ndarray | None = None, tokens: np.ndarray | None = None,
              keys: Sequence[str] | None = None, view: str = "", answer_dtype: str | None = None) -> EmbedResponse:
        """Features for one mini-batch: uint8 images [B, H, W, 3] and/or int64 tokens [B, L].

        `keys` default to "0".."B-1". Returns features row i for keys[i]: float16 numpy arrays, or
        with `answer_dtype` "bf16" / "int8" `answer_codec.EncodedRows` (about half the bytes for
        int8; `answer_codec.decode_rows` gives float32). None asks for fp16 over gRPC, not the
        pool's default. A `view` (see `augment.view_identity`) opts into coalescing: the pool
        answers a sample whose pixels and tokens it computed recently without computing it again.
        """
        b = len(images) if images is not None else len(tokens) if tokens is not None else 0
        keys = [str(i) for i in range(b)] if keys is None else list(keys)
        return self.embed_request(EmbedRequest(keys=keys, images=images, tokens=tokens, view=view,
                                               answer_dtype=answer_dtype))

    def embed_request(self, request: EmbedRequest) -> EmbedResponse:
        """`embed` for a ready-made protocol EmbedRequest (its `run` is replaced by the ingress's caller)."""
        return decode_embed_reply(self._call(self._stub.Embed, encode_embed_request(request)))

    def stats(self, all_replicas: bool = False) -> dict[str, Any]:
        """The teacher's counters as a dict (see `deployment.TeacherCounters.snapshot`).

        One replica's unless `all_replicas` (then merged over every replica, by Serve broadcast).
        """
        return json.loads(self._call(self._stub.Stats, pb.StatsRequest(all_replicas=all_replicas)).json)

    def health(self) -> dict[str, Any]:
        """Identity and limits of the replica that answered; raises grpc.RpcError when not serving."""
        reply = self._call(self._stub.Health, pb.HealthRequest())
        return {f.name: getattr(reply, f.name) for f in reply.DESCRIPTOR.fields}

    def wait_ready(self, timeout_s: float = 60.0, poll_s: float = 0.25) -> dict[str, Any]:
        """`health()` once the ingress answers; retries UNAVAILABLE (not listening yet) until `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.health()
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or time.monotonic() + poll_s > deadline:
                    raise
            time.sleep(poll_s)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TeacherGrpcClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, method: Any, message: Any) -> Any:
        try:
            return method(message, metadata=self._metadata, timeout=self.timeout_s)
        except grpc.RpcError as e:
            refusal = _refusal(e)
            if refusal is None:
                raise
            raise refusal from e


def _refusal(error: grpc.RpcError) -> Exception | None:
    """The protocol error for a refused request, carrying the gRPC status as `.code`."""
    code = error.code() if hasattr(error, "code") else None
    kind = dict(error.trailing_metadata() or ()).get(REFUSAL_METADATA) if hasattr(error, "trailing_metadata") else None
    if kind in REFUSAL_REASONS:
        refusal: Exception = CallerLimitError(error.details(), kind)
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and kind == "too_large":
        refusal = RequestTooLargeError(error.details())
    elif code == grpc.StatusCode.INVALID_ARGUMENT:
        refusal = RequestError(error.details())
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        refusal = UnauthenticatedError(error.details())
    else:
        return None  # e.g. RESOURCE_EXHAUSTED from Serve's back-pressure, UNAVAILABLE: the raw RpcError
    refusal.code = code
    return refusal
