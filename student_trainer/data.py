"""Reading WebDataset shards per rank: equal batch counts on every rank, replayable views, tokens.

DDP hangs if one rank runs out of batches before the others, so every rank yields exactly
:func:`steps_per_epoch` full batches. Shards are dealt to ranks round-robin (``split_by_node``
semantics, with rank/world passed in rather than read from the environment); a rank whose shards
hold fewer samples than its share wraps around them, one holding more stops early. With fewer
shards than ranks, or shards so uneven that a rank would get under half its share, samples are
dealt instead (sample ``i`` of the sorted shard stream goes to rank ``i % world``).
"""
from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import braceexpand
import numpy as np
import webdataset as wds

from student_trainer.transform import augment_view

DATASET_INFO = "dataset.json"
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key/extension rule
_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "ppm", "bmp", "tif", "tiff")


@dataclass
class Batch:
    """One batch: uint8 ``[B, S, S, 3]`` views, int64 ``[B, L]`` tokens, int64 labels (-1: unlabeled)."""

    keys: list[str]
    images: np.ndarray
    tokens: np.ndarray
    labels: np.ndarray
    captions: list[str]

    def __len__(self) -> int:
        return len(self.keys)


# ---------------------------------------------------------------------------------------------
# locating shards and their metadata


def _expand_one(spec: str, split: str | None) -> list[str]:
    if os.path.isdir(spec):
        prefix = f"{glob.escape(split)}-" if split else ""
        return sorted(glob.glob(os.path.join(glob.escape(spec), f"{prefix}*.tar")))
    if "{" in spec:
        paths = list(braceexpand.braceexpand(spec))
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"shard spec {spec!r}: {len(missing)} shard(s) missing, e.g. {missing[0]}")
        return paths
    if glob.has_magic(spec):
        return sorted(p for p in glob.glob(spec) if os.path.isfile(p))
    if os.path.isfile(spec):
        return [spec]
    parent, prefix = os.path.split(spec)
    if prefix and os.path.isdir(parent or "."):  # 'DIR/train' → DIR/train-*.tar
        return sorted(glob.glob(os.path.join(glob.escape(parent or "."), f"{glob.escape(prefix)}-*.tar")))
    return []


def resolve_shards(spec: str | list[str], split: str | None = None) -> list[str]:
    """Expand a shard spec into tar paths.

    ``spec`` is a directory (its ``*.tar``, or ``{split}-*.tar`` when ``split`` is given), a
    directory plus split prefix (``DIR/train``), a glob, a brace pattern
    (``DIR/train-{000000..000004}.tar``), a single tar, or a list of any of these.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    found: list[str] = []
    for item in specs:
        found.extend(_expand_one(os.fspath(item), split))
    shards = list(dict.fromkeys(found))
    if not shards:
        where = f" (split {split!r})" if split else ""
        raise FileNotFoundError(f"no shards found for {spec!r}{where}")
    return shards


def _info_path(shards_or_dir) -> str:
    if isinstance(shards_or_dir, (str, os.PathLike)) and os.path.isdir(shards_or_dir):
        return os.path.join(os.fspath(shards_or_dir), DATASET_INFO)
    shards = resolve_shards(shards_or_dir)
    return os.path.join(os.path.dirname(os.path.abspath(shards[0])), DATASET_INFO)


def load_dataset_info(shards_or_dir) -> dict:
    """The ``dataset.json`` beside the shards (``class_names``, ``templates``, ``splits``)."""
    path = _info_path(shards_or_dir)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {DATASET_INFO} next to shards {shards_or_dir!r} (looked for {path})")
    with open(path, encoding="utf-8") as stream:
        info = json.load(stream)
    info.setdefault("class_names", [])
    info.setdefault("templates", [])
    info.setdefault("splits", {})
    return info


def _shard_list(shards) -> list[str]:
    """A list of shard paths as given, or a spec string resolved with :func:`resolve_shards`."""
    return resolve_shards(shards) if isinstance(shards, (str, os.PathLike)) else list(shards)


def _recorded_counts(directory: str) -> dict[str, int]:
    """Shard name → sample count from ``dataset.json`` in ``directory`` ({} when absent)."""
    path = os.path.join(directory, DATASET_INFO)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as stream:
        splits = json.load(stream).get("splits", {})
    counts = {}
    for entry in splits.values():
        counts.update(zip(entry.get("shards", []), entry.get("samples_per_shard", [])))
    return counts


def count_tar_samples(path: str) -> int:
    """Count samples in one tar by scanning member names (consecutive members sharing a key)."""
    keys, last = 0, None
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            match = _MEMBER.match(member.name) if member.isfile() else None
            if match and match.group(1) != last:
                keys, last = keys + 1, match.group(1)
    return keys


def shard_sample_counts(shards: list[str]) -> list[int]:
    """Samples per shard: from ``dataset.json`` when it lists the shard, else by scanning the tar."""
    by_dir: dict[str, dict[str, int]] = {}
    counts = []
    for shard in shards:
        directory = os.path.dirname(os.path.abspath(shard))
        if directory not in by_dir:
            by_dir[directory] = _recorded_counts(directory)
        recorded = by_dir[directory].get(os.path.basename(shard))
        counts.append(int(recorded) if recorded is not None else count_tar_samples(shard))
    return counts


# ---------------------------------------------------------------------------------------------
# rank balancing


def _split_mode(counts: list[int], world_size: int) -> str:
    """``"shard"`` when round-robin shards give every rank at least half its share, else ``"sample"``."""
    if world_size <= 1:
        return "shard"
    if len(counts) < world_size:
        return "sample"
    share = sum(counts) / world_size
    per_rank = [sum(counts[r::world_size]) for r in range(world_size)]
    return "shard" if min(per_rank) >= max(1.0, 0.5 * share) else "sample"


def samples_per_rank(shards: list[str], world_size: int) -> int:
    """Samples each rank sees per epoch: the floor of an equal share of all samples."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return sum(shard_sample_counts(_shard_list(shards))) // world_size


