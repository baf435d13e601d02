"""Files only their owner can read: embedding caches, checkpoints and tokens on a shared machine.

Teacher embeddings and student weights are the expensive output of a run; on a machine several
users share, the default umask (022) would leave them readable by all. Directories this project
creates are 0700 and files 0600; processes that write through other libraries (Ray Train copying
a checkpoint, pyarrow writing Parquet) run with umask 077 (`private_umask`).
"""
from __future__ import annotations

import os
import stat

DIR_MODE = 0o700
FILE_MODE = 0o600
UMASK = 0o077


def make_private_dir(path: str) -> str:
    """`os.makedirs(path)` with mode 0700 for every directory it creates (existing ones are left alone)."""
    path = os.path.abspath(path)
    missing = []
    head = path
    while head and not os.path.isdir(head):
        missing.append(head)
        head = os.path.dirname(head)
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    for created in missing:  # makedirs' mode is masked by the umask: set it explicitly
        os.chmod(created, DIR_MODE)
    return path


def make_private(path: str) -> None:
    """Restrict an existing file to its owner (0600)."""
    os.chmod(path, FILE_MODE)


def check_owner_only(path: str, field: str) -> os.stat_result:
    """Refuse (ValueError naming `field`) a missing file or one that group or others may access.

    For secrets (bearer tokens, TLS private keys): anyone else on the machine who can read one can
    impersonate the teacher or its callers, so a shared file is an error, not a warning.
    """
    try:
        info = os.stat(path)
    except OSError as e:
        raise ValueError(f"{field} {path!r}: {e.strerror}") from e
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"{field} {path!r} is readable by other users (mode {stat.filemode(info.st_mode)}); "
                         f"chmod 600 it")
    return info


def private_umask() -> int:
    """Make this process create owner-only files from now on (umask 077); returns the old umask."""
    return os.umask(UMASK)


WRITE_ROOTS_ENV = "KD_WRITE_ROOTS"


def write_roots(configured: list[str] | None = None) -> list[str]:
    """The directories this process may write under: `configured` plus $KD_WRITE_ROOTS (os.pathsep
    separated), resolved; empty means no restriction."""
    roots = list(configured or []) + [r for r in os.environ.get(WRITE_ROOTS_ENV, "").split(os.pathsep) if r]
    return [os.path.realpath(os.path.expanduser(r)) for r in roots]


def check_under_roots(path: str, roots: list[str], what: str) -> None:
    """Refuse (ValueError naming `what`, the path and the roots) a local path outside every root.

    The path is resolved first (symlinks, `..`), so `roots/../elsewhere` or a link out of a root is
    caught. Cloud URIs (`s3://...`) are not local paths and are left to the bucket's permissions.
    """
    if not roots or not path or "://" in path:
        return
    resolved = os.path.realpath(os.path.expanduser(path))
    if not any(resolved == root or resolved.startswith(root.rstrip(os.sep) + os.sep) for root in roots):
        raise ValueError(f"{what} {path!r} (resolved {resolved!r}) is outside the write roots {roots} "
                         f"(TrainConfig.write_roots / ${WRITE_ROOTS_ENV})")
