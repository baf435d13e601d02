"""The one shard reader: WebDataset tars → checked, decoded samples, bad input skipped and counted.

Training, evaluation, precompute, centroids and audits all read through here. A sample is a dict
``{"__key__", "__url__", "image": uint8 HxWx3, "txt": str, "cls": int (-1: unlabeled)}``. Bad
samples are skipped and counted by reason (SKIP_REASONS) into a SkipCounts passed in; a corrupt or
cut tar keeps the samples before the damage and counts once as ``corrupt_tar``, even where
``tarfile`` would end silently at a bad header or a zeroed block.
"""
from __future__ import annotations

import json

import logging
import lzma
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from teacher_service.shards.images import MAX_IMAGE_PIXELS, ImageDecodeError, decode_rgb8

log = logging.getLogger(__name__)

MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key/extension rule
_META = re.compile(r"__[^/]*__($|/)")  # webdataset skips these members (e.g. __index__)
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "ppm", "bmp", "tif", "tiff", "gif")
TAR_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, zlib.error, lzma.LZMAError)


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


class SampleError(ValueError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason



# ---------------------------------------------------------------------------------------------
# tars → raw samples


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


def member_name(member: tarfile.TarInfo) -> tuple[str, str] | None:
    """(key, lower-case extension) as webdataset groups members, None for members it ignores."""
    if not member.isreg() or _META.match(member.name):
        return None
    match = MEMBER.match(member.name)
    return (match.group(1), match.group(2).lower()) if match else None


def add_member(sample: dict, ext: str, size: int, read: Callable[[], bytes], limits: ReaderLimits) -> None:
    """Read one member into ``sample``; a duplicate or oversized one marks the sample bad, unread.

    ``read`` returns the member's bytes: the streaming reader extracts them from the tar, the
    teacher's shard index (`shards.index`) seeks to them, and both keep a sample by these rules."""
    limit = limits.max_caption_bytes if ext == "txt" else limits.max_member_bytes
    if ext in sample:
        sample.setdefault("__bad__", ("duplicate_member", f"a second {ext!r} member"))
    elif size > limit:
        reason = "caption_too_long" if ext == "txt" else "member_too_large"
        sample.setdefault("__bad__", (reason, f"{ext!r} member of {size} bytes, limit {limit}"))
        sample[ext] = None
    else:
        sample[ext] = read()


def raw_samples(url: str, skips: SkipCounts, limits: ReaderLimits, count_tar_errors: bool) -> Iterator[dict]:
    """One tar's samples, grouped as webdataset groups them (consecutive members sharing a key).

    A tar error ends the shard: the samples already yielded stay, the one in progress is dropped
    (it may be incomplete) and the read counts once as ``corrupt_tar`` (when ``count_tar_errors``).
    """
    current: dict | None = None
    try:
        with open(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*", tarinfo=_HeaderProbe) as tar:
            for member in tar:
                tar.members = []  # streaming: do not keep every header of a large shard
                named = member_name(member)
                if named is None:
                    continue
                if current is not None and named[0] != current["__key__"]:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": named[0], "__url__": url, "__local_path__": url}
                add_member(current, named[1], member.size, lambda: tar.extractfile(member).read(), limits)
            _check_clean_end(tar)
    except TAR_ERRORS as exc:
        if count_tar_errors:
            after = f" at sample {current['__key__']!r}" if current else ""
            skips.skip("corrupt_tar", url, None, f"shard cut short{after}: {type(exc).__name__}: {exc}")
        return
    if current is not None:
        yield current



# ---------------------------------------------------------------------------------------------
# raw samples → checked, decoded samples


def _checked_caption(value: bytes | None) -> str:
    if value is None:
        raise SampleError("missing_caption", "no txt member")
    try:
        caption = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SampleError("undecodable_caption", f"txt is not UTF-8 ({exc})") from None
    if not caption.strip():
        raise SampleError("empty_caption", f"txt holds only whitespace ({len(value)} bytes)")
    return caption


def _checked_label(value: bytes | None) -> int:
    if value is None:
        return -1
    try:
        label = int(value)
    except ValueError:
        raise SampleError("bad_label", f"cls {value[:40]!r} is not an integer") from None
    if not -1 <= label < 2**31:
        raise SampleError("bad_label", f"cls {label} outside [-1, 2**31)")
    return label


def sample_teachers(value: bytes | None) -> tuple[str, ...] | None:
    """The teachers a sample's ``json`` metadata names in its ``teacher`` field (a name or a list of
    names), for runs with several teachers; None when it names none. Metadata is optional and was
    never checked before this field existed: unreadable JSON names no teacher, it is not a bad sample."""
    if not value:
        return None
    try:
        meta = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return None
    choice = meta.get("teacher") if isinstance(meta, dict) else None
    if isinstance(choice, str):
        return (choice,)
    if isinstance(choice, list) and all(isinstance(c, str) for c in choice):
        return tuple(choice)
    return None


def decode_sample(sample: dict, limits: ReaderLimits) -> dict:
    """A raw sample → ``{__key__, __url__, image: uint8 HxWx3, txt: str, cls: int, teachers}``, or
    SampleError naming the reason. Cheap checks first, the image decode last. ``teachers``: the
    teacher names its metadata picks (`sample_teachers`), or None."""
    if "__bad__" in sample:
        raise SampleError(*sample["__bad__"])
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise SampleError("missing_image", f"no image member ({'/'.join(IMAGE_EXTENSIONS)}); members {members}")
    caption = _checked_caption(sample.get("txt"))
    label = _checked_label(sample.get("cls"))
    try:
        image = decode_rgb8(sample[ext], max_pixels=limits.max_image_pixels)
    except ImageDecodeError as exc:
        raise SampleError(exc.reason, f"{ext}: {exc}") from None
    return {"__key__": sample["__key__"], "__url__": sample["__url__"], "image": image, "txt": caption, "cls": label,
            "teachers": sample_teachers(sample.get("json"))}


def decoded_samples(samples: Iterable[dict], skips: SkipCounts, limits: ReaderLimits) -> Iterator[dict]:
    """Raw samples → decoded ones; a bad sample is counted, logged naming shard and key, and dropped."""
    for sample in samples:
        try:
            decoded = decode_sample(sample, limits)
        except SampleError as exc:
            skips.skip(exc.reason, sample.get("__url__"), sample.get("__key__"), str(exc))
            continue
        yield decoded


def read_samples(shards: Iterable[str], *, skips: SkipCounts | None = None,
                 limits: ReaderLimits | None = None) -> Iterator[dict]:
    """Every usable sample of ``shards``, in shard order, checked and decoded; bad ones counted into
    ``skips`` by reason. What precompute, centroids and audits read, and what training reads too."""
    skips = SkipCounts() if skips is None else skips
    limits = ReaderLimits() if limits is None else limits
    for shard in shards:
        yield from decoded_samples(raw_samples(shard, skips, limits, True), skips, limits)

