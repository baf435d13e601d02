"""Training and evaluation batches from WebDataset shards: equal batch counts per rank, replayable views, tokens.

Samples come from the one shard reader (`teacher_service.shards`): bad ones are skipped and
counted there, by the same rules precompute and audits use.

DDP hangs if one rank runs out of batches before the others, so every rank yields exactly
:func:`steps_per_epoch` full batches. Shards are dealt to ranks round-robin (``split_by_node``
semantics, with rank/world passed in rather than read from the environment); a rank whose shards
hold fewer samples than its share wraps around them, one holding more stops early. With fewer
shards than ranks, or shards so uneven that a rank would get under half its share, samples are
dealt instead (sample ``i`` of the sorted shard stream goes to rank ``i % world``).
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import webdataset as wds

from teacher_service.contract.augment import augment_view, view_recipe
from teacher_service.shards import (
    NoUsableSamplesError,
    ReaderLimits,
    SkipCounts,
    shard_list,
    shard_sample_counts,
)
from teacher_service.shards.reader import decoded_samples, raw_samples


@dataclass(frozen=True)
class ViewOrigin:
    """Where a batch's views come from: sample i is view ``view`` of sample ``keys[i]`` of shard
    ``shards[i]``, made by ``recipe`` (`view_recipe`). A teacher that reads the same shards can
    regenerate the views from this instead of receiving their pixels (`contract.protocol.ImageRefs`)."""

    shards: list[str]
    view: int
    recipe: dict

    def take(self, rows) -> ViewOrigin:
        return ViewOrigin([self.shards[i] for i in rows], self.view, self.recipe)


@dataclass
class Batch:
    """One batch: uint8 ``[B, S, S, 3]`` views, int64 ``[B, L]`` tokens, int64 labels (-1: unlabeled),
    and where the views come from (None for batches not read from shards)."""

    keys: list[str]
    images: np.ndarray
    tokens: np.ndarray
    labels: np.ndarray
    captions: list[str]
    origin: ViewOrigin | None = None
    # per sample, the teacher names its metadata picks (a run with several teachers asks only
    # those for it), or None where it picks none; None for the whole batch when no sample does
    teachers: list[tuple[str, ...] | None] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, rows: np.ndarray) -> Batch:
        """The batch of `rows` (positions into this one), in that order."""
        return Batch(keys=[self.keys[i] for i in rows], images=self.images[rows], tokens=self.tokens[rows],
                     labels=self.labels[rows], captions=[self.captions[i] for i in rows],
                     origin=None if self.origin is None else self.origin.take(rows),
                     teachers=None if self.teachers is None else [self.teachers[i] for i in rows])


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
    return sum(shard_sample_counts(shard_list(shards))) // world_size


def steps_per_epoch(shards, *, world_size: int, batch_size: int) -> int:
    """Full batches per rank per epoch (the last partial batch is dropped)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    per_rank = samples_per_rank(shard_list(shards), world_size)
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


def _sample_filter(rank: int, world_size: int) -> Callable[[Iterable[dict]], Iterator[dict]]:
    def keep_every_nth(src: Iterable[dict]) -> Iterator[dict]:
        yield from itertools.islice(src, rank, None, world_size)

    return keep_every_nth


def _tar_reader(skips: SkipCounts, limits: ReaderLimits, count_tar_errors: bool):
    """Pipeline stage: shard urls → raw samples; replaces webdataset's open/expand/group stages,
    which re-raise on any corrupt tar (and leave files to the garbage collector)."""

    def read(sources: Iterable) -> Iterator[dict]:
        for source in sources:
            url = source["url"] if isinstance(source, dict) else source
            yield from raw_samples(url, skips, limits, count_tar_errors)

    return read


def _decoder(skips: SkipCounts, limits: ReaderLimits):
    """Pipeline stage: raw samples → checked, decoded ones (the shared reader's rules)."""
    return lambda samples: decoded_samples(samples, skips, limits)


