"""Exactly-once computation (coalesce.Coalescer) and weighted fair share (batching.SampleBatcher),
without Serve: plain asyncio with a fake teacher whose features are a function of the pixels and
tokens it is sent (never of the key or view, which are the caller's word)."""
from __future__ import annotations

import asyncio
import hashlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from teacher_service.serve.batching import SampleBatcher
from teacher_service.serve.coalesce import Coalescer, sample_identities
from teacher_service.contract.protocol import EmbedRequest, EmbedResponse

D = 8
SIDE = 4
CONTEXT = 8


def _vector(data: bytes) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(data).digest()[:4], "little")
    return np.random.default_rng(seed).standard_normal(D).astype(np.float16)


def image_features(image: np.ndarray) -> np.ndarray:
    """The fake teacher's image row: a function of the pixels only."""
    return _vector(np.ascontiguousarray(image).tobytes())


def text_features(row: np.ndarray) -> np.ndarray:
    """The fake teacher's text row: a function of the token ids (trailing padding ignored, as fitting does)."""
    return _vector(np.trim_zeros(np.asarray(row, np.int64), "b").tobytes())


def pixels_of(key: str) -> np.ndarray:
    """A sample's pixels in these tests: decided by its key, as a replayable view is."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")
    return np.random.default_rng(seed).integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8)


class FakeTeacher:
    """Records every sub-request it computes (by key); a forward stays running until `release` is set."""

    def __init__(self, hold: bool = False, fail: bool = False):
        self.calls: list[list[str]] = []
        self.release = asyncio.Event()
        if not hold:
            self.release.set()
        self.fail = fail

    async def __call__(self, req: EmbedRequest) -> EmbedResponse:
        self.calls.append(list(req.keys))
        await self.release.wait()
        if self.fail:
            raise RuntimeError("teacher forward failed")
        texts = None if req.tokens is None else np.stack([text_features(t) for t in req.tokens])
        return EmbedResponse(keys=list(req.keys), image_features=np.stack([image_features(im) for im in req.images]),
                             text_features=texts, logit_scale=10.0, logit_bias=None, fingerprint="fp",
                             compute_s=0.5 * len(req.keys))  # as an engine would: its share of a forward

    @property
    def computed(self) -> int:
        return sum(len(c) for c in self.calls)


def req(keys, view="ns/0", run="a", tokens=True, token_shift=0, images=None) -> EmbedRequest:
    """A request for `keys`; pixels default to each key's own (`pixels_of`)."""
    n = len(keys)
    toks = np.tile(np.arange(1, 5, dtype=np.int64) + token_shift, (n, 1)) if tokens else None
    if images is None:
        images = np.stack([pixels_of(k) for k in keys])
    return EmbedRequest(keys=list(keys), images=images, tokens=toks, run=run, view=view)


def check(resp: EmbedResponse, request: EmbedRequest) -> None:
    """`resp` is the fake teacher's forward of `request`'s own pixels and tokens, row for row."""
    assert resp.keys == list(request.keys)
    np.testing.assert_array_equal(resp.image_features, np.stack([image_features(im) for im in request.images]))
    if request.tokens is not None:
        np.testing.assert_array_equal(resp.text_features, np.stack([text_features(t) for t in request.tokens]))


def coalescer(memory_rows: int = 1000, executor=None) -> Coalescer:
    return Coalescer(memory_rows, logit_scale=10.0, logit_bias=None, fingerprint="fp", context_length=CONTEXT,
                     digest_executor=executor)


def test_concurrent_overlapping_requests_compute_each_sample_once():
    async def scenario():
        teacher, co = FakeTeacher(hold=True), coalescer()
        a = asyncio.create_task(co.embed(req(["k0", "k1", "k2", "k3"], run="a"), teacher))
        await asyncio.sleep(0)
        b = asyncio.create_task(co.embed(req(["k2", "k3", "k4", "k4"], run="b"), teacher))
        await asyncio.sleep(0)
        assert co.in_flight_rows() == 5  # k0..k3 by a, k4 by b (its duplicate row joins it)
        teacher.release.set()
        (ra, ua), (rb, ub) = await a, await b
        return teacher, ra, ua, rb, ub

    teacher, ra, ua, rb, ub = asyncio.run(scenario())
    assert teacher.calls == [["k0", "k1", "k2", "k3"], ["k4"]]
    check(ra, req(["k0", "k1", "k2", "k3"])), check(rb, req(["k2", "k3", "k4", "k4"]))
    assert (ua.computed, ua.coalesced, ua.from_cache) == (4, 0, 0)
    assert (ub.computed, ub.coalesced, ub.from_cache) == (1, 3, 0)  # k2, k3 in a's forward; 2nd k4
    assert (ra.compute_s, rb.compute_s) == (2.0, 0.5)  # teacher-seconds of the rows each computed only


