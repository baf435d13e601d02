"""Requests by reference: a replica regenerates the views a caller names instead of receiving them.

A student's 224 px view is 151 KB on the wire against a 3 KB answer. Views are replayable
(`contract.augment`), so where the teacher's nodes can read the training shards a caller sends
(shard, key, view, recipe) and the SHA-256 of its pixels (`contract.protocol.ImageRefs`). The
replica reads the sample through a per-shard index (`shards.index`), decodes it with the one
decoder, regenerates the view with `augment_view`, and checks the digest: any difference (another
copy of the shard, another augment build) refuses the request naming the sample, never answers
for other pixels. The resolved request carries plain pixels, so coalescing and the recent-rows
table see exactly what a pixel request would give them.

Only shards under the teacher's `shard_roots` are read (real paths, symlinks resolved): a caller,
possibly outside Ray over gRPC, cannot make a replica open anything else.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from teacher_service.contract.augment import (AUGMENT_FUNCTION, AUGMENT_VERSION, augment_view, image_sha256,
                                             same_augment_function)
from teacher_service.contract.protocol import EmbedRequest, ImageRefs, RequestError
from teacher_service.shards.index import ShardIndex, ShardIndexError, file_stamp
from teacher_service.shards.reader import ReaderLimits, SampleError, decode_sample

DEFAULT_MAX_SHARDS = 256  # shard indexes a replica keeps (a few MB for 10k-sample shards)


class _Refused(Exception):
    """Why one shard or sample cannot be read; becomes a RequestError naming the sample."""


class ViewResolver:
    """Turns `EmbedRequest.image_refs` into the pixels they name, for one replica.

    Keeps an index per recently used shard (rebuilt when the file's size, mtime or inode
    changes) and the decoded images of recently read samples, at most `cache_bytes` of them:
    runs sharing data and epochs re-reading a sample skip the decode. Thread-safe.
    """

    def __init__(self, roots: Sequence[str], cache_bytes: int = 256 << 20, max_shards: int = DEFAULT_MAX_SHARDS,
                 limits: ReaderLimits | None = None) -> None:
        self.roots = check_roots(roots)
        self.cache_bytes, self.max_shards = int(cache_bytes), int(max_shards)
        self.limits = limits or ReaderLimits()
        self._indexes: OrderedDict[str, ShardIndex] = OrderedDict()
        self._images: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._image_bytes = 0
        self._lock = threading.Lock()
        self.stats: dict[str, float] = {"reference_requests": 0, "reference_samples": 0, "reference_refused": 0,
                                        "reference_index_builds": 0, "reference_image_cache_hits": 0,
                                        "reference_resolve_s": 0.0}

    # ---- the replica's API
    def resolve(self, request: EmbedRequest) -> EmbedRequest:
        """`request` with its references replaced by the verified pixels (unchanged without any)."""
        return self.resolve_with_digests(request)[0]

    def resolve_with_digests(self, request: EmbedRequest) -> tuple[EmbedRequest, list[bytes] | None]:
        """As `resolve`, plus the SHA-256 of each regenerated view that the check computed (None
        without references). They are this replica's own digests of the pixels it returns, so
        coalescing can take them as the samples' identities instead of hashing the pixels again;
        the caller's digests only ever decide whether the request is refused."""
        refs = request.image_refs
        if refs is None:
            return request, None
        start = time.perf_counter()
        try:
            _check_recipe(refs.recipe)
            indexes = [self._index_or_problem(path) for path in refs.shards]
            images = np.stack([self._view(request.keys[i], refs, i, indexes) for i in range(len(refs))])
            digests = _check_digests(request.keys, refs, images)
        except RequestError:
            self._add(reference_refused=1)
            raise
        self._add(reference_requests=1, reference_samples=len(refs), reference_resolve_s=time.perf_counter() - start)
        return dataclasses.replace(request, images=images, image_refs=None), digests

    def check_shards(self, paths: Sequence[str], sizes: Sequence[int] | None = None) -> dict[str, str]:
        """Path → "" when this replica can serve references into it, else why not. `sizes` (the
        caller's file sizes) catch another copy of the data early; digests catch the rest."""
        problems = {}
        for i, path in enumerate(paths):
            found = self._index_or_problem(path)
            if isinstance(found, _Refused):
                problems[path] = str(found)
            elif sizes is not None and found.stamp[0] != int(sizes[i]):
                problems[path] = f"the teacher's copy has {found.stamp[0]} bytes, the caller's {int(sizes[i])}"
            else:
                problems[path] = ""
        return problems

    # ---- shards and samples
    def _real(self, path: str) -> str:
        """The real path of a shard under the roots, or _Refused."""
        if not os.path.isabs(path):
            raise _Refused("not an absolute path")
        real = os.path.realpath(path)
        if not any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in self.roots):
            raise _Refused("not under this teacher's shard_roots (TeacherConfig serving.shard_roots)")
        return real

    def _index_or_problem(self, path: str) -> ShardIndex | _Refused:
        try:
            return self._index(self._real(path))
        except _Refused as exc:
            return exc

    def _index(self, real: str) -> ShardIndex:
        try:
            stamp = file_stamp(real)
        except OSError as exc:
            raise _Refused(f"the teacher's node cannot read the shard ({exc.strerror or exc})") from None
        with self._lock:
            index = self._indexes.get(real)
            if index is not None and index.stamp == stamp:
                self._indexes.move_to_end(real)
                return index
        try:
            index = ShardIndex.build(real)
        except (ShardIndexError, OSError) as exc:
            raise _Refused(str(exc)) from None
        with self._lock:
            self._indexes[real] = index
            self.stats["reference_index_builds"] += 1
            while len(self._indexes) > self.max_shards:
                self._indexes.popitem(last=False)
        return index

    def _view(self, key: str, refs: ImageRefs, i: int, indexes: list) -> np.ndarray:
        shard, view = refs.shards[int(refs.shard_index[i])], int(refs.views[i])
        try:
            index = indexes[int(refs.shard_index[i])]
            if isinstance(index, _Refused):
                raise index
            image = self._image(index, key)
        except _Refused as exc:
            raise RequestError(f"image_refs: sample {key!r} (view {view} of shard {shard}): {exc}") from None
        recipe = refs.recipe
        return augment_view(image, key, view, int(recipe["seed"]), int(recipe["image_size"]),
                            train=bool(recipe["train"]))

    def _image(self, index: ShardIndex, key: str) -> np.ndarray:
        """The decoded RGB image of `key`, from the cache or read through the index."""
        cache_key = (index.path, index.stamp, key)
        with self._lock:
            image = self._images.get(cache_key)
            if image is not None:
                self._images.move_to_end(cache_key)
                self.stats["reference_image_cache_hits"] += 1
                return image
        try:
            image = decode_sample(index.raw_sample(key, self.limits), self.limits)["image"]
        except KeyError:
            raise _Refused("the shard has no sample with this key") from None
        except SampleError as exc:
            raise _Refused(f"the sample is unusable ({exc.reason}: {exc})") from None
        except OSError as exc:
            raise _Refused(f"reading the shard failed ({exc})") from None
        self._remember(cache_key, image)
        return image

    def _remember(self, cache_key: tuple, image: np.ndarray) -> None:
        if image.nbytes > self.cache_bytes:
            return
        with self._lock:
            if cache_key not in self._images:
                self._images[cache_key] = image
                self._image_bytes += image.nbytes
            while self._image_bytes > self.cache_bytes:
                self._image_bytes -= self._images.popitem(last=False)[1].nbytes

    def _add(self, **counts: float) -> None:
        with self._lock:
            for name, value in counts.items():
                self.stats[name] += value