def _webdataset(shards: list[str], *, skips: SkipCounts, limits: ReaderLimits, count_tar_errors: bool = True,
                **kwargs) -> wds.WebDataset:
    """``wds.WebDataset`` for local tars, rank/worker splitting only as passed in, and our tar
    reader in place of webdataset's opener, expander and grouper."""
    dataset = wds.WebDataset(shards, workersplitter=None, empty_check=False, **kwargs)
    opener = next(i for i, s in enumerate(dataset.pipeline) if isinstance(s, wds.cache.StreamingOpen))
    if len(dataset.pipeline) != opener + 3:
        raise RuntimeError(f"unexpected webdataset pipeline {dataset.pipeline} (expected open, expand, group last)")
    dataset.pipeline = [*dataset.pipeline[:opener], _tar_reader(skips, limits, count_tar_errors)]
    return dataset


def _rank_pass(shards: list[str], *, mode: str, rank: int, world_size: int, seed: int, shuffle_buffer: int,
               skips: SkipCounts, limits: ReaderLimits):
    """One pass over this rank's part of the data as a webdataset pipeline (decoded, valid samples).

    Bad samples are dropped after the sample-mode split, so each rank counts only its own; a
    corrupt tar, which every rank reads in sample mode, is counted by rank 0 alone.
    """
    if mode == "shard":

        def nodesplitter(src):  # split_by_node with explicit rank/world
            yield from itertools.islice(src, rank, None, world_size)

        shardshuffle = len(shards)
    else:

        def nodesplitter(src):  # every rank reads every shard, in the same order
            yield from src

        shardshuffle = False
    dataset = _webdataset(shards, nodesplitter=nodesplitter, shardshuffle=shardshuffle, seed=seed, skips=skips,
                          limits=limits, count_tar_errors=mode == "shard" or rank == 0)
    if mode == "sample":
        dataset = dataset.compose(_sample_filter(rank, world_size))
    if shuffle_buffer > 1:
        dataset = dataset.shuffle(shuffle_buffer, initial=shuffle_buffer, seed=seed)
    return dataset.compose(_decoder(skips, limits))


def _endless(shards: list[str], *, rank: int, world_size: int, epoch: int, seed: int, shuffle_buffer: int,
             skips: SkipCounts, limits: ReaderLimits):
    """This rank's samples for ``epoch``, wrapping around (reshuffled each pass) forever.

    Skipped samples just pull more from the stream; a pass with no usable sample at all raises
    NoUsableSamplesError instead of looping forever.
    """
    mode = _split_mode(shard_sample_counts(shards), world_size)
    for pass_index in itertools.count():
        pass_seed = _seed("train", seed, epoch, rank, pass_index)
        empty = True
        for sample in _rank_pass(
            shards, mode=mode, rank=rank, world_size=world_size, seed=pass_seed, shuffle_buffer=shuffle_buffer,
            skips=skips, limits=limits,
        ):
            empty = False
            yield sample
        if empty:
            raise NoUsableSamplesError(f"rank {rank}/{world_size} got no usable samples in a whole pass over "
                                       f"shards {shards}; skipped {skips.skipped or 'none (no samples at all)'}")


def _to_numpy_tokens(tokens) -> np.ndarray:
    if hasattr(tokens, "detach"):
        tokens = tokens.detach().cpu().numpy()
    return np.asarray(tokens, dtype=np.int64)


def _truncated_captions(tokenizer, captions: list[str], tokens: np.ndarray) -> int:
    """How many captions the tokenizer cut to the context length. Only rows that fill the whole
    context can be; those are re-tokenised one longer to tell a cut caption from an exact fit (a
    tokenizer without ``context_length`` counts every full row)."""
    full = [c for c, row in zip(captions, tokens) if row[-1] != 0]
    if not full:
        return 0
    try:
        longer = _to_numpy_tokens(tokenizer(full, context_length=tokens.shape[1] + 1))
    except TypeError:
        return len(full)
    return int(np.count_nonzero(longer[:, -1]))


