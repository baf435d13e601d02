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
import logging
import lzma
import os
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import braceexpand
import numpy as np
import webdataset as wds

from student_trainer.transform import augment_view
from teacher_service.views import MAX_IMAGE_PIXELS, ImageDecodeError, decode_rgb8

log = logging.getLogger(__name__)

DATASET_INFO = "dataset.json"
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key/extension rule
_META = re.compile(r"__[^/]*__($|/)")  # webdataset skips these members (e.g. __index__)
_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "ppm", "bmp", "tif", "tiff")
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, zlib.error, lzma.LZMAError)


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
# bad input: limits and skip counts

SKIP_REASONS = (
    "corrupt_tar",  # a shard read cut short (unreadable, corrupt header or data, truncated): once per read
    "duplicate_member",  # a second member with the same key and extension
    "member_too_large",  # a member over ReaderLimits.max_member_bytes (never read)
    "missing_image",
    "undecodable_image",
    "truncated_image",
    "image_too_large",  # over ReaderLimits.max_image_pixels (checked from the header, before decoding)
    "missing_caption",
    "undecodable_caption",  # not UTF-8
    "empty_caption",  # nothing but whitespace
    "caption_too_long",  # over ReaderLimits.max_caption_bytes (never read)
    "bad_label",  # a cls member that is not an integer in [-1, 2**31)
)
NOTE_REASONS = ("caption_truncated",)  # kept samples: the tokenizer cut the caption to the context length


@dataclass(frozen=True)
class ReaderLimits:
    """Sizes past which a sample is skipped unread: a 64 KiB "caption" is a wrong file, not a
    caption (and would cost the tokenizer seconds), and a huge member would sit in the shuffle
    buffer for nothing. Captions under the limit but over the context length are kept, truncated."""

    max_caption_bytes: int = 1 << 16
    max_member_bytes: int = 1 << 28
    max_image_pixels: int = MAX_IMAGE_PIXELS


@dataclass
class SkipCounts:
    """What a reader dropped, by reason, and what it kept but noted (``caption_truncated``).

    One object per reader (per epoch in training), passed in rather than global. Skips are
    logged naming shard and key: the first ``log_first`` of each reason, then at powers of ten.
    """

    skipped: dict[str, int] = field(default_factory=dict)
    noted: dict[str, int] = field(default_factory=dict)
    log_first: int = 5

    def skip(self, reason: str, shard: str | None, key: str | None, detail: str = "") -> None:
        count = self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if count <= self.log_first or _is_power_of_ten(count):
            log.warning("skipped sample %r of shard %s: %s%s (%d %s so far)", key, shard, reason,
                        f" ({detail})" if detail else "", count, reason)

    def note(self, reason: str, count: int = 1) -> None:
        if count:
            self.noted[reason] = self.noted.get(reason, 0) + count

    @property
    def total(self) -> int:
        return sum(self.skipped.values())

    def as_metrics(self) -> dict[str, int]:
        """Fixed keys (every rank reports the same ones): ``data_skipped_<reason>``,
        ``data_skipped_total`` and ``data_<note>``."""
        metrics = {f"data_skipped_{r}": self.skipped.get(r, 0) for r in SKIP_REASONS}
        metrics["data_skipped_total"] = self.total
        metrics.update({f"data_{r}": self.noted.get(r, 0) for r in NOTE_REASONS})
        return metrics


def _is_power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1


class NoUsableSamplesError(ValueError):
    """A whole pass over the shards gave no usable sample: no batch could ever be filled."""


