"""Per-caller admission at the gRPC ingress, on a fake clock: naming callers, the in-flight limit,
the samples/s token bucket, the bounded caller table and the weight a caller is granted (the live
flood and weight tests are in test_grpc.py)."""
from __future__ import annotations

import pytest

from teacher_service.grpc.caller_limits import (
    OTHER_CALLERS,
    CallerAdmission,
    CallerGrant,
    CallerLimitError,
    CallerLimits,
    InvalidCallerError,
    caller_name,
    grant_weight,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_caller_is_its_kd_caller_name_else_its_host():
    assert caller_name([("kd-caller", "student-7")], "ipv4:10.0.0.5:41234") == "student-7"
    assert caller_name([("KD-Caller", "a.b@c-d_1")], "ipv4:10.0.0.5:41234") == "a.b@c-d_1"
    assert caller_name([("authorization", "Bearer x")], "ipv4:10.0.0.5:41234") == "10.0.0.5"
    assert caller_name(None, "ipv6:[::1]:5000") == "::1"
    assert caller_name((), "unix:/tmp/sock") == "unix:/tmp/sock"
    for bad in ("", "-leading-dash", "has space", "x" * 49, "new\nline"):
        with pytest.raises(InvalidCallerError, match="kd-caller: .* is not a caller name"):
            caller_name([("kd-caller", bad)], "ipv4:10.0.0.5:1")


def test_in_flight_limit_is_per_caller_and_freed_by_answers():
    admission = CallerAdmission(CallerLimits(max_in_flight=2), Clock())
    names = [admission.admit("flood", 8) for _ in range(2)]
    with pytest.raises(CallerLimitError, match="caller 'flood': 2 requests in flight, .*max_in_flight=2") as e:
        admission.admit("flood", 8)
    assert e.value.reason == "in_flight_limit"
    assert admission.admit("light", 8) == "light"  # another caller is not affected
    assert admission.in_flight() == {"flood": 2, "light": 1}
    admission.release(names[0])
    admission.admit("flood", 8)
    admission.release("never-admitted")  # harmless


def test_token_bucket_refuses_past_the_rate_and_refills_with_time():
    clock = Clock()
    admission = CallerAdmission(CallerLimits(max_in_flight=None, samples_per_s=100, burst_samples=50), clock)
    for _ in range(5):
        admission.release(admission.admit("a", 10))  # the full bucket: 50 samples at once
    with pytest.raises(CallerLimitError, match=r"samples_per_s=100 .*retry in 0\.10 s") as e:
        admission.admit("a", 10)
    assert (e.value.reason, e.value.retry_after_s) == ("rate_limited", pytest.approx(0.1))
    admission.admit("b", 50)  # b has its own bucket
    clock.now += 0.25  # 25 samples back
    admission.admit("a", 25)
    with pytest.raises(CallerLimitError, match="rate_limited|rate limit"):
        admission.admit("a", 1)
    clock.now += 10  # never more than the bucket
    admission.admit("a", 50)
    with pytest.raises(CallerLimitError, match="larger than the bucket of 50 samples"):
        admission.admit("c", 51)
    assert CallerLimits(samples_per_s=20).bucket_size() == 20  # default burst: one second's worth


def test_the_caller_table_is_bounded_and_forgets_idle_callers_first():
    clock = Clock()
    admission = CallerAdmission(CallerLimits(max_in_flight=1, samples_per_s=10, max_callers=2), clock)
    a, b = admission.admit("a", 5), admission.admit("b", 5)
    assert admission.admit("c", 1) == OTHER_CALLERS  # table full of busy callers: c shares "other"
    with pytest.raises(CallerLimitError):
        admission.admit("d", 1)  # ... and so does d, who finds "other" busy
    for name in (a, b, OTHER_CALLERS):
        admission.release(name)
    assert admission.admit("e", 1) == OTHER_CALLERS  # a and b are idle but their buckets not full yet
    admission.release(OTHER_CALLERS)
    clock.now += 1.0  # buckets full again: a, b and other are forgotten
    assert admission.admit("e", 1) == "e"


def test_limits_name_the_bad_field():
    for fields, name in (({"max_in_flight": 0}, "grpc.caller_max_in_flight"),
                         ({"samples_per_s": 0}, "grpc.caller_samples_per_s"),
                         ({"samples_per_s": 5, "burst_samples": 0}, "grpc.caller_burst_samples"),
                         ({"max_callers": 0}, "max_callers")):
        with pytest.raises(ValueError, match=name):
            CallerLimits(**fields)


def test_weight_is_granted_by_the_server_not_chosen_by_the_caller():
    for asked in (100.0, 4.0, 0.5, float("nan"), "2"):
        assert grant_weight(asked, None) == 1.0  # nobody authenticated: weight 1 whatever was asked
    capped = CallerGrant(name="capped", max_weight=4.0)
    assert [grant_weight(w, capped) for w in (100.0, 4.0, 2.5, 1)] == [4.0, 4.0, 2.5, 1.0]
    for malformed in (0.0, -3.0, float("inf"), "2", True):  # passed on for the replica to refuse, naming the field
        assert grant_weight(malformed, capped) is malformed
    assert grant_weight(float("nan"), capped) != grant_weight(float("nan"), capped)  # NaN stays NaN
    assert grant_weight(100.0, CallerGrant(name=None, max_weight=100.0)) == 100.0  # one shared token: as before