def test_recent_rows_answer_later_requests_and_are_bounded():
    async def scenario():
        teacher, co = FakeTeacher(), coalescer(memory_rows=3)
        await co.embed(req(["k0", "k1", "k2"]), teacher)
        resp, again = await co.embed(req(["k2", "k1", "k0"]), teacher)
        check(resp, req(["k2", "k1", "k0"]))
        await co.embed(req(["k3"]), teacher)  # evicts the least recently used row (k2)
        _, after = await co.embed(req(["k2", "k3"]), teacher)
        return teacher, co, again, after, resp

    teacher, co, again, after, resp = asyncio.run(scenario())
    assert (again.computed, again.from_cache) == (0, 3) and resp.compute_s == 0.0  # nothing computed for it
    assert (after.computed, after.from_cache) == (1, 1)
    assert teacher.calls == [["k0", "k1", "k2"], ["k3"], ["k2"]] and co.recent_rows() == 3


@pytest.mark.parametrize("other", [
    {"images": np.stack([pixels_of("x0"), pixels_of("x1")])},  # same view and keys, other pixels
    {"view": "ns/1", "images": np.stack([pixels_of("y0"), pixels_of("y1")])},  # another view: other pixels
    {"token_shift": 1},          # other tokens (another tokenizer or caption)
    {"tokens": False},           # image-only request: no text row to share
])
def test_samples_that_differ_are_not_shared(other):
    async def scenario():
        teacher, co = FakeTeacher(), coalescer()
        await co.embed(req(["k0", "k1"]), teacher)
        _, reuse = await co.embed(req(["k0", "k1"], **other), teacher)
        return reuse

    reuse = asyncio.run(scenario())
    assert (reuse.computed, reuse.coalesced, reuse.from_cache) == (2, 0, 0)


WHITE = np.full((2, SIDE, SIDE, 3), 255, np.uint8)  # two equal rows: the attacker's forward computes one


@pytest.mark.parametrize("attacker_done", [True, False], ids=["recent-rows", "in-flight"])
def test_another_callers_view_and_keys_with_other_pixels_change_nobodys_answer(attacker_done):
    """An attacker sends the victim's view and keys with all-255 pixels, before the victim (its
    rows recent) or while its forward still runs (in flight): each gets its own pixels' forward."""
    async def scenario():
        teacher, co = FakeTeacher(hold=not attacker_done), coalescer()
        attack, victim = req(["k0", "k1"], run="attacker", images=WHITE), req(["k0", "k1"], run="victim")
        a = asyncio.create_task(co.embed(attack, teacher))
        await (a if attacker_done else asyncio.sleep(0))
        v = asyncio.create_task(co.embed(victim, teacher))
        await asyncio.sleep(0)
        teacher.release.set()
        return teacher, attack, victim, await a, await v

    teacher, attack, victim, (ra, _), (rv, uv) = asyncio.run(scenario())
    check(ra, attack), check(rv, victim)
    assert not np.array_equal(ra.image_features, rv.image_features)
    assert (uv.computed, uv.coalesced, uv.from_cache) == (2, 0, 0) and teacher.calls == [["k0"], ["k0", "k1"]]