class _SampleError(ValueError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


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
    """Count samples in one tar by scanning member names (consecutive members sharing a key).

    A corrupt tar counts the samples before the corruption (logged), so that planning an epoch
    never crashes on a shard the reader will skip.
    """
    keys, last = 0, None
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                match = _MEMBER.match(member.name) if member.isfile() else None
                if match and match.group(1) != last:
                    keys, last = keys + 1, match.group(1)
    except _TAR_ERRORS as exc:  # the reader counts the corruption when it gets there
        log.warning("counting samples of shard %s stopped after %d: %s: %s", path, keys, type(exc).__name__, exc)
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


class _HeaderProbe(tarfile.TarInfo):
    """Remembers the header a tar stopped at: after its first member, ``tarfile`` ends iteration
    silently at a corrupt or missing header, which would hide a shard cut short."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # the end-of-archive marker: a clean end
            raise
        except tarfile.HeaderError as exc:
            tar.kd_header_error = f"{type(exc).__name__} at byte {tar.offset}: {exc}"
            raise


def _check_clean_end(tar: tarfile.TarFile) -> None:
    """ReadError unless the archive ended at its end-of-archive marker with only zeros after it
    (a zeroed block mid-shard looks like the marker and would drop the rest silently)."""
    error = getattr(tar, "kd_header_error", None)
    if error:
        raise tarfile.ReadError(f"archive ends at a bad header ({error})")
    while chunk := tar.fileobj.read(1 << 20):
        if chunk.count(0) != len(chunk):
            raise tarfile.ReadError(f"data after the end-of-archive marker (at byte {tar.offset})")


def _member_name(member: tarfile.TarInfo) -> tuple[str, str] | None:
    """(key, lower-case extension) as webdataset groups members, None for members it ignores."""
    if not member.isreg() or _META.match(member.name):
        return None
    match = _MEMBER.match(member.name)
    return (match.group(1), match.group(2).lower()) if match else None


def _add_member(sample: dict, tar: tarfile.TarFile, member: tarfile.TarInfo, ext: str, limits: ReaderLimits) -> None:
    """Read one member into ``sample``; a duplicate or oversized one marks the sample bad, unread."""
    limit = limits.max_caption_bytes if ext == "txt" else limits.max_member_bytes
    if ext in sample:
        sample.setdefault("__bad__", ("duplicate_member", f"a second {ext!r} member"))
    elif member.size > limit:
        reason = "caption_too_long" if ext == "txt" else "member_too_large"
        sample.setdefault("__bad__", (reason, f"{ext!r} member of {member.size} bytes, limit {limit}"))
        sample[ext] = None
    else:
        sample[ext] = tar.extractfile(member).read()


def _shard_samples(url: str, skips: SkipCounts, limits: ReaderLimits, count_tar_errors: bool) -> Iterator[dict]:
    """One tar's samples, grouped as webdataset groups them (consecutive members sharing a key).

    A tar error ends the shard: the samples already yielded stay, the one in progress is dropped
    (it may be incomplete) and the read counts once as ``corrupt_tar`` (when ``count_tar_errors``).
    """
    current: dict | None = None
    try:
        with open(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*", tarinfo=_HeaderProbe) as tar:
            for member in tar:
                tar.members = []  # streaming: do not keep every header of a large shard
                named = _member_name(member)
                if named is None:
                    continue
                if current is not None and named[0] != current["__key__"]:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": named[0], "__url__": url, "__local_path__": url}
                _add_member(current, tar, member, named[1], limits)
            _check_clean_end(tar)
    except _TAR_ERRORS as exc:
        if count_tar_errors:
            after = f" at sample {current['__key__']!r}" if current else ""
            skips.skip("corrupt_tar", url, None, f"shard cut short{after}: {type(exc).__name__}: {exc}")
        return
    if current is not None:
        yield current


def _tar_reader(skips: SkipCounts, limits: ReaderLimits, count_tar_errors: bool):
    """Pipeline stage: shard urls → raw samples; replaces webdataset's open/expand/group stages,
    which re-raise on any corrupt tar (and leave files to the garbage collector)."""

    def read(sources: Iterable) -> Iterator[dict]:
        for source in sources:
            url = source["url"] if isinstance(source, dict) else source
            yield from _shard_samples(url, skips, limits, count_tar_errors)

    return read


def _checked_caption(value: bytes | None) -> str:
    if value is None:
        raise _SampleError("missing_caption", "no txt member")
    try:
        caption = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _SampleError("undecodable_caption", f"txt is not UTF-8 ({exc})") from None
    if not caption.strip():
        raise _SampleError("empty_caption", f"txt holds only whitespace ({len(value)} bytes)")
    return caption


def _checked_label(value: bytes | None) -> int:
    if value is None:
        return -1
    try:
        label = int(value)
    except ValueError:
        raise _SampleError("bad_label", f"cls {value[:40]!r} is not an integer") from None
    if not -1 <= label < 2**31:
        raise _SampleError("bad_label", f"cls {label} outside [-1, 2**31)")
    return label


def _decoded(sample: dict, limits: ReaderLimits) -> dict:
    """A raw sample → ``{__key__, __url__, <image ext>: uint8 HxWx3, txt: str, cls: int}``, or
    _SampleError naming the reason. Cheap checks first, the image decode last."""
    if "__bad__" in sample:
        raise _SampleError(*sample["__bad__"])
    ext = next((e for e in _IMAGE_EXTS if e in sample), None)
    if ext is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise _SampleError("missing_image", f"no image member ({'/'.join(_IMAGE_EXTS)}); members {members}")
    caption = _checked_caption(sample.get("txt"))
    label = _checked_label(sample.get("cls"))
    try:
        image = decode_rgb8(sample[ext], max_pixels=limits.max_image_pixels)
    except ImageDecodeError as exc:
        raise _SampleError(exc.reason, f"{ext}: {exc}") from None
    return {"__key__": sample["__key__"], "__url__": sample["__url__"], ext: image, "txt": caption, "cls": label}


def _sample_decoder(skips: SkipCounts, limits: ReaderLimits):
    """Pipeline stage: raw samples → decoded ones; a bad sample is counted, logged and dropped."""

    def decode(samples: Iterable[dict]) -> Iterator[dict]:
        for sample in samples:
            try:
                decoded = _decoded(sample, limits)
            except _SampleError as exc:
                skips.skip(exc.reason, sample.get("__url__"), sample.get("__key__"), str(exc))
                continue
            yield decoded

    return decode


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
    return dataset.compose(_sample_decoder(skips, limits))


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
    captions = [_caption_of(s) for s in samples]
    images = np.stack(
        [augment_view(_image_of(s), k, view, seed, image_size, train=train) for s, k in zip(samples, keys)]
    )
    tokens = _to_numpy_tokens(tokenizer(captions))
    if skips is not None:
        skips.note("caption_truncated", _truncated_captions(tokenizer, captions, tokens))
    return Batch(
        keys=keys,
        images=images,
        tokens=tokens,
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
    shards = _shard_list(shards)
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
    shards = _shard_list(shards)
    skips = SkipCounts() if skips is None else skips
    limits = ReaderLimits() if limits is None else limits
    dataset = _webdataset(shards, nodesplitter=None, shardshuffle=False, skips=skips, limits=limits)
    dataset = dataset.compose(_sample_decoder(skips, limits))
    samples = list(itertools.islice(dataset, limit)) if limit is not None else list(dataset)
    if not samples:
        raise NoUsableSamplesError(f"no usable samples in eval shards {shards}; "
                                   f"skipped {skips.skipped or 'none (no samples at all)'}")
    return _make_batch(samples, image_size=image_size, view=0, seed=0, train=False, tokenizer=tokenizer,
                       skips=skips)