def steps_per_epoch(shards, *, world_size: int, batch_size: int) -> int:
    """Full batches per rank per epoch (the last partial batch is dropped)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    per_rank = samples_per_rank(_shard_list(shards), world_size)
    steps = per_rank // batch_size
    if steps == 0:
        raise ValueError(
            f"{per_rank} samples per rank (world size {world_size}) cannot fill one batch of {batch_size}"
        )
    return steps


def _seed(*parts: object) -> int:
    payload = "\x00".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "little")


# ---------------------------------------------------------------------------------------------
# pipelines


def _image_of(sample: dict) -> np.ndarray:
    for ext in _IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise ValueError(f"sample {sample.get('__key__')!r} from {sample.get('__url__')!r} has no image member")


def _label_of(sample: dict) -> int:
    label = sample.get("cls")
    if label is None:
        return -1
    return int(label.decode() if isinstance(label, bytes) else label)


def _caption_of(sample: dict) -> str:
    caption = sample.get("txt")
    if caption is None:
        raise ValueError(f"sample {sample.get('__key__')!r} from {sample.get('__url__')!r} has no txt caption")
    return caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)


def _sample_filter(rank: int, world_size: int) -> Callable[[Iterable[dict]], Iterator[dict]]:
    def keep_every_nth(src: Iterable[dict]) -> Iterator[dict]:
        yield from itertools.islice(src, rank, None, world_size)

    return keep_every_nth


def _closing_open(sources: Iterable) -> Iterator[dict]:
    """Open local shards one at a time and close each when the next is requested (or on abandon).

    webdataset 1.0.2's ``StreamingOpen`` never closes its files (they wait for the garbage
    collector and raise ResourceWarnings); this drop-in replacement closes them deterministically.
    """
    for source in sources:
        url = source["url"] if isinstance(source, dict) else source
        with open(url, "rb") as stream:
            yield dict(url=url, stream=stream, local_path=url)


def _webdataset(shards: list[str], **kwargs) -> wds.WebDataset:
    """``wds.WebDataset`` for local tars, with rank/worker splitting only as passed in."""
    dataset = wds.WebDataset(shards, workersplitter=None, empty_check=False, **kwargs)
    dataset.pipeline = [_closing_open if isinstance(s, wds.cache.StreamingOpen) else s for s in dataset.pipeline]
    return dataset


def _rank_pass(shards: list[str], *, mode: str, rank: int, world_size: int, seed: int, shuffle_buffer: int):
    """One pass over this rank's part of the data as a webdataset pipeline (decoded samples)."""
    if mode == "shard":

        def nodesplitter(src):  # split_by_node with explicit rank/world
            yield from itertools.islice(src, rank, None, world_size)

        shardshuffle = len(shards)
    else:

        def nodesplitter(src):  # every rank reads every shard, in the same order
            yield from src

        shardshuffle = False
    dataset = _webdataset(shards, nodesplitter=nodesplitter, shardshuffle=shardshuffle, seed=seed)
    if mode == "sample":
        dataset = dataset.compose(_sample_filter(rank, world_size))
    if shuffle_buffer > 1:
        dataset = dataset.shuffle(shuffle_buffer, initial=shuffle_buffer, seed=seed)
    return dataset.decode("rgb8")


