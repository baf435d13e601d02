"""Per-caller admission at the gRPC ingress: who is calling, and may they send this request now.

A caller holding a token the token file maps to a name (`auth`) is that name, whatever it
declares. Otherwise a caller is the `kd-caller` metadata name when the client sends one, else the
host part of its peer address (every connection from one machine is one caller); such names are
self-declared: they separate well-behaved clients (and their fair share on the replicas, where
the caller becomes the request's run), but a client can pick several names. The table of callers
is bounded (`max_callers`): idle callers are forgotten first, and past the bound new names share
one "other" entry, so rotating names buys nothing beyond that bound.

The fair-share weight a request runs at is granted, not chosen (`grant_weight`): 1 for a caller
the server did not authenticate, whatever it asks, and at most its token's cap for one it did.

Two limits per caller, each off when None:
- `max_in_flight`: Embed rpcs admitted and not answered yet. Bounds what one client can queue in
  the pool (and the ingress's memory for it).
- `samples_per_s` with a bucket of `burst_samples`: a token bucket in samples. A request takes
  as many tokens as it has samples or is refused; the bucket refills continuously.
Refusals are answered RESOURCE_EXHAUSTED immediately (never queued at the ingress), with the
limit and when to retry in the message, and counted per reason.
"""
from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from teacher_service.contract.protocol import RequestError

CALLER_METADATA = "kd-caller"
CALLER_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,47}")
OTHER_CALLERS = "other"
REFUSAL_REASONS = ("in_flight_limit", "rate_limited")
UNAUTHENTICATED_WEIGHT = 1.0