def test_same_pixels_and_tokens_under_other_keys_and_views_are_computed_once():
    async def scenario():
        teacher, co = FakeTeacher(hold=True), coalescer()
        images = np.stack([pixels_of("k0"), pixels_of("k1")])
        first = asyncio.create_task(co.embed(req(["k0", "k1"], run="a"), teacher))
        await asyncio.sleep(0)
        joins = asyncio.create_task(co.embed(req(["x", "y"], view="other/3", run="b", images=images), teacher))
        await asyncio.sleep(0)
        teacher.release.set()
        await first
        later = await co.embed(req(["p", "q"], view="ns/9", run="c", images=images[::-1].copy()), teacher)
        return teacher, await joins, later

    teacher, (rj, uj), (rl, ul) = asyncio.run(scenario())
    assert teacher.calls == [["k0", "k1"]]
    assert (uj.computed, uj.coalesced) == (0, 2) and (ul.computed, ul.from_cache) == (0, 2)
    assert rj.keys == ["x", "y"] and rl.keys == ["p", "q"]  # answered under the caller's own keys
    check(rj, req(["x", "y"], images=np.stack([pixels_of("k0"), pixels_of("k1")])))
    check(rl, req(["p", "q"], images=np.stack([pixels_of("k1"), pixels_of("k0")])))


def test_identity_is_fingerprint_pixels_with_shape_and_fitted_tokens():
    one = req(["k0"])
    base = sample_identities(one, "fp", CONTEXT)
    padded = EmbedRequest(keys=["other"], images=one.images, view="v",
                          tokens=np.pad(one.tokens, ((0, 0), (0, 3))))  # equal once fitted to CONTEXT
    assert sample_identities(padded, "fp", CONTEXT) == base
    reshaped = EmbedRequest(keys=["k0"], images=one.images.reshape(1, 2, 8, 3), tokens=one.tokens, view="ns/0")
    assert sample_identities(reshaped, "fp", CONTEXT) != base  # same bytes, other shape
    assert sample_identities(one, "other-teacher", CONTEXT) != base
    cut = EmbedRequest(keys=["k0"], images=one.images, tokens=np.array([[1, 2, 3, 9]]), view="ns/0")
    assert sample_identities(cut, "fp", 2) == sample_identities(  # [1, 9] after fitting, either way
        EmbedRequest(keys=["k0"], images=one.images, tokens=np.array([[1, 9]]), view="ns/0"), "fp", 2)
    assert len(base[0][1]) == len(base[0][2]) == 32  # full SHA-256, no truncation


def test_hashing_in_an_executor_keeps_identities_and_isolation():
    async def scenario():
        teacher = FakeTeacher()
        with ThreadPoolExecutor(1) as pool:
            co = coalescer(executor=pool)
            attack = await co.embed(req(["k0", "k1"], run="attacker", images=WHITE), teacher)
            victim = await co.embed(req(["k0", "k1"], run="victim"), teacher)
            again = await co.embed(req(["z0", "z1"], view="ns/7", images=req(["k0", "k1"]).images), teacher)
        return teacher, attack, victim, again

    teacher, (ra, _), (rv, _), (rg, ug) = asyncio.run(scenario())
    check(ra, req(["k0", "k1"], images=WHITE)), check(rv, req(["k0", "k1"]))
    assert ug.from_cache == 2 and teacher.computed == 3
    np.testing.assert_array_equal(rg.image_features, rv.image_features)


def test_requests_without_a_view_pass_through():
    async def scenario():
        teacher, co = FakeTeacher(), coalescer()
        for _ in range(2):
            resp, reuse = await co.embed(req(["k0", "k0"], view=""), teacher)
            check(resp, req(["k0", "k0"]))
            assert reuse.computed == 2 and resp.compute_s == 1.0  # the forward's own figure, passed on
        return teacher

    assert asyncio.run(scenario()).calls == [["k0", "k0"], ["k0", "k0"]]


def test_a_caller_giving_up_does_not_cancel_the_shared_forward_and_its_retry_joins_it():
    async def scenario():
        teacher, co = FakeTeacher(hold=True), coalescer()
        owner = asyncio.create_task(co.embed(req(["k0", "k1"], run="a"), teacher))
        await asyncio.sleep(0)
        waiter = asyncio.create_task(co.embed(req(["k1"], run="b"), teacher))
        await asyncio.sleep(0)
        owner.cancel()  # run a timed out
        retry = asyncio.create_task(co.embed(req(["k0", "k1"], run="a"), teacher))
        await asyncio.sleep(0)
        teacher.release.set()
        with pytest.raises(asyncio.CancelledError):
            await owner
        return teacher, await waiter, await retry

    teacher, (rw, uw), (rr, ur) = asyncio.run(scenario())
    assert teacher.calls == [["k0", "k1"]]  # computed once for the cancelled call, its retry and b
    check(rw, req(["k1"])), check(rr, req(["k0", "k1"]))
    assert uw.coalesced == 1 and ur.coalesced == 2


