"""Finding shards and what is known about them: specs → tar paths, ``dataset.json``, sample counts.

Training, evaluation, precompute, audits and the CLI resolve shard specs here, so ``--shards``
means the same thing everywhere.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import tarfile

import braceexpand

from teacher_service.shards.reader import TAR_ERRORS, member_name

log = logging.getLogger(__name__)

DATASET_INFO = "dataset.json"


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



def shard_list(shards) -> list[str]:
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
                named = member_name(member)
                if named and named[0] != last:
                    keys, last = keys + 1, named[0]
    except TAR_ERRORS as exc:  # the reader counts the corruption when it gets there
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