def check_roots(roots: Sequence[str]) -> list[str]:
    """Real paths of `roots`; ValueError naming a root that is not an absolute path of a directory."""
    if isinstance(roots, str) or not all(isinstance(r, str) for r in roots):
        raise ValueError(f"serving.shard_roots: expected a list of directories, got {roots!r}")
    for root in roots:
        if not os.path.isabs(os.path.expanduser(root)):
            raise ValueError(f"serving.shard_roots: {root!r} is not an absolute path")
    return [os.path.realpath(os.path.expanduser(r)) for r in roots]


def _check_recipe(recipe: dict) -> None:
    """Only views this teacher's augment code would make can be regenerated."""
    if not same_augment_function(recipe["function"], AUGMENT_FUNCTION) or recipe["version"] != AUGMENT_VERSION:
        raise RequestError(f"image_refs.recipe: views made by {recipe['function']} version {recipe['version']}; "
                           f"this teacher makes {AUGMENT_FUNCTION} version {AUGMENT_VERSION}: send pixels")


def _check_digests(keys: list[str], refs: ImageRefs, images: np.ndarray) -> list[bytes]:
    """The regenerated views' digests; RequestError naming the first sample whose view differs
    from the caller's."""
    sent = [row.tobytes() for row in refs.sha256]
    digests = image_sha256(images)
    bad = [i for i, digest in enumerate(digests) if digest != sent[i]]
    if bad:
        i = bad[0]
        raise RequestError(
            f"image_refs: sample {keys[i]!r} (view {int(refs.views[i])} of shard "
            f"{refs.shards[int(refs.shard_index[i])]}): the view the teacher regenerated has another SHA-256 "
            f"than the caller's pixels ({len(bad)} of {len(keys)} samples differ). The teacher's copy of the "
            f"shard, its decoder or the recipe {refs.recipe} differ from the caller's: send pixels")
    return digests
