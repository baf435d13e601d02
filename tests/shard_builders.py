"""Small WebDataset shards with known contents, for the shard reader's bad-input tests.

Each sample is ``(key, {ext: bytes})``; members are written in the given order with a fixed
mtime, so tests know the byte offset of every header and every member's data.
"""
from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass

import numpy as np
from PIL import Image


def png(width: int = 6, height: int = 5, mode: str = "RGB", seed: int = 0, fmt: str = "PNG") -> bytes:
    """An encoded image of ``mode`` with random pixels."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def good_sample(i: int, prefix: str = "s") -> tuple[str, dict[str, bytes]]:
    return f"{prefix}{i:04d}", {"png": png(seed=i), "txt": f"caption number {i}".encode(), "cls": str(i % 10).encode()}


@dataclass
class MemberSpan:
    key: str
    ext: str
    header: int  # offset of the 512-byte header
    data: int  # offset of the data
    size: int


def tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> tuple[bytes, list[MemberSpan]]:
    """A POSIX tar of ``samples`` and where each member lies in it."""
    buffer = io.BytesIO()
    spans = []
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 946684800
                header = buffer.tell()
                tar.addfile(info, io.BytesIO(data))
                spans.append(MemberSpan(key, ext, header, header + 512, len(data)))
    return buffer.getvalue(), spans


def write_tar(path, samples: list[tuple[str, dict[str, bytes]]]) -> list[MemberSpan]:
    data, spans = tar_bytes(samples)
    with open(path, "wb") as stream:
        stream.write(data)
    return spans
