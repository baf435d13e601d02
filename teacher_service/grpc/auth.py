"""Bearer tokens for callers outside Ray (the gRPC ingress), and what each token entitles its holder to.

The token file lives where only its owner can read it (like an SSH key): a file readable by group
or others is refused, since anyone on the machine could then call the teacher. It holds either

- one token (the whole file, no whitespace inside): every holder is the same authenticated
  caller, names itself with `kd-caller` metadata as before, and may ask any weight up to
  `serving.max_run_weight`; or
- a table, one caller per line, `<caller-name> <max-weight> <token>` (blank lines and `#`
  comments skipped; a name may have several tokens, for rotation): a holder is that caller
  whatever `kd-caller` it sends, and its requests run at most at that weight.

Who a caller is and how much of the teacher it may claim thus come from the token the server
checked, never from what the caller declares (`caller_limits.grant_weight`). The ingress reads the
file once at start and keeps only SHA-256s of the tokens; an offered token is compared against
every entry in constant time. Callers inside the Ray cluster use the Serve handle and are not
asked: reaching the cluster is already trust.
"""
from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Iterable

from teacher_service.grpc.caller_limits import CALLER_PATTERN, CallerGrant
from teacher_service.private_files import check_owner_only


class UnauthenticatedError(PermissionError):
    """A gRPC call without the bearer token the teacher requires, or with another one."""


def read_token_file(path: str) -> str:
    """The file's text (surrounding whitespace stripped); refuses a missing, empty or shared file."""
    check_owner_only(path, "grpc.token_file")
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token:
        raise ValueError(f"grpc.token_file {path!r} is empty")
    return token


def read_token_table(path: str, max_weight: float) -> dict[str, CallerGrant]:
    """token → CallerGrant from `path`: one shared token (no whitespace in the file) or a table."""
    text = read_token_file(path)
    if not any(ch.isspace() for ch in text):
        return {text: CallerGrant(name=None, max_weight=float(max_weight))}
    table: dict[str, CallerGrant] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        token, grant = _table_entry(line, f"grpc.token_file {path!r} line {number}", max_weight)
        if token in table:
            raise ValueError(f"grpc.token_file {path!r} line {number}: this token is already given to "
                             f"{table[token].name!r}")
        table[token] = grant
    if not table:
        raise ValueError(f"grpc.token_file {path!r} has no token")
    return table


def _table_entry(line: str, where: str, max_weight: float) -> tuple[str, CallerGrant]:
    """One `<caller-name> <max-weight> <token>` line. Errors name the line, never a field's text:
    a malformed line may be a token (or a single-token file with whitespace in it)."""
    fields = line.split()
    if len(fields) != 3:
        raise ValueError(f"{where}: expected '<caller-name> <max-weight> <token>', got {len(fields)} fields "
                         "(a single-token file holds the token alone, without whitespace)")
    name, weight_text, token = fields
    if not CALLER_PATTERN.fullmatch(name):
        raise ValueError(f"{where}: the caller name is not 1-48 letters, digits and _.@- starting with a letter "
                         "or digit")
    try:
        weight = float(weight_text)
    except ValueError:
        raise ValueError(f"{where}: the max-weight is not a number") from None
    if not (math.isfinite(weight) and 0 < weight <= max_weight):
        raise ValueError(f"{where}: max-weight {weight:g} outside (0, serving.max_run_weight={max_weight:g}]")
    return token, CallerGrant(name=name, max_weight=weight)


class TokenCheck:
    """Accepts metadata carrying "authorization: Bearer <token>" for a configured token; returns its grant."""

    def __init__(self, grants: dict[str, CallerGrant]):
        self._grants = [(_sha256(token), grant) for token, grant in grants.items()]

    @classmethod
    def from_file(cls, path: str | None, max_weight: float = 100.0) -> TokenCheck | None:
        return None if not path else cls(read_token_table(path, max_weight))

    def check(self, metadata: Iterable[tuple[str, str]] | None) -> CallerGrant:
        """The grant of the bearer token in `metadata`; UnauthenticatedError without a known one."""
        offered = bearer_token(metadata)
        if offered is None:
            raise UnauthenticatedError("this teacher requires a bearer token: send metadata "
                                       "'authorization: Bearer <token>' (TeacherGrpcClient(token=...))")
        digest, found = _sha256(offered), None
        for known, grant in self._grants:  # no early exit: the time taken does not depend on which entry matched
            if hmac.compare_digest(digest, known):
                found = grant
        if found is None:
            raise UnauthenticatedError("wrong bearer token")
        return found


def bearer_token(metadata: Iterable[tuple[str, str]] | None) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):].strip()
    return None


def _sha256(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()
