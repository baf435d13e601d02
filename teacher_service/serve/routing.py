"""View-affine request routing: the same request from different runs meets on the same replica.

Coalescing (`coalesce.Coalescer`) works inside one replica. With several replicas, Serve's default
power-of-two-choices router sends two runs' identical requests (a sweep over the same data, seed
and views sends the same batches) to different replicas, and both compute them. This router
places a request that carries a view identity on the replica chosen by rendezvous hashing of
(view, keys): every caller picks the same replica while the replica set is unchanged, and when
a replica joins or leaves only the requests that hashed to it move. A request without a view is
routed like Serve's default (two random candidates, the shorter queue wins).

If the chosen replica is full (max_ongoing_requests), the request goes to the least-loaded of the
others rather than waiting: a duplicate computation is cheaper than a stalled run.

(view, keys) is only a placement hint: whatever a caller claims there decides where its request
runs, never what it is answered. The replica identifies samples by their content (`coalesce`).
"""
from __future__ import annotations

import hashlib
import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def affinity_key(request: object) -> bytes | None:
    """Where identical requests should meet: their view and keys (a hint the caller declares, not
    an identity); None when the request has no view.

    Works for the handle's `EmbedRequest` and the gRPC proxy's proto message alike (both have
    `view` and `keys`)."""
    view = getattr(request, "view", "")
    keys = getattr(request, "keys", None)
    if not view or not isinstance(view, str) or keys is None:
        return None
    h = hashlib.blake2b(view.encode("utf-8"), digest_size=16)
    for key in keys:
        h.update(b"\0" + str(key).encode("utf-8"))
    return h.digest()


def rendezvous_order(affinity: bytes, replica_ids: list[str]) -> list[int]:
    """Indices of `replica_ids` by descending rendezvous score for `affinity` (highest first)."""
    def score(rid: str) -> int:
        return int.from_bytes(hashlib.blake2b(affinity + rid.encode("utf-8"), digest_size=8).digest(), "little")

    return sorted(range(len(replica_ids)), key=lambda i: score(replica_ids[i]), reverse=True)


class ViewAffinityRouter(RequestRouter):
    """Serve request router: rendezvous hashing on (view, keys), else two random choices.

    No FIFOMixin: with it, a replica chosen for one request may be handed to the oldest pending
    request instead, which would undo the affinity; the base router assigns it to the request
    it was chosen for."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        request = pending_request.args[0] if pending_request is not None and pending_request.args else None
        affinity = affinity_key(request)
        if affinity is None or len(candidate_replicas) == 1:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        order = rendezvous_order(affinity, [r.replica_id.unique_id for r in candidate_replicas])
        ranked = [candidate_replicas[i] for i in order]
        return [ranked[:1], ranked[1:]]