def _make_batch(samples: list[dict], *, image_size: int, view: int, seed: int, train: bool, tokenizer,
                skips: SkipCounts | None = None) -> Batch:
    keys = [s["__key__"] for s in samples]
    captions = [s["txt"] for s in samples]
    images = np.stack(
        [augment_view(s["image"], k, view, seed, image_size, train=train) for s, k in zip(samples, keys)]
    )
    tokens = _to_numpy_tokens(tokenizer(captions))
    if skips is not None:
        skips.note("caption_truncated", _truncated_captions(tokenizer, captions, tokens))
    return Batch(
        keys=keys,
        images=images,
        tokens=tokens,
        labels=np.asarray([s["cls"] for s in samples], dtype=np.int64),
        captions=captions,
        origin=ViewOrigin([s["__url__"] for s in samples], view, view_recipe(image_size, seed, train)),
        teachers=_teacher_choices(samples),
    )


def _teacher_choices(samples: list[dict]) -> list[tuple[str, ...] | None] | None:
    choices = [s.get("teachers") for s in samples]
    return choices if any(c is not None for c in choices) else None


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
    skips: SkipCounts | None = None,
    limits: ReaderLimits | None = None,
) -> Iterator[Batch]:
    """Exactly :func:`steps_per_epoch` batches of exactly ``batch_size`` for ``rank`` in ``epoch``.

    Views are ``augment_view(image, key, view, seed)`` with ``view`` defaulting to ``epoch``; order
    is shuffled from ``(seed, epoch, rank)``, so a rerun of an epoch yields the same batches.
    ``start_batch`` resumes inside the epoch: the samples before it are read past (not augmented
    or tokenized), and the rest are the same batches an uninterrupted epoch would yield.
    Bad samples are skipped and counted into ``skips`` by reason (see SKIP_REASONS); the stream
    reads on to fill the batch.
    """
    view = epoch if view is None else view
    skips = SkipCounts() if skips is None else skips
    limits = ReaderLimits() if limits is None else limits
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    shards = shard_list(shards)
    steps = steps_per_epoch(shards, world_size=world_size, batch_size=batch_size)
    if not 0 <= start_batch <= steps:
        raise ValueError(f"start_batch must be in [0, {steps}], got {start_batch}")
    stream = _endless(shards, rank=rank, world_size=world_size, epoch=epoch, seed=seed, shuffle_buffer=shuffle_buffer,
                      skips=skips, limits=limits)
    for _ in itertools.islice(stream, start_batch * batch_size):
        pass
    for _ in range(steps - start_batch):
        samples = list(itertools.islice(stream, batch_size))
        yield _make_batch(samples, image_size=image_size, view=view, seed=seed, train=True, tokenizer=tokenizer,
                          skips=skips)
    stream.close()


def eval_set(shards: list[str], *, image_size: int, tokenizer, limit: int | None = None,
             skips: SkipCounts | None = None, limits: ReaderLimits | None = None) -> Batch:
    """Every usable sample (or the first ``limit``) in shard order, as one Batch of plain resized
    views; bad samples are skipped and counted into ``skips``."""
    shards = shard_list(shards)
    skips = SkipCounts() if skips is None else skips
    limits = ReaderLimits() if limits is None else limits
    dataset = _webdataset(shards, nodesplitter=None, shardshuffle=False, skips=skips, limits=limits)
    dataset = dataset.compose(_decoder(skips, limits))
    samples = list(itertools.islice(dataset, limit)) if limit is not None else list(dataset)
    if not samples:
        raise NoUsableSamplesError(f"no usable samples in eval shards {shards}; "
                                   f"skipped {skips.skipped or 'none (no samples at all)'}")
    return _make_batch(samples, image_size=image_size, view=0, seed=0, train=False, tokenizer=tokenizer,
                       skips=skips)