def _endless(shards: list[str], *, rank: int, world_size: int, epoch: int, seed: int, shuffle_buffer: int):
    """This rank's samples for ``epoch``, wrapping around (reshuffled each pass) forever."""
    mode = _split_mode(shard_sample_counts(shards), world_size)
    for pass_index in itertools.count():
        pass_seed = _seed("train", seed, epoch, rank, pass_index)
        empty = True
        for sample in _rank_pass(
            shards, mode=mode, rank=rank, world_size=world_size, seed=pass_seed, shuffle_buffer=shuffle_buffer
        ):
            empty = False
            yield sample
        if empty:
            raise RuntimeError(f"rank {rank}/{world_size} got no samples from shards {shards}")


def _to_numpy_tokens(tokens) -> np.ndarray:
    if hasattr(tokens, "detach"):
        tokens = tokens.detach().cpu().numpy()
    return np.asarray(tokens, dtype=np.int64)


def _make_batch(samples: list[dict], *, image_size: int, view: int, seed: int, train: bool, tokenizer) -> Batch:
    keys = [s["__key__"] for s in samples]
    captions = [_caption_of(s) for s in samples]
    images = np.stack(
        [augment_view(_image_of(s), k, view, seed, image_size, train=train) for s, k in zip(samples, keys)]
    )
    return Batch(
        keys=keys,
        images=images,
        tokens=_to_numpy_tokens(tokenizer(captions)),
        labels=np.asarray([_label_of(s) for s in samples], dtype=np.int64),
        captions=captions,
    )


def train_batches(
    shards: list[str],
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    image_size: int,
    epoch: int,
    seed: int,
    tokenizer,
    shuffle_buffer: int = 500,
    view: int | None = None,
    start_batch: int = 0,
) -> Iterator[Batch]:
    """Exactly :func:`steps_per_epoch` batches of exactly ``batch_size`` for ``rank`` in ``epoch``.

    Views are ``augment_view(image, key, view, seed)`` with ``view`` defaulting to ``epoch``; order
    is shuffled from ``(seed, epoch, rank)``, so a rerun of an epoch yields the same batches.
    ``start_batch`` resumes inside the epoch: the samples before it are read past (not augmented
    or tokenized), and the rest are the same batches an uninterrupted epoch would yield.
    """
    view = epoch if view is None else view
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    shards = _shard_list(shards)
    steps = steps_per_epoch(shards, world_size=world_size, batch_size=batch_size)
    if not 0 <= start_batch <= steps:
        raise ValueError(f"start_batch must be in [0, {steps}], got {start_batch}")
    stream = _endless(shards, rank=rank, world_size=world_size, epoch=epoch, seed=seed, shuffle_buffer=shuffle_buffer)
    for _ in itertools.islice(stream, start_batch * batch_size):
        pass
    for _ in range(steps - start_batch):
        samples = list(itertools.islice(stream, batch_size))
        yield _make_batch(samples, image_size=image_size, view=view, seed=seed, train=True, tokenizer=tokenizer)
    stream.close()


def eval_set(shards: list[str], *, image_size: int, tokenizer, limit: int | None = None) -> Batch:
    """Every sample (or the first ``limit``) in shard order, as one Batch of plain resized views."""
    shards = _shard_list(shards)
    dataset = _webdataset(shards, nodesplitter=None, shardshuffle=False).decode("rgb8")
    samples = list(itertools.islice(dataset, limit)) if limit is not None else list(dataset)
    if not samples:
        raise ValueError(f"no samples in eval shards {shards}")
    return _make_batch(samples, image_size=image_size, view=0, seed=0, train=False, tokenizer=tokenizer)
