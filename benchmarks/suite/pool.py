"""Section 2: the teacher pool. Embeddings/s against batch size and replica count, served through a
Serve handle; the same TeacherEngine's direct in-process forward at the same batch size (its
ratio is the Serve overhead: target served >= 0.90 × direct); the wire cost per sample of the
request (uint8 images, int64 tokens) and response (fp16 embeddings) in the proto encoding; and
the time a replica spends per sample on coalescing identities (SHA-256 of the pixels and of the
fitted tokens, `serve.coalesce.sample_identities`) at 64 and 224 px; and for requests by
reference (`contract.protocol.ImageRefs`) their wire bytes per sample at 64 and 224 px and the
replica's extra cost per sample of turning them into pixels (read, decode, augment, digest check)
at 64 px.

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

from benchmarks.suite.common import BenchRun, teacher_config

SECTION = "pool"
APP = "kd-bench-pool"
KEY_CHARS = 24  # a typical sample key ("digits-1234-0123456789ab")
IDENTITY_SIDES = (64, 224)  # view sides at which the coalescing hash cost is measured
IDENTITY_BATCH = 64
REFERENCE_SIDES = (64, 224)  # view sides at which request bytes by reference are reported
REFERENCE_COST_SIDE = 64  # view side at which the replica's read + decode + augment cost is measured
SHARD_PATH = "/data/datasets/train-000123.tar"  # a typical absolute shard path (per request, not per sample)


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


def reference_wire_bytes(batch: int, image_size: int, context_length: int, shards: int = 2) -> float:
    """Request bytes per sample by reference in the proto encoding: key, tokens, view, and per
    sample a shard index, a view id and a 32-byte SHA-256 (paths and recipe once per request)."""
    from teacher_service.contract.augment import image_refs, view_recipe

    keys = [f"{i:0{KEY_CHARS}d}" for i in range(batch)]
    views = np.zeros((batch, image_size, image_size, 3), np.uint8)
    paths = [SHARD_PATH.replace("123", f"{i % shards:03d}") for i in range(batch)]
    refs = image_refs(views, paths, 1_000, view_recipe(image_size, 2**31 - 1))
    request = EmbedRequest(keys=keys, tokens=np.zeros((batch, context_length), np.int64), run="run-name",
                           view="v" * 64, image_refs=refs)
    return encode_embed_request(request).ByteSize() / batch


def reference_us_per_sample(side: int, batch: int, repeats: int, rounds: int = 3) -> list[float]:
    """Microseconds per sample a replica spends resolving a request by reference: read the sample
    through its shard index, decode it, `augment_view` it and check its SHA-256, with the decoded
    image cache off (every sample decoded) and the index built (once per shard in a real run).
    Source images: digits shards rendered as PNG at `side` px (`kd data digits`). One value per
    repeat, each the best of `rounds` passes."""
    import tempfile

    from student_trainer.data.write_shards import write_digits_shards
    from teacher_service.serve.references import ViewResolver

    with tempfile.TemporaryDirectory(prefix="kd-bench-refs-") as tmp:
        write_digits_shards(tmp, image_size=side, samples_per_shard=batch)
        request = _reference_request(tmp, side, batch)
        resolver = ViewResolver([tmp], cache_bytes=0)
        resolver.resolve(request)  # builds the shard indexes
        values = []
        for _ in range(repeats):
            best = float("inf")
            for _ in range(rounds):
                start = time.perf_counter()
                resolver.resolve(request)
                best = min(best, time.perf_counter() - start)
            values.append(1e6 * best / batch)
    return values


def _reference_request(shard_dir: str, side: int, batch: int) -> EmbedRequest:
    """A request by reference to the first `batch` samples of the shards in `shard_dir` (view 1, seed 0)."""
    import glob
    import itertools

    from teacher_service.contract.augment import augment_view, image_refs, view_recipe
    from teacher_service.shards import read_samples

    shards = sorted(glob.glob(f"{shard_dir}/train-*.tar"))
    samples = list(itertools.islice(read_samples(shards), batch))
    images = np.stack([augment_view(s["image"], s["__key__"], 1, 0, side) for s in samples])
    refs = image_refs(images, [s["__url__"] for s in samples], 1, view_recipe(side, 0))
    return EmbedRequest(keys=[s["__key__"] for s in samples], image_refs=refs, view="bench")


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
    actor = DirectForward.options(num_cpus=base.serving.num_cpus,
                                  num_gpus=base.serving.num_gpus).remote(base.replica_dict())
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
            handle = deploy(cfg, access_log=run.cfg.verbose)
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
    _record_references(run, info)
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


def _record_references(run: BenchRun, info: dict) -> None:
    """Requests by reference: bytes per sample on the wire next to the pixel request's, and what
    the replica pays per sample to regenerate the view (figures, not pass/fail)."""
    context = int(run.cfg.scale.context_length)
    for side in REFERENCE_SIDES:
        pixels, _ = wire_bytes(64, side, context, int(info["embed_dim"]))
        params = {"image_size": side, "context_length": context, "encoding": "proto, batch of 64",
                  "pixel_request_bytes": round(pixels, 1)}
        run.add(SECTION, f"wire request bytes/sample by reference ({side} px)", "bytes",
                [reference_wire_bytes(64, side, context)], params=params, kind="derived",
                note=f"key + int64 tokens ({8 * context} B) + shard index, view, SHA-256; pixels: {pixels:.0f} B")
    run.log(f"pool: cost of resolving references at {REFERENCE_COST_SIDE} px")
    values = reference_us_per_sample(REFERENCE_COST_SIDE, IDENTITY_BATCH, run.cfg.repeats)
    params = {"image_size": REFERENCE_COST_SIDE, "batch_size": IDENTITY_BATCH, "image_cache": "off",
              "source": "digits PNG at the view size"}
    run.add(SECTION, f"replica cost per sample by reference ({REFERENCE_COST_SIDE} px)", "us/sample", values,
            params=params, note="read via the shard index + decode + augment_view + SHA-256 check; best of 3 "
                                "passes per repeat, on the driver")
