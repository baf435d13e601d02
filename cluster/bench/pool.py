"""Section 2: the teacher pool. Embeddings/s against batch size and replica count, served through a
Serve handle; the same TeacherEngine's direct in-process forward at the same batch size (its
ratio is the Serve overhead: target served >= 0.90 × direct); the wire cost per sample of the
request (uint8 images, int64 tokens) and response (fp16 embeddings) in the proto encoding; and
the time a replica spends per sample on coalescing identities (SHA-256 of the pixels and of the
fitted tokens, `serve.coalesce.sample_identities`) at 64 and 224 px.

Served: requests of B samples kept `in_flight_per_replica × replicas` outstanding from this
process, on a pool whose `max_batch_size` is B, so every forward is exactly B samples, as in the
direct run. Direct: a Ray actor with the replica's cores, threads and device, timing
`TeacherEngine.embed_many` on prebuilt requests.
"""
from __future__ import annotations

import collections
import time

import numpy as np
import ray

from teacher_service.config import TeacherConfig
from teacher_service.app import deploy
from teacher_service.grpc.codec import encode_embed_reply, encode_embed_request
from teacher_service.contract.protocol import EmbedRequest, EmbedResponse

from cluster.bench.common import BenchRun, teacher_config

SECTION = "pool"
APP = "kd-bench-pool"
KEY_CHARS = 24  # a typical sample key ("digits-1234-0123456789ab")
IDENTITY_SIDES = (64, 224)  # view sides at which the coalescing hash cost is measured
IDENTITY_BATCH = 64


def make_requests(n: int, batch: int, image_size: int, context_length: int, vocab: int, tag: str,
                  seed: int = 0) -> list[EmbedRequest]:
    """`n` requests of `batch` random uint8 views and token ids, unique keys, no view (never coalesced)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
    tokens = rng.integers(1, max(2, vocab - 1), (batch, context_length), dtype=np.int64)
    return [EmbedRequest(keys=[f"{tag}-{r}-{i}" for i in range(batch)], images=images, tokens=tokens, run=tag)
            for r in range(n)]


def served_rate(handle, requests: list[EmbedRequest], in_flight: int, warmup: int = 2) -> float:
    """Samples/s answered with `in_flight` requests outstanding (closed loop, after a warm-up)."""
    for req in requests[:warmup]:
        handle.embed.remote(req).result(timeout_s=600)
    timed = requests[warmup:]
    pending: collections.deque = collections.deque()
    start = time.perf_counter()
    for req in timed:
        if len(pending) >= in_flight:
            pending.popleft().result(timeout_s=600)
        pending.append(handle.embed.remote(req))
    while pending:
        pending.popleft().result(timeout_s=600)
    return sum(len(r) for r in timed) / (time.perf_counter() - start)


@ray.remote
class DirectForward:
    """The teacher and its engine in one process with the replica's cores: no Serve, no transfer."""

    def __init__(self, config: dict) -> None:
        from teacher_service.serve.engine import TeacherEngine
        from teacher_service.model import load_teacher

        self.engine = TeacherEngine(load_teacher(TeacherConfig.from_dict(config)))

    def info(self) -> dict:
        return self.engine.teacher.info()

    def rate(self, batch: int, n: int, image_size: int, warmup: int = 1) -> float:
        t = self.engine.teacher
        requests = make_requests(n + warmup, batch, image_size, t.context_length, t.vocab_size or 49408, "direct")
        for req in requests[:warmup]:
            self.engine.embed_many([req])
        start = time.perf_counter()
        for req in requests[warmup:]:
            self.engine.embed_many([req])
        return n * batch / (time.perf_counter() - start)

    def flops_per_sample(self, image_size: int) -> float:
        """FLOPs of one sample's image + text forward (torch's counter: 2 per multiply-add)."""
        from torch.utils.flop_counter import FlopCounterMode

        req = make_requests(1, 1, image_size, self.engine.teacher.context_length,
                            self.engine.teacher.vocab_size or 49408, "flops")[0]
        with FlopCounterMode(display=False) as counter:
            self.engine.embed_many([req])
        return float(counter.get_total_flops())


def wire_bytes(batch: int, image_size: int, context_length: int, embed_dim: int) -> tuple[float, float]:
    """(request bytes, response bytes) per sample in the gRPC proto encoding."""
    keys = [f"{i:0{KEY_CHARS}d}" for i in range(batch)]
    request = EmbedRequest(keys=keys, images=np.zeros((batch, image_size, image_size, 3), np.uint8),
                           tokens=np.zeros((batch, context_length), np.int64), run="run-name", view="v" * 64)
    emb = np.zeros((batch, embed_dim), np.float16)
    response = EmbedResponse(keys=keys, image_features=emb, text_features=emb, logit_scale=100.0,
                             logit_bias=None, fingerprint="0" * 16)
    return (encode_embed_request(request).ByteSize() / batch, encode_embed_reply(response).ByteSize() / batch)


def identity_us_per_sample(side: int, batch: int, context_length: int, repeats: int,
                           rounds: int = 5) -> list[float]:
    """Microseconds per sample the replica spends computing coalescing identities of a request of
    `batch` random side×side views with token rows: one value per repeat, each the best of
    `rounds` passes (the hash's own cost, without scheduler noise)."""
    from teacher_service.serve.coalesce import sample_identities

    rng = np.random.default_rng(0)
    request = EmbedRequest(keys=[str(i) for i in range(batch)], view="bench",
                           images=rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8),
                           tokens=rng.integers(1, 49000, (batch, context_length), dtype=np.int64))
    values = []
    for _ in range(repeats):
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            sample_identities(request, "bench", context_length)
            best = min(best, time.perf_counter() - start)
        values.append(1e6 * best / batch)
    return values