def test_a_failed_forward_fails_every_waiter_and_is_not_remembered():
    async def scenario():
        teacher, co = FakeTeacher(hold=True, fail=True), coalescer()
        a = asyncio.create_task(co.embed(req(["k0"]), teacher))
        await asyncio.sleep(0)
        b = asyncio.create_task(co.embed(req(["k0"]), teacher))
        await asyncio.sleep(0)
        teacher.release.set()
        results = await asyncio.gather(a, b, return_exceptions=True)
        return co, results

    co, results = asyncio.run(scenario())
    assert [str(r) for r in results] == ["teacher forward failed"] * 2
    assert co.recent_rows() == 0 and co.in_flight_rows() == 0


# ------------------------------------------------------------------------------------ fair share
async def _share(weights: dict[str, float], backlog: int, batches: int, size: int = 4, max_batch: int = 16):
    """Every run keeps `backlog` requests waiting; returns samples computed per run in `batches` forwards."""
    served: dict[str, int] = dict.fromkeys(weights, 0)
    count = 0
    done = asyncio.Event()

    async def run_batch(batch):
        nonlocal count
        count += 1
        if count > batches:
            done.set()
            await asyncio.sleep(3600)
        for q in batch:
            served[q.run] += q.size
        await asyncio.sleep(0)
        return [None] * len(batch)

    batcher = SampleBatcher(run_batch, max_batch, batch_wait_timeout_s=0.0)

    async def client(run: str):
        while True:  # closed loop: a new request as soon as one is answered
            await batcher.submit(run, size, 0.0, run, weights[run])

    tasks = [asyncio.create_task(client(r)) for r in weights for _ in range(backlog)]
    await done.wait()
    for t in tasks:
        t.cancel()
    return served


@pytest.mark.parametrize("weights", [{"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 3.0}, {"a": 1, "b": 2, "c": 5}])
def test_contended_runs_get_their_weighted_share(weights):
    served = asyncio.run(_share(weights, backlog=8, batches=200))
    total = sum(served.values())
    for run, w in weights.items():
        target = w / sum(weights.values())
        assert served[run] / total == pytest.approx(target, rel=0.05), (served, weights)


def test_a_light_run_is_not_starved_by_a_flood_and_idle_time_gives_no_credit():
    async def scenario():
        order: list[str] = []

        async def run_batch(batch):
            order.extend(q.run for q in batch)
            await asyncio.sleep(0)
            return [None] * len(batch)

        batcher = SampleBatcher(run_batch, 4, batch_wait_timeout_s=0.0)
        flood = [asyncio.create_task(batcher.submit("f", 4, 0.0, "flood", 1.0)) for _ in range(20)]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        light = asyncio.create_task(batcher.submit("l", 4, 0.0, "light", 1.0))
        await asyncio.gather(*flood, light)
        return order

    order = asyncio.run(scenario())
    # the light run arrived after 20 flood requests were queued, yet waits for at most one more of them
    assert order.index("light") <= 2


# ------------------------------------------------------------------------------------ routing
def test_affinity_is_the_view_and_keys_and_rendezvous_moves_only_a_lost_replicas_share():
    from teacher_service.serve.routing import affinity_key, rendezvous_order

    a = affinity_key(req(["k0", "k1"]))
    assert a == affinity_key(req(["k0", "k1"], run="other"))  # the caller does not matter
    assert a != affinity_key(req(["k1", "k0"])) and a != affinity_key(req(["k0", "k1"], view="ns/1"))
    assert affinity_key(req(["k0"], view="")) is None
    replicas = [f"replica-{i}" for i in range(4)]
    keys = [affinity_key(req([f"k{i}"])) for i in range(400)]
    home = [replicas[rendezvous_order(k, replicas)[0]] for k in keys]
    assert min(home.count(r) for r in replicas) > 60  # spread over every replica
    survivors = replicas[:3]
    moved = [h for k, h in zip(keys, home) if survivors[rendezvous_order(k, survivors)[0]] != h]
    assert moved and set(moved) == {"replica-3"}  # only the removed replica's requests move
