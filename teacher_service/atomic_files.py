"""Atomic writes: a reader sees the whole new file (or folder) or the old one, never half of either.

Every output a user or another process reads (configs, shards, caches, checkpoints' exports, reports,
plots) goes through here: it is written under a temporary name beside its target
(`<name>.tmp-<pid>-<hex>`, so concurrent writers never share one) and moved into place with
`os.replace`, which is atomic on POSIX within one file system. A failure removes the temporary, and
leaves the target as it was.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

TMP_MARK = ".tmp-"  # temporaries are `<name>.tmp-<pid>-<hex>`: a crash leaves only names with this mark


def temp_name(path: str | os.PathLike) -> Path:
    """A unique temporary path beside `path` (same folder, so the final rename stays on one device)."""
    path = Path(path)
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False, replace_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s content to (a file, or a folder the caller creates);
    on a clean exit it replaces `path`, on an exception it is removed and `path` is left untouched.

    `fsync`: flush a file's bytes to disk before the rename (for data a crash must not lose, such as
    cache rows). `replace_dir`: `path` may be an existing folder, which is swapped out (renamed aside,
    then deleted) after the new one is complete; without it an existing folder is an error, as with
    `os.replace`.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        if fsync and tmp.is_file():
            with open(tmp, "rb+") as stream:
                os.fsync(stream.fileno())
        if replace_dir and path.is_dir() and not path.is_symlink():
            old = temp_name(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def write_atomic(path: str | os.PathLike, data: str | bytes, *, fsync: bool = False,
                 mode: int | None = None) -> Path:
    """Write `data` (text as UTF-8, or bytes) to `path` atomically, creating its parent folders.

    `mode`: the file's permission bits (e.g. 0o600 for owner-only files), set before it is visible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, fsync=fsync) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        if mode is not None:
            os.chmod(tmp, mode)
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
