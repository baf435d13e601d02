"""Bearer-token check for callers outside Ray (the gRPC ingress).

The token lives in a file only its owner can read (like an SSH key): a token file readable by
group or others is refused, since anyone on the machine could then call the teacher. Replicas read
it once at start and keep only its SHA-256; requests are compared in constant time. Callers inside
the Ray cluster use the Serve handle and are not asked: reaching the cluster is already trust.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import stat
from collections.abc import Iterable


class UnauthenticatedError(PermissionError):
    """A gRPC call without the bearer token the teacher requires, or with another one."""


def read_token_file(path: str) -> str:
    """The token in `path` (surrounding whitespace stripped); refuses a missing, empty or shared file."""
    try:
        info = os.stat(path)
    except OSError as e:
        raise ValueError(f"grpc_token_file {path!r}: {e.strerror}") from e
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"grpc_token_file {path!r} is readable by other users (mode {stat.filemode(info.st_mode)}); "
                         f"chmod 600 it")
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"grpc_token_file {path!r} is empty")
    return token


class TokenCheck:
    """Accepts metadata carrying "authorization: Bearer <token>" for the configured token only."""

    def __init__(self, token: str):
        self._digest = hashlib.sha256(token.encode("utf-8")).digest()

    @classmethod
    def from_file(cls, path: str | None) -> TokenCheck | None:
        return None if not path else cls(read_token_file(path))

    def check(self, metadata: Iterable[tuple[str, str]] | None) -> None:
        """Raise UnauthenticatedError unless `metadata` has the right bearer token."""
        offered = bearer_token(metadata)
        if offered is None:
            raise UnauthenticatedError("this teacher requires a bearer token: send metadata "
                                       "'authorization: Bearer <token>' (TeacherGrpcClient(token=...))")
        if not hmac.compare_digest(hashlib.sha256(offered.encode("utf-8")).digest(), self._digest):
            raise UnauthenticatedError("wrong bearer token")


def bearer_token(metadata: Iterable[tuple[str, str]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):].strip()
    return None