def _direct_rates(run: BenchRun, pb, info_out: dict) -> dict[int, list[float]]:
    base = teacher_config(run, APP, max_batch_size=max(pb.batch_sizes), request_samples=min(pb.batch_sizes))
    actor = DirectForward.options(num_cpus=base.num_cpus, num_gpus=base.num_gpus).remote(base.to_dict())
    try:
        info_out.update(ray.get(actor.info.remote()))
        info_out["flops_per_sample"] = ray.get(actor.flops_per_sample.remote(run.cfg.models.image_size))
        rates: dict[int, list[float]] = {b: [] for b in pb.batch_sizes}
        for rep in range(run.cfg.repeats):
            for b in pb.batch_sizes:
                run.log(f"pool: direct forward, batch {b}, repeat {rep + 1}/{run.cfg.repeats}")
                rates[b].append(ray.get(actor.rate.remote(b, pb.requests, run.cfg.models.image_size)))
        return rates
    finally:
        ray.kill(actor)


def _served_rates(run: BenchRun, pb, info: dict) -> dict[tuple[int, int], list[float]]:
    rates: dict[tuple[int, int], list[float]] = {}
    for replicas in pb.replicas:
        for b in pb.batch_sizes:
            cfg = teacher_config(run, APP, max_batch_size=b, request_samples=b, replicas=replicas)
            run.log(f"pool: deploying {replicas} replica(s) with max_batch_size {b}")
            handle = deploy(cfg)
            handle.info.remote().result(timeout_s=600)
            in_flight = pb.in_flight_per_replica * replicas
            for rep in range(run.cfg.repeats):
                requests = make_requests(pb.requests + 2, b, run.cfg.models.image_size, info["context_length"],
                                         info.get("vocab_size") or 49408, f"served-{replicas}-{b}-{rep}")
                rates.setdefault((replicas, b), []).append(served_rate(handle, requests, in_flight))
    from ray import serve

    serve.delete(APP)
    return rates


def run_pool(run: BenchRun) -> None:
    pb = run.cfg.pool
    info: dict = {}
    direct = _direct_rates(run, pb, info)
    served = _served_rates(run, pb, info)
    for b, values in direct.items():
        run.add(SECTION, f"direct forward embeddings/s (batch {b})", "samples/s", values,
                params={"batch_size": b, "replicas": 1, "path": "TeacherEngine in one process"})
    for (replicas, b), values in served.items():
        params = {"batch_size": b, "replicas": replicas, "in_flight": pb.in_flight_per_replica * replicas}
        run.add(SECTION, f"served embeddings/s (batch {b}, {replicas} replica(s))", "samples/s", values, params=params)
        if replicas == 1:
            ratio = [s / d for s, d in zip(values, direct[b])]
            run.add(SECTION, f"served / direct (batch {b})", "x", ratio, params=params, kind="derived",
                    target=">= 0.90", note="1 - this is the Serve overhead (target <= 10 %); per repeat")
        elif (1, b) in served:
            scaling = [s / one for s, one in zip(values, served[(1, b)])]
            run.add(SECTION, f"replica scaling (batch {b}, {replicas} vs 1)", "x", scaling, params=params,
                    kind="derived", note="ideal: the replica count, when each replica has its own cores/GPU")
    _record_wire(run, info)
    _record_identity_cost(run, info)
    best = max(direct, key=lambda b: np.median(direct[b]))
    run.shared.update(teacher_info=info, teacher_direct_rate=float(np.median(direct[best])), teacher_best_batch=best,
                      serve_ratio=float(np.median([s / d for s, d in zip(served.get((1, best), direct[best]),
                                                                        direct[best])])))


def _record_wire(run: BenchRun, info: dict) -> None:
    sc = run.cfg.scale
    setups = {"this run": (run.cfg.models.image_size, info["context_length"], info["embed_dim"]),
              f"{sc.image_size} px, {sc.context_length} tokens, D={sc.embed_dim}":
                  (sc.image_size, sc.context_length, sc.embed_dim)}
    wire = {}
    for label, (side, ctx, dim) in setups.items():
        req, resp = wire_bytes(64, side, ctx, dim)
        params = {"image_size": side, "context_length": ctx, "embed_dim": dim, "encoding": "proto, batch of 64"}
        run.add(SECTION, f"wire request bytes/sample ({label})", "bytes", [req], params=params, kind="derived",
                note="uint8 view + int64 tokens + key")
        run.add(SECTION, f"wire response bytes/sample ({label})", "bytes", [resp], params=params, kind="derived",
                note="fp16 image + text embeddings + key")
        wire[label] = (req, resp)
    run.shared["wire_scale"] = wire[list(setups)[1]]


def _record_identity_cost(run: BenchRun, info: dict) -> None:
    """The replica's per-sample hashing cost for coalescing, at 64 and 224 px (a figure, not a pass/fail)."""
    context = int(info["context_length"])
    for side in IDENTITY_SIDES:
        run.log(f"pool: coalescing identity cost at {side} px")
        values = identity_us_per_sample(side, IDENTITY_BATCH, context, run.cfg.repeats)
        params = {"image_size": side, "context_length": context, "batch_size": IDENTITY_BATCH,
                  "hash": "sha256(shape + pixels), sha256(fitted tokens)"}
        run.add(SECTION, f"coalescing identity cost per sample ({side} px)", "us/sample", values, params=params,
                note="paid by the replica on requests with a view; best of 5 passes per repeat, on the driver")
