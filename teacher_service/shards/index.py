"""A shard's sample index: key → the byte spans of its members, so one sample is read without
scanning the tar.

The teacher regenerates views a student names by reference (`serve.references`): rescanning a
shard of thousands of samples for each one would cost more than receiving its pixels. One pass
over the headers of an uncompressed tar (data is seeked past, not read) gives every sample's
spans; a sample is then a few ``pread`` calls, grouped and checked by the same rules as the
streaming reader (`reader.add_member`, `reader.decode_sample`), so it decodes to the same pixels.

Compressed tars cannot be seeked into and are refused (`ShardIndexError`): their callers send
pixels.
"""
from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass

from teacher_service.shards.reader import TAR_ERRORS, ReaderLimits, SampleError, _HeaderProbe, add_member, member_name


class ShardIndexError(ValueError):
    """A shard that cannot be indexed (not an uncompressed tar, unreadable)."""


@dataclass(frozen=True)
class Span:
    """One member of a sample: its extension and where its bytes lie in the tar."""

    ext: str
    offset: int
    size: int


def file_stamp(path: str) -> tuple[int, int, int]:
    """(size, mtime ns, inode): an index built for one stamp is stale once the file changes."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


class ShardIndex:
    """Key → spans of one tar. A key that appears in two separate groups maps to None: the
    streaming reader yields two samples under that key, so which one a caller means is unknown."""

    def __init__(self, path: str, stamp: tuple[int, int, int], samples: dict[str, tuple[Span, ...] | None],
                 error: str | None = None) -> None:
        self.path, self.stamp, self.samples, self.error = path, stamp, samples, error

    def __len__(self) -> int:
        return len(self.samples)

    @classmethod
    def build(cls, path: str) -> ShardIndex:
        """Index ``path`` by one pass over its headers. A tar damaged part way keeps the complete
        samples before the damage (``error`` says where it stopped), as the reader does."""
        stamp = file_stamp(path)
        groups: list[tuple[str, list[Span]]] = []
        error = None
        try:
            with tarfile.open(path, mode="r:", tarinfo=_HeaderProbe) as tar:
                _scan(tar, groups)
                error = getattr(tar, "kd_header_error", None)
        except tarfile.ReadError as exc:
            if not groups:
                raise ShardIndexError(f"not an uncompressed tar ({exc}); by-reference requests need "
                                      "plain .tar shards") from None
            error = f"{type(exc).__name__}: {exc}"
        except TAR_ERRORS as exc:
            error = f"{type(exc).__name__}: {exc}"
        if error and groups:
            groups.pop()  # the sample in progress at the damage may be incomplete
        return cls(path, stamp, _by_key(groups), error)

    def raw_sample(self, key: str, limits: ReaderLimits) -> dict:
        """The raw sample ``key`` as `reader.raw_samples` yields it; KeyError when the shard has no
        such sample, SampleError when the key is ambiguous or the bytes are cut short."""
        spans = self.samples[key]
        if spans is None:
            raise SampleError("duplicate_member", f"key {key!r} names two separate samples in this shard")
        sample = {"__key__": key, "__url__": self.path, "__local_path__": self.path}
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for span in spans:
                add_member(sample, span.ext, span.size, lambda: _read_span(fd, span), limits)
        finally:
            os.close(fd)
        return sample


def _scan(tar: tarfile.TarFile, groups: list[tuple[str, list[Span]]]) -> None:
    """Consecutive members sharing a key → one group, as webdataset groups them."""
    member = tar.next()
    while member is not None:
        named = member_name(member)
        if named is not None:
            if not groups or groups[-1][0] != named[0]:
                groups.append((named[0], []))
            groups[-1][1].append(Span(named[1], member.offset_data, member.size))
        tar.members = []  # headers only: do not keep them all for a large shard
        member = tar.next()


def _by_key(groups: list[tuple[str, list[Span]]]) -> dict[str, tuple[Span, ...] | None]:
    samples: dict[str, tuple[Span, ...] | None] = {}
    for key, spans in groups:
        samples[key] = None if key in samples else tuple(spans)
    return samples


def _read_span(fd: int, span: Span) -> bytes:
    data = os.pread(fd, span.size, span.offset)
    if len(data) != span.size:
        raise SampleError("corrupt_tar", f"{span.ext!r} member cut short: {len(data)} of {span.size} bytes")
    return data