class CallerLimitError(RuntimeError):
    """A request over its caller's in-flight or samples/s limit (RESOURCE_EXHAUSTED); retry later.

    `reason` is one of REFUSAL_REASONS, `retry_after_s` when the bucket will hold enough (rate)
    or None (in-flight: when an earlier request is answered).
    """

    def __init__(self, message: str, reason: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


class InvalidCallerError(RequestError):
    """A `kd-caller` metadata value that is not a short printable name."""


@dataclass(frozen=True)
class CallerLimits:
    """Limits applied to each caller separately; None switches a limit off."""

    max_in_flight: int | None = 64
    samples_per_s: float | None = None
    burst_samples: int | None = None  # None: one second of samples_per_s
    max_callers: int = 256

    def __post_init__(self) -> None:
        if self.max_in_flight is not None and not (isinstance(self.max_in_flight, int) and self.max_in_flight >= 1):
            raise ValueError(f"grpc.caller_max_in_flight: expected an int >= 1 or None, got {self.max_in_flight!r}")
        if self.samples_per_s is not None and not self.samples_per_s > 0:
            raise ValueError(f"grpc.caller_samples_per_s: expected a number > 0 or None, got {self.samples_per_s!r}")
        if self.burst_samples is not None and not (isinstance(self.burst_samples, int) and self.burst_samples >= 1):
            raise ValueError(f"grpc.caller_burst_samples: expected an int >= 1 or None, got {self.burst_samples!r}")
        if not (isinstance(self.max_callers, int) and self.max_callers >= 1):
            raise ValueError(f"max_callers: expected an int >= 1, got {self.max_callers!r}")

    def bucket_size(self) -> float | None:
        if self.samples_per_s is None:
            return None
        return float(self.burst_samples) if self.burst_samples is not None else float(self.samples_per_s)


@dataclass(frozen=True)
class CallerGrant:
    """What a checked token entitles its holder to (`auth.read_token_table`).

    `name`: the caller the holder is, fixed by the server; None for a token shared by several
    callers (they name themselves). `max_weight`: the largest fair-share weight its requests run at.
    """

    name: str | None
    max_weight: float


def grant_weight(asked: object, grant: CallerGrant | None) -> object:
    """The weight a gRPC request runs at: UNAUTHENTICATED_WEIGHT when the server authenticated
    nobody (`grant` None), whatever was asked; else the ask clamped to the grant's cap. An ask that
    is not a positive finite number passes through unchanged, for the replica to refuse naming it."""
    if grant is None:
        return UNAUTHENTICATED_WEIGHT
    if isinstance(asked, bool) or not isinstance(asked, (int, float)) or not (math.isfinite(asked) and asked > 0):
        return asked
    return min(float(asked), grant.max_weight)


@dataclass
class _Caller:
    in_flight: int = 0
    tokens: float = 0.0
    refilled: float = 0.0


def caller_name(metadata: Iterable[tuple[str, str]] | None, peer: str) -> str:
    """The `kd-caller` metadata value (checked), else the host of `peer` ("ipv4:1.2.3.4:5678" → "1.2.3.4")."""
    for key, value in metadata or ():
        if key.lower() == CALLER_METADATA:
            if not (isinstance(value, str) and CALLER_PATTERN.fullmatch(value)):
                raise InvalidCallerError(f"{CALLER_METADATA}: {str(value)[:60]!r} is not a caller name; expected 1-48 "
                                         "characters of letters, digits and _.@- starting with a letter or digit")
            return value
    return peer_host(peer)


def peer_host(peer: str) -> str:
    """Host part of a gRPC peer string; the whole string when it has no recognised form."""
    kind, _, rest = (peer or "").partition(":")
    if kind in ("ipv4", "ipv6") and rest:
        return rest.rsplit(":", 1)[0].strip("[]") or peer
    return peer or "unknown"


class CallerAdmission:
    """In-flight counts and token buckets per caller; used from one event loop (not thread-safe)."""

    def __init__(self, limits: CallerLimits, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.clock = clock
        self._callers: dict[str, _Caller] = {}

    def admit(self, caller: str, samples: int) -> str:
        """Admit a request of `samples` samples or raise CallerLimitError; returns the name to `release`."""
        name = self._entry_name(caller)
        state = self._callers.setdefault(name, self._fresh())
        limits = self.limits
        if limits.max_in_flight is not None and state.in_flight >= limits.max_in_flight:
            raise CallerLimitError(
                f"caller {name!r}: {state.in_flight} requests in flight, the limit is grpc.caller_max_in_flight="
                f"{limits.max_in_flight}; wait for an answer before sending more", "in_flight_limit")
        self._take_tokens(name, state, samples)
        state.in_flight += 1
        return name

    def release(self, name: str) -> None:
        """The request admitted under `name` was answered, refused downstream or cancelled."""
        state = self._callers.get(name)
        if state is not None and state.in_flight > 0:
            state.in_flight -= 1

    def in_flight(self) -> dict[str, int]:
        return {name: s.in_flight for name, s in self._callers.items() if s.in_flight}

    def _take_tokens(self, name: str, state: _Caller, samples: int) -> None:
        size = self.limits.bucket_size()
        if size is None:
            return
        rate = float(self.limits.samples_per_s)
        now = self.clock()
        state.tokens = min(size, state.tokens + (now - state.refilled) * rate)
        state.refilled = now
        if samples > size:
            raise CallerLimitError(
                f"caller {name!r}: a request of {samples} samples is larger than the bucket of {size:.0f} samples "
                f"(grpc.caller_burst_samples); split it", "rate_limited")
        if state.tokens < samples:
            wait = (samples - state.tokens) / rate
            raise CallerLimitError(
                f"caller {name!r}: {samples} samples exceed the rate limit of grpc.caller_samples_per_s="
                f"{rate:g} (bucket holds {state.tokens:.0f} of {size:.0f}); retry in {wait:.2f} s",
                "rate_limited", wait)
        state.tokens -= samples

    def _fresh(self) -> _Caller:
        size = self.limits.bucket_size()
        return _Caller(tokens=size or 0.0, refilled=self.clock())

    def _entry_name(self, caller: str) -> str:
        """`caller`, or OTHER_CALLERS when the table is full even after forgetting idle callers."""
        if caller in self._callers or len(self._callers) < self.limits.max_callers:
            return caller
        self._forget_idle()
        return caller if len(self._callers) < self.limits.max_callers else OTHER_CALLERS

    def _forget_idle(self) -> None:
        """Drop callers with nothing in flight and a full bucket: a fresh entry would be identical."""
        size = self.limits.bucket_size()
        now = self.clock()
        rate = self.limits.samples_per_s or 0.0
        for name in [n for n, s in self._callers.items()
                     if not s.in_flight and (size is None or s.tokens + (now - s.refilled) * rate >= size)]:
            del self._callers[name]
