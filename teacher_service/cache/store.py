"""The teacher embedding cache: Parquet files of ``(key, view) → embeddings``, one set per teacher.

A cache root holds any number of teachers side by side, one directory per teacher fingerprint::

    CACHE/teachers/<fingerprint>/train-000000.parquet      kd precompute (one per input shard)
    CACHE/teachers/<fingerprint>/append-<run>-<rank>-<uuid>.parquet   hybrid training
    CACHE/teachers/<fingerprint>/compacted-<uuid>.parquet  kd cache compact
    CACHE/teachers/<fingerprint>/centroids.parquet         kd precompute --class-centroids

A teacher's directory is exactly what a cache was before it could hold several teachers, so a
root written that way (row files directly in ``CACHE``) is still one teacher's cache: it is read,
appended to and compacted in place, and refuses any other teacher. :func:`teacher_dir` maps (root,
teacher) to the directory of that teacher's rows; every reader and writer goes through it.

Every row file holds rows ``(key, view, image_emb, text_emb, image_digest, text_digest)``: the
embeddings are columns in the cache's answer dtype (`answer_codec`): ``fixed_size_list<float16>[D]``
(fp16, the default and the only dtype before there were others), or each row's raw little-endian
bytes in a ``fixed_size_binary`` column: uint16 bfloat16 bit patterns (bf16, 2D bytes) or int8
values with a float32 scale per row in ``image_scale`` / ``text_scale`` (int8, D bytes). Parquet
has no 8- or 16-bit integer type: int8 and uint16 lists would be stored as 4-byte INT32, twice
an fp16 row;
the digests are 64-bit hashes of the exact uint8 view and fitted token row the teacher embedded, so
a reader can prove that a cached row belongs to the pixels a student holds now. The Parquet file
metadata (key ``kd_cache``) holds the teacher fingerprint, its info (preprocessing, context length,
logit scale), the dtype (``float16``, ``bfloat16`` or ``int8``) and the view recipe; a teacher's
directory holds that teacher only, in one dtype, so the effective key is ``(fingerprint, key, view)``.
Readers decode any dtype: fp16 rows come back as the float16 arrays they always did, others as float32.

File kinds are told apart by name: shard files from ``kd precompute``, ``append-*`` files (unique
per writer, so concurrent appenders never touch the same file), ``compacted-*`` from
:func:`compact`, and ``centroids.parquet`` (Embed-KD class centroids, not rows). Every write is a
temporary file moved into place (``teacher_service.atomic_files``), so readers see whole files or
nothing; a truncated or corrupt file raises :class:`CacheCorruptError` naming it (pages carry
checksums). Readers dedupe on ``(key, view)``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import glob
import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from teacher_service.atomic_files import TMP_MARK, atomic_path
from teacher_service.contract.answer_codec import DEFAULT_ANSWER_DTYPE, EncodedRows, check_answer_dtype, encode_rows
from teacher_service.private_files import make_private, make_private_dir
from teacher_service.contract.augment import recipe_differences

FORMAT = "kd-embedding-cache"
FORMAT_VERSION = 1
META_KEY = b"kd_cache"
# the answer dtype of a file's rows → the name its metadata records (fp16 files record what they always did)
STORED_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "int8": "int8"}
_RAW_DTYPES = {"bf16": np.dtype("<u2"), "int8": np.dtype(np.int8)}  # rows stored as raw little-endian bytes
SCALE_COLUMNS = {"image_emb": "image_scale", "text_emb": "text_scale"}  # int8 rows: a float32 scale per row
CENTROIDS_FILE = "centroids.parquet"
APPEND_PREFIX = "append-"
COMPACTED_PREFIX = "compacted-"
LOCK_FILE = ".compact.lock"
TEACHERS_DIR = "teachers"  # CACHE/teachers/<fingerprint>/: one teacher's files
ROW_COLUMNS = ("key", "view", "image_emb", "text_emb", "image_digest", "text_digest")
INDEX_COLUMNS = ("key", "view", "image_digest", "text_digest")
TEACHER_INFO_FIELDS = ("fingerprint", "model", "embed_dim", "image_size", "preprocess", "context_length",
                       "vocab_size", "logit_scale", "logit_bias", "precision")
_ROW_GROUP_ROWS = 8192
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


class CacheError(RuntimeError):
    """Base class of embedding cache errors."""


class CacheCorruptError(CacheError):
    """A cache file cannot be read (truncated, corrupt, not a cache file); the message names it."""


class CacheMismatchError(CacheError, ValueError):
    """A cache built by another teacher, preprocessing or view recipe than the reader expects."""


class CacheMissError(CacheError, LookupError):
    """A read-only cache lacks a requested (key, view)."""


class CacheAmbiguousError(CacheError, ValueError):
    """A cache root holds several teachers and the reader did not say which one it wants."""


# ---------------------------------------------------------------------------------------------
# metadata


def make_meta(teacher_info: dict, recipe: dict, *, kind: str, source: Optional[str] = None,
              views: Optional[int] = None, teacher_config: Optional[dict] = None,
              app_name: Optional[str] = None, writer: Optional[dict] = None,
              answer_dtype: str = DEFAULT_ANSWER_DTYPE) -> dict:
    """The ``kd_cache`` metadata of one file: who computed it, from what, with which recipe, and the
    dtype its rows are stored in (``answer_dtype``)."""
    teacher = {k: teacher_info.get(k) for k in TEACHER_INFO_FIELDS}
    if not teacher["fingerprint"] or not teacher["embed_dim"]:
        raise ValueError(f"teacher_info needs 'fingerprint' and 'embed_dim', got {sorted(teacher_info)}")
    check_answer_dtype(answer_dtype)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
        "fingerprint": teacher["fingerprint"], "embed_dim": int(teacher["embed_dim"]),
        "dtype": STORED_DTYPES[answer_dtype],
        "teacher": teacher, "recipe": dict(recipe), "source": source, "views": views,
        "teacher_config": teacher_config, "app_name": app_name,
        "writer": {"host": socket.gethostname(), "pid": os.getpid(), **(writer or {})},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def answer_dtype_of(meta: dict, path: str = "embedding cache file") -> str:
    """The answer dtype (fp16, bf16, int8) of the rows a file's metadata describes."""
    for name, stored in STORED_DTYPES.items():
        if meta.get("dtype") == stored:
            return name
    raise CacheCorruptError(f"{path}: rows stored as {meta.get('dtype')!r}, expected one of "
                            f"{sorted(STORED_DTYPES.values())}")


def check_compatible(meta: dict, *, path: str, fingerprint: Optional[str] = None,
                     preprocess: Optional[dict] = None, recipe: Optional[dict] = None,
                     expected_from: str = "the teacher", answer_dtype: Optional[str] = None) -> None:
    """Raise CacheMismatchError when ``meta`` (of file ``path``) differs from the expectations given."""
    cached = meta.get("fingerprint")
    if answer_dtype is not None and answer_dtype_of(meta, path) != answer_dtype:
        raise CacheMismatchError(
            f"embedding cache file {path} stores its rows in {answer_dtype_of(meta, path)}, but {expected_from} "
            f"writes {answer_dtype}: a teacher's rows in one cache share one dtype. Use another cache "
            f"directory for {answer_dtype} rows, or ask for {answer_dtype_of(meta, path)} (--answer-dtype, "
            "teacher.answer_dtype)")
    if fingerprint is not None and cached != fingerprint:
        raise CacheMismatchError(
            f"embedding cache file {path} was computed by teacher fingerprint {cached!r}, but "
            f"{expected_from} has fingerprint {fingerprint!r}: refusing to mix teachers. Use another "
            f"cache directory, or recompute it with `kd precompute` for this teacher.")
    cached_pre = (meta.get("teacher") or {}).get("preprocess")
    if preprocess is not None and cached_pre is not None and cached_pre != preprocess:
        raise CacheMismatchError(
            f"embedding cache file {path} (teacher fingerprint {cached!r}) used preprocessing "
            f"{cached_pre}, but {expected_from} (fingerprint {fingerprint!r}) uses {preprocess}")
    if recipe is not None:
        diffs = recipe_differences(meta.get("recipe") or {}, recipe)
        if diffs:
            raise CacheMismatchError(
                f"embedding cache file {path} (teacher fingerprint {cached!r}) holds views made with "
                f"another recipe than {expected_from} (fingerprint {fingerprint or cached!r}): "
                f"{'; '.join(diffs)} (cache vs expected)")


def _meta_of_schema(schema: pa.Schema, path: str) -> dict:
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise CacheCorruptError(f"{path} is not an embedding cache file (no {META_KEY.decode()} metadata)")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise CacheCorruptError(f"{path}: unreadable {META_KEY.decode()} metadata ({exc})") from exc
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CacheCorruptError(f"{path}: format {meta.get('format')!r} v{meta.get('format_version')!r}, "
                                f"expected {FORMAT!r} v{FORMAT_VERSION}")
    return meta


def read_meta(path: str) -> dict:
    """The ``kd_cache`` metadata of a cache file (reads only the footer)."""
    try:
        schema = pq.read_schema(path)
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise CacheCorruptError(f"embedding cache file {path} is truncated or corrupt: {exc}") from exc
    return _meta_of_schema(schema, path)


# ---------------------------------------------------------------------------------------------
# row files


def embedding_columns(answer_dtype: str) -> tuple[str, ...]:
    """The columns that hold a file's embeddings: the two vectors, and their scales for int8."""
    return ("image_emb", "text_emb") + (tuple(SCALE_COLUMNS.values()) if answer_dtype == "int8" else ())


def vector_type(answer_dtype: str, embed_dim: int) -> pa.DataType:
    """The Arrow type of an embedding column: float16 lists for fp16, a row's raw bytes otherwise."""
    if answer_dtype == DEFAULT_ANSWER_DTYPE:
        return pa.list_(pa.float16(), int(embed_dim))
    return pa.binary(int(embed_dim) * _RAW_DTYPES[answer_dtype].itemsize)


def row_schema(embed_dim: int, meta: dict) -> pa.Schema:
    dtype = answer_dtype_of(meta)
    vector = vector_type(dtype, embed_dim)
    scales = [pa.field(c, pa.float32(), nullable=False) for c in SCALE_COLUMNS.values()] if dtype == "int8" else []
    return pa.schema([pa.field("key", pa.string(), nullable=False),
                      pa.field("view", pa.int32(), nullable=False),
                      pa.field("image_emb", vector, nullable=False),
                      pa.field("text_emb", vector, nullable=False),
                      pa.field("image_digest", pa.uint64(), nullable=False),
                      pa.field("text_digest", pa.uint64(), nullable=False), *scales],
                     metadata={META_KEY: json.dumps(meta, sort_keys=True).encode()})


def encoded(rows: np.ndarray | EncodedRows, answer_dtype: str) -> EncodedRows:
    """``rows`` in ``answer_dtype``: EncodedRows already in it as they are, others (arrays, rows in
    another dtype) encoded from their values."""
    if isinstance(rows, EncodedRows):
        if rows.dtype == answer_dtype:
            return rows
        rows = rows.decode()
    return encode_rows(np.asarray(rows), answer_dtype)


def _vectors(rows: np.ndarray | EncodedRows, dim: int, name: str, answer_dtype: str) -> list[pa.Array]:
    """The column of ``rows`` in ``answer_dtype``, and for int8 its scale column."""
    rows = encoded(rows, answer_dtype)
    if rows.dim != dim:
        raise ValueError(f"{name}: expected [n, {dim}] embeddings, got shape {rows.values.shape}")
    if answer_dtype == DEFAULT_ANSWER_DTYPE:
        column = pa.FixedSizeListArray.from_arrays(pa.array(rows.values.reshape(-1), type=pa.float16()), dim)
    else:
        raw = np.ascontiguousarray(rows.values, dtype=_RAW_DTYPES[answer_dtype])
        column = pa.Array.from_buffers(vector_type(answer_dtype, dim), len(raw), [None, pa.py_buffer(raw.tobytes())])
    return [column] if rows.scales is None else [column, pa.array(rows.scales, type=pa.float32())]


def rows_table(meta: dict, keys: list[str], views, image_emb: np.ndarray | EncodedRows,
               text_emb: np.ndarray | EncodedRows, image_digest, text_digest) -> pa.Table:
    """A row table in the cache schema, embeddings in ``meta``'s dtype (encoded here from float rows,
    or re-encoded from rows in another dtype), sorted by (key, view) so files are deterministic."""
    dim = int(meta["embed_dim"])
    dtype = answer_dtype_of(meta)
    n = len(keys)
    views = np.asarray(views, dtype=np.int32).reshape(-1)
    if views.size == 1 and n != 1:
        views = np.full(n, int(views[0]), dtype=np.int32)
    image, text = _vectors(image_emb, dim, "image_emb", dtype), _vectors(text_emb, dim, "text_emb", dtype)
    columns = [pa.array(list(keys), type=pa.string()), pa.array(views, type=pa.int32()), image[0], text[0],
               pa.array(np.asarray(image_digest, dtype=np.uint64)),
               pa.array(np.asarray(text_digest, dtype=np.uint64)), *image[1:], *text[1:]]
    lengths = {len(c) for c in columns}
    if lengths != {n}:
        raise ValueError(f"rows_table: columns of unequal length {sorted(lengths)} for {n} keys")
    table = pa.Table.from_arrays(columns, schema=row_schema(dim, meta))
    return table.sort_by([("key", "ascending"), ("view", "ascending")])


def write_table_atomic(table: pa.Table, path: str) -> str:
    """Write ``table`` to ``path`` atomically and durably (`atomic_path` with fsync: rows a crash
    must not lose), owner-only before it is visible.

    Embeddings are stored uncompressed without dictionaries (fp16 noise does not compress) and
    every page carries a CRC so a flipped byte is caught on read.
    """
    with atomic_path(path, fsync=True) as tmp:
        pq.write_table(table, str(tmp), compression="none", use_dictionary=False, write_page_checksum=True,
                       row_group_size=_ROW_GROUP_ROWS)
        make_private(tmp)  # embeddings are a run's expensive output: owner-only on a shared machine
    return path


def row_cost_s(meta: dict, rows: int) -> Optional[float]:
    """Teacher seconds per row of a file whose writer recorded its teacher time (``writer.teacher_s``,
    `kd precompute`), else None."""
    spent = (meta.get("writer") or {}).get("teacher_s")
    return float(spent) / rows if isinstance(spent, (int, float)) and rows > 0 else None


def read_rows(path: str, columns: Optional[Iterable[str]] = None) -> tuple[pa.Table, dict]:
    """(table, meta) of one row file, checksums verified; CacheCorruptError names a bad file."""
    meta = read_meta(path)
    try:
        table = pq.read_table(path, columns=list(columns) if columns else None,
                              page_checksum_verification=True)
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise CacheCorruptError(f"embedding cache file {path} is truncated or corrupt: {exc}") from exc
    dtype = answer_dtype_of(meta, path)
    missing = [c for c in (columns or ROW_COLUMNS + embedding_columns(dtype)[2:]) if c not in table.column_names]
    if missing:
        raise CacheCorruptError(f"embedding cache file {path} lacks columns {missing}")
    for name in ("image_emb", "text_emb"):
        if name in table.column_names:
            kind = table.schema.field(name).type
            if kind != vector_type(dtype, meta["embed_dim"]):
                raise CacheCorruptError(f"embedding cache file {path}: column {name} is {kind}, expected "
                                        f"{vector_type(dtype, meta['embed_dim'])} ({dtype} rows)")
    return table, meta


def column_rows(table: pa.Table, name: str) -> EncodedRows:
    """A ``fixed_size_list<T>[D]`` column (``name``: image_emb or text_emb) of a row table (read
    from a file, or made by :func:`rows_table`) as EncodedRows ``[n, D]`` in the table's dtype, with
    its scales for int8."""
    dtype = answer_dtype_of(_meta_of_schema(table.schema, "row table"))
    column = table.column(name).combine_chunks()
    if dtype == DEFAULT_ANSWER_DTYPE:
        values = column.values.to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size)
    else:
        width = column.type.byte_width
        raw = np.frombuffer(column.buffers()[1], np.uint8)[column.offset * width:(column.offset + len(column)) * width]
        values = raw.view(_RAW_DTYPES[dtype]).astype(EncodedRows.stored_dtype(dtype)).reshape(len(column), -1)
    scales = table.column(SCALE_COLUMNS[name]).to_numpy() if dtype == "int8" else None
    return EncodedRows(dtype, values, scales)


def column_matrix(table: pa.Table, name: str) -> np.ndarray:
    """The embeddings of a column as an array ``[n, D]``: float16 as stored from an fp16 table,
    float32 decoded from bf16 and int8 ones."""
    return _decoded(column_rows(table, name))


def row_files(path: str) -> list[str]:
    """Row files of a cache: shard files, then compacted, then appends (earlier ones win on duplicates)."""
    names = [os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(path), "*.parquet"))]

    def order(name: str) -> tuple[int, str]:
        return (2 if name.startswith(APPEND_PREFIX) else 1 if name.startswith(COMPACTED_PREFIX) else 0, name)

    return [os.path.join(path, n) for n in sorted(names, key=order) if n != CENTROIDS_FILE]


def _safe(text: str) -> str:
    return _SAFE_NAME.sub("_", str(text))[:64] or "x"


# ---------------------------------------------------------------------------------------------
# several teachers in one root


def _own_meta(path: str) -> Optional[dict]:
    """The metadata of the first readable file lying directly in ``path`` (rows first, else centroids);
    None: none. A corrupt file is passed over here: the reader or precompute reports (or redoes) it."""
    for f in row_files(path) + [os.path.join(path, CENTROIDS_FILE)]:
        try:
            return read_meta(f)
        except (FileNotFoundError, CacheCorruptError):  # compacted away meanwhile, no centroids, or corrupt
            continue
    return None


def stored_answer_dtype(path: str) -> Optional[str]:
    """The dtype of the rows in the teacher directory ``path`` (its first readable row file); None
    when it has none yet."""
    for f in row_files(path):
        try:
            return answer_dtype_of(read_meta(f), f)
        except (FileNotFoundError, CacheCorruptError):  # compacted away meanwhile, or corrupt (redone)
            continue
    return None


def cache_teachers(root: str) -> dict[str, str]:
    """fingerprint → directory of each teacher the cache ``root`` holds, in fingerprint order.

    A root with files directly in it (the one-teacher layout) holds that one teacher, in itself."""
    root = os.path.abspath(os.fspath(root))
    own = _own_meta(root) if os.path.isdir(root) else None
    if own is not None:
        return {own["fingerprint"]: root}
    base = os.path.join(root, TEACHERS_DIR)
    names = sorted(os.listdir(base)) if os.path.isdir(base) else []
    return {n: os.path.join(base, n) for n in names if os.path.isdir(os.path.join(base, n))}


def _model_of(path: str) -> Optional[str]:
    """The model name of the teacher whose files lie in ``path`` (None: no file yet)."""
    return ((_own_meta(path) or {}).get("teacher") or {}).get("model")


def describe_teachers(teachers: dict[str, str]) -> str:
    """``fp (model), ...`` for error messages."""
    return ", ".join(f"{fp} ({_model_of(path) or 'no rows yet'})" for fp, path in teachers.items()) or "no teacher"


def teacher_dir(root: str, teacher: Optional[str] = None, *, create: bool = False) -> str:
    """The directory of one teacher's rows in the cache ``root`` (see the module docstring).

    ``teacher`` is a fingerprint, or a model name that only one teacher of the root has; None
    means the root's only teacher. With ``create``, a fingerprint the root lacks gets its own
    ``teachers/<fingerprint>`` directory (made), unless the root is a one-teacher cache of the old
    layout. A root holding no teacher, without ``create``, is returned as it is, so the reader
    reports it missing or empty. Several teachers and none asked: CacheAmbiguousError listing
    them; an absent teacher: CacheMismatchError naming it and those present.
    """
    root = os.path.abspath(os.fspath(root))
    teachers = cache_teachers(root)
    if teacher in teachers:
        return teachers[teacher]
    if teacher is None:
        if len(teachers) > 1:
            raise CacheAmbiguousError(
                f"embedding cache {root} holds {len(teachers)} teachers: {describe_teachers(teachers)}; "
                "say which one (a fingerprint or model name: teacher.cache_teacher in a run config)")
        return next(iter(teachers.values()), root)
    by_model = {fp: path for fp, path in teachers.items() if _model_of(path) == teacher}
    if len(by_model) == 1:
        return next(iter(by_model.values()))
    if len(by_model) > 1:
        raise CacheAmbiguousError(f"embedding cache {root} holds {len(by_model)} teachers of model {teacher!r}: "
                                  f"{describe_teachers(by_model)}; name one by fingerprint")
    if create and root not in teachers.values():
        if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", teacher):
            raise ValueError(f"teacher fingerprint {teacher!r} cannot name a cache directory")
        return make_private_dir(os.path.join(root, TEACHERS_DIR, teacher))
    old = " (a one-teacher cache)" if root in teachers.values() else ""
    raise CacheMismatchError(
        f"embedding cache {root}{old} holds teacher fingerprint(s) {describe_teachers(teachers)}, not the teacher "
        f"asked for ({teacher!r}, a fingerprint or model name): refusing to mix teachers. Use another cache "
        "directory, or compute this teacher's rows with `kd precompute`")


# ---------------------------------------------------------------------------------------------
# the reader


@dataclass
class _Segment:
    """One row file (or in-memory rows): digests always loaded, embeddings loaded on first use and
    kept encoded (an int8 cache holds about half an fp16 one's bytes in memory too)."""

    path: Optional[str]
    image_digest: np.ndarray
    text_digest: np.ndarray
    image_emb: Optional[EncodedRows] = None
    text_emb: Optional[EncodedRows] = None
    row_cost_s: Optional[float] = None  # teacher seconds per row, where the file records them (`row_cost_s`)


class EmbeddingCache:
    """A read view of a cache directory: an in-memory ``(key, view) → row`` index over every file.

    Opening reads only the small columns (key, view, digests) of each file; a file's embeddings
    are read on the first hit in it, so a rank that trains on a few shards loads only theirs.
    Rows appended by this process (:meth:`add`) are indexed at once; :meth:`refresh` picks up
    files other writers added since. Duplicated ``(key, view)`` rows across files are served once
    (the first file wins) and counted in ``duplicates``; duplicates whose digests differ mean two
    different samples share a key, and are refused.
    """

    def __init__(self, path: str, meta: dict) -> None:
        self.path = path
        self.meta = meta
        self.index: dict[tuple[str, int], tuple[int, int]] = {}
        self.segments: list[_Segment] = []
        self.files: list[str] = []
        self._seen: set[str] = set()
        self.duplicates = 0
        self._lock = threading.Lock()
        self._expect: dict = {}

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str, *, teacher_info: Optional[dict] = None, recipe: Optional[dict] = None,
             create: bool = False, teacher: Optional[str] = None, answer_dtype: Optional[str] = None,
             start_dtype: Optional[str] = None) -> "EmbeddingCache":
        """Open (or with ``create`` start) one teacher's rows in the cache ``path``, checked against
        ``teacher_info`` (fingerprint, preprocess: the live teacher) and ``recipe`` (the reader's views).

        Which teacher of a root holding several: ``teacher`` (a fingerprint or model name), else
        ``teacher_info``'s fingerprint, else the root's only one (:func:`teacher_dir`).
        ``answer_dtype``: the dtype the rows must be in (a cache with rows in another is refused,
        CacheMismatchError) and a new cache stores them in; None: whatever they are stored in, and
        for a new cache ``start_dtype`` (default fp16)."""
        path = teacher_dir(path, teacher or (teacher_info or {}).get("fingerprint"), create=create)
        if not os.path.isdir(path):
            if not create:
                raise FileNotFoundError(f"embedding cache {path} does not exist: run `kd precompute` first")
            make_private_dir(path)
        files = row_files(path)
        if not files and not create:
            raise FileNotFoundError(f"embedding cache {path} holds no row files: run `kd precompute` first")
        if not files and teacher_info is None:
            raise ValueError(f"embedding cache {path} is empty and no teacher_info was given to start it")
        expect = {"fingerprint": (teacher_info or {}).get("fingerprint"),
                  "preprocess": (teacher_info or {}).get("preprocess"), "recipe": recipe, "answer_dtype": answer_dtype}
        first = cls._first_meta(files)
        if first is not None:
            check_compatible(first[1], path=first[0], **expect)
        base_recipe = recipe or (first[1]["recipe"] if first else {})
        meta = first[1] if first else make_meta(teacher_info, base_recipe, kind="append",
                                                answer_dtype=answer_dtype or start_dtype or DEFAULT_ANSWER_DTYPE)
        cache = cls(path, {**meta, "recipe": {**meta.get("recipe", {}), **(recipe or {})}})
        cache._expect = {"fingerprint": meta["fingerprint"], "preprocess": meta["teacher"].get("preprocess"),
                         "recipe": recipe or meta.get("recipe"), "answer_dtype": answer_dtype_of(meta, path)}
        cache.refresh()
        return cache

    @staticmethod
    def _first_meta(files: list[str]) -> Optional[tuple[str, dict]]:
        for f in files:
            try:
                return f, read_meta(f)
            except FileNotFoundError:  # removed by a concurrent compaction
                continue
        return None

    def refresh(self) -> int:
        """Index row files written since this cache was opened (or last refreshed); returns how many.

        A file that vanishes between listing and reading was merged by :func:`compact`; the
        directory is listed again so the compacted file that replaced it is picked up.
        """
        added = 0
        for _ in range(5):
            vanished = False
            for f in row_files(self.path):
                if f in self._seen:
                    continue
                try:
                    table, meta = read_rows(f, INDEX_COLUMNS)
                except FileNotFoundError:
                    vanished = True
                    continue
                check_compatible(meta, path=f, expected_from=f"the rest of cache {self.path}", **self._expect)
                self._index_table(table, f)
                self.segments[-1].row_cost_s = row_cost_s(meta, table.num_rows)
                self.files.append(f)
                self._seen.add(f)
                added += 1
            if not vanished:
                break
        return added

    def _index_table(self, table: pa.Table, path: Optional[str], image_emb=None, text_emb=None) -> np.ndarray:
        """Index one segment's rows; returns the row numbers that were new (not duplicates)."""
        seg = len(self.segments)
        new: list[int] = []
        idig = table.column("image_digest").to_numpy()
        tdig = table.column("text_digest").to_numpy()
        self.segments.append(_Segment(path, idig, tdig, image_emb, text_emb))
        index = self.index
        for row, (key, view) in enumerate(zip(table.column("key").to_pylist(),
                                              table.column("view").to_pylist())):
            found = index.get((key, view))
            if found is None:
                index[(key, view)] = (seg, row)
                new.append(row)
                continue
            self.duplicates += 1
            other = self.segments[found[0]]
            if other.image_digest[found[1]] != idig[row] or other.text_digest[found[1]] != tdig[row]:
                raise CacheMismatchError(
                    f"embedding cache {self.path}: sample {key!r} view {view} appears in {other.path or 'memory'} "
                    f"and {path or 'memory'} with different pixels/tokens: two samples share a key "
                    f"(sample keys must be unique across the dataset)")
        return np.asarray(new, dtype=np.int64)

    # -- properties ---------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def embed_dim(self) -> int:
        return int(self.meta["embed_dim"])

    @property
    def recipe(self) -> dict:
        return dict(self.meta.get("recipe") or {})

    @property
    def answer_dtype(self) -> str:
        """The dtype the rows are stored in (fp16, bf16, int8): every file of one cache shares it."""
        return answer_dtype_of(self.meta, self.path)

    @property
    def teacher_info(self) -> dict:
        """The teacher's info as a Serve app would give it (fingerprint, embed_dim, scales, ...)."""
        return {**self.meta["teacher"], "source": "cache", "cache_path": self.path}

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, item: tuple[str, int]) -> bool:
        return (item[0], int(item[1])) in self.index

    def views_of(self, key: str) -> list[int]:
        """The view ids cached for ``key`` (a scan: for error messages)."""
        return sorted(v for k, v in self.index if k == key)

    def teacher_s(self, seg: int) -> Optional[float]:
        """Teacher seconds one row of segment ``seg`` cost to compute: its file's record
        (:func:`row_cost_s`), 0.0 for rows this process added (their computation was counted where
        it happened), None for a file that records none (appended rows, caches written before)."""
        segment = self.segments[seg]
        return 0.0 if segment.path is None else segment.row_cost_s

    # -- reading ------------------------------------------------------------------------------
    def locate(self, keys: list[str], view: int) -> list[Optional[tuple[int, int]]]:
        """(segment, row) of each ``(key, view)``, None for a miss."""
        view = int(view)
        return [self.index.get((k, view)) for k in keys]

    def fetch(self, locs: list[tuple[int, int]]) -> dict[str, np.ndarray]:
        """Rows at ``locs``: image_emb / text_emb ``[n, D]`` (float16 from an fp16 cache, as stored;
        float32 decoded from bf16 and int8) and both uint64 digests."""
        n = len(locs)
        floats = np.float16 if self.answer_dtype == DEFAULT_ANSWER_DTYPE else np.float32
        out = {"image_emb": np.empty((n, self.embed_dim), floats),
               "text_emb": np.empty((n, self.embed_dim), floats),
               "image_digest": np.empty(n, np.uint64), "text_digest": np.empty(n, np.uint64)}
        by_segment: dict[int, list[int]] = {}
        for i, (seg, _) in enumerate(locs):
            by_segment.setdefault(seg, []).append(i)
        for seg, positions in by_segment.items():
            segment = self._loaded(seg)
            rows = np.fromiter((locs[i][1] for i in positions), dtype=np.int64, count=len(positions))
            out["image_emb"][positions] = _decoded(segment.image_emb.take(rows))
            out["text_emb"][positions] = _decoded(segment.text_emb.take(rows))
            out["image_digest"][positions] = segment.image_digest[rows]
            out["text_digest"][positions] = segment.text_digest[rows]
        return out

    def _loaded(self, seg: int) -> _Segment:
        segment = self.segments[seg]
        if segment.image_emb is None:
            with self._lock:
                if segment.image_emb is None:
                    try:
                        table, _ = read_rows(segment.path, embedding_columns(self.answer_dtype))
                    except FileNotFoundError as exc:
                        raise CacheError(f"embedding cache file {segment.path} vanished after it was indexed "
                                         f"(compacted while this process read the cache?): reopen the cache"
                                         ) from exc
                    segment.text_emb = column_rows(table, "text_emb")
                    segment.image_emb = column_rows(table, "image_emb")
        return segment

    def add(self, keys: list[str], view: int, image_emb: np.ndarray, text_emb: np.ndarray,
            image_digest: np.ndarray, text_digest: np.ndarray) -> list[bool]:
        """Index rows this process computed (not yet on disk), kept in the cache's dtype as an
        appender writes them; returns which were new."""
        seen: set[str] = set()
        fresh = []
        for k in keys:  # new to the index, and the first of its kind within this call
            fresh.append((k, int(view)) not in self.index and k not in seen)
            seen.add(k)
        if not any(fresh):
            return fresh
        sel = np.flatnonzero(fresh)
        table = pa.table({"key": pa.array([keys[i] for i in sel], pa.string()),
                          "view": pa.array(np.full(sel.size, int(view), np.int32)),
                          "image_digest": pa.array(np.asarray(image_digest, np.uint64)[sel]),
                          "text_digest": pa.array(np.asarray(text_digest, np.uint64)[sel])})
        self._index_table(table, None, encoded(np.asarray(image_emb)[sel], self.answer_dtype),
                          encoded(np.asarray(text_emb)[sel], self.answer_dtype))
        return fresh


def _decoded(rows: EncodedRows) -> np.ndarray:
    """fp16 rows as the float16 they are stored in; others decoded to float32."""
    return rows.values if rows.dtype == DEFAULT_ANSWER_DTYPE else rows.decode()

# ---------------------------------------------------------------------------------------------
# writers


class CacheAppender:
    """Buffers rows computed on a miss and writes them as a new ``append-<run>-<rank>-<uuid>.parquet``.

    Each flush writes a brand-new file under a unique name (atomically), so any number of runs
    and ranks can append to one cache at once without locks, torn files or lost rows.
    """

    def __init__(self, path: str, meta: dict, *, run: str = "run", rank: int = 0) -> None:
        self.path = os.path.abspath(path)
        self.meta = {**meta, "kind": "append", "source": None,
                     "writer": {**(meta.get("writer") or {}), "run": run, "rank": rank,
                                "host": socket.gethostname(), "pid": os.getpid()}}
        self.run, self.rank = run, rank
        self._parts: list[tuple] = []
        self.rows_written = 0
        self.files_written: list[str] = []

    @property
    def pending(self) -> int:
        return sum(len(p[0]) for p in self._parts)

    def add(self, keys: list[str], view: int, image_emb: np.ndarray, text_emb: np.ndarray,
            image_digest: np.ndarray, text_digest: np.ndarray) -> None:
        if len(keys):
            self._parts.append((list(keys), np.full(len(keys), int(view), np.int32), np.asarray(image_emb),
                                np.asarray(text_emb), np.asarray(image_digest), np.asarray(text_digest)))

    def flush(self) -> Optional[str]:
        """Write the buffered rows to a new file; returns its path (None when nothing was buffered)."""
        if not self._parts:
            return None
        keys = [k for p in self._parts for k in p[0]]
        cols = [np.concatenate([p[i] for p in self._parts]) for i in range(1, 6)]
        table = rows_table(self.meta, keys, *cols)
        name = f"{APPEND_PREFIX}{_safe(self.run)}-{int(self.rank)}-{uuid.uuid4().hex}.parquet"
        out = write_table_atomic(table, os.path.join(self.path, name))
        self._parts.clear()
        self.rows_written += len(keys)
        self.files_written.append(out)
        return out


@dataclass
class CompactionReport:
    merged_files: list[str]
    rows_written: int
    duplicates_dropped: int
    out_path: Optional[str]
    stale_tmp_removed: list[str] = field(default_factory=list)


STALE_TMP_S = 3600.0  # a tmp file untouched this long belongs to a writer that died (a write takes seconds)


def compact(path: str, teacher: Optional[str] = None) -> CompactionReport:
    """Merge one teacher's append (and earlier compacted) files into one ``compacted-<uuid>.parquet``
    without duplicates; ``teacher`` picks it in a root holding several (:func:`teacher_dir`).

    Rows already present in shard files, or earlier in the merge, are dropped. The new file is
    written atomically before the merged files are removed, so a crash in between leaves only
    duplicates (which readers skip) and never loses a row. A lock file keeps compactions of one
    cache from running at once; appenders and readers need no lock.
    """
    path = teacher_dir(path, teacher)
    lock = os.path.join(path, LOCK_FILE)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        raise CacheError(f"another compaction of {path} is running (or crashed: delete {lock})") from None
    try:
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        os.close(fd)
        stale = remove_stale_tmp(path)
        return dataclasses.replace(_compact_locked(path), stale_tmp_removed=stale)
    finally:
        os.unlink(lock)


def remove_stale_tmp(path: str, older_than_s: float = STALE_TMP_S) -> list[str]:
    """Delete the ``*.tmp-*`` files a killed writer left (readers never read them; they only take
    space); files touched within ``older_than_s`` may be a write in progress and are kept."""
    cutoff = time.time() - older_than_s
    removed = []
    for tmp in glob.glob(os.path.join(glob.escape(path), f"*.parquet{TMP_MARK}*")):
        with contextlib.suppress(FileNotFoundError):
            if os.stat(tmp).st_mtime < cutoff:
                os.unlink(tmp)
                removed.append(tmp)
    return sorted(removed)


def _compact_locked(path: str) -> CompactionReport:
    files = row_files(path)
    merge = [f for f in files if os.path.basename(f).startswith((APPEND_PREFIX, COMPACTED_PREFIX))]
    if not merge:
        return CompactionReport([], 0, 0, None)
    base = EmbeddingCache(path, read_meta(files[0]))
    base._expect = {"fingerprint": base.meta["fingerprint"], "preprocess": base.meta["teacher"].get("preprocess"),
                    "recipe": base.meta.get("recipe"), "answer_dtype": base.answer_dtype}
    for f in files:
        if f in merge:
            continue
        table, meta = read_rows(f, INDEX_COLUMNS)
        check_compatible(meta, path=f, expected_from=f"the rest of cache {path}", **base._expect)
        base._index_table(table, f)
    keys: list[str] = []
    parts: dict[str, list] = {c: [] for c in ("view", "image_emb", "text_emb", "image_digest", "text_digest")}
    rows_in = 0
    for f in merge:
        table, meta = read_rows(f)
        check_compatible(meta, path=f, expected_from=f"the rest of cache {path}", **base._expect)
        rows_in += table.num_rows
        rows = base._index_table(table.select(list(INDEX_COLUMNS)), f)
        if rows.size:
            sub = table.take(pa.array(rows))
            keys.extend(sub.column("key").to_pylist())
            parts["view"].append(sub.column("view").to_numpy())
            parts["image_emb"].append(column_rows(sub, "image_emb"))
            parts["text_emb"].append(column_rows(sub, "text_emb"))
            parts["image_digest"].append(sub.column("image_digest").to_numpy())
            parts["text_digest"].append(sub.column("text_digest").to_numpy())
    out_path = None
    if keys:
        meta = {**base.meta, "kind": "compacted", "source": None,
                "writer": {"host": socket.gethostname(), "pid": os.getpid(), "compacted_from": len(merge)}}
        table = rows_table(meta, keys, *(_concat(parts[c]) for c in parts))
        out_path = write_table_atomic(
            table, os.path.join(path, f"{COMPACTED_PREFIX}{uuid.uuid4().hex}.parquet"))
    for f in merge:
        os.unlink(f)
    return CompactionReport(merge, len(keys), rows_in - len(keys), out_path)


def _concat(parts: list) -> np.ndarray | EncodedRows:
    return EncodedRows.concat(parts) if parts and isinstance(parts[0], EncodedRows) else np.concatenate(parts)


# ---------------------------------------------------------------------------------------------
# class centroids (Embed-KD)


def write_centroids(path: str, centroids: np.ndarray, meta: dict, *, counts: Optional[np.ndarray] = None,
                    class_names: Optional[list[str]] = None) -> str:
    """Write ``[C, D]`` float32 centroids as rows (class, name, count, centroid) with ``meta``."""
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    if centroids.ndim != 2:
        raise ValueError(f"centroids must be [C, D], got shape {centroids.shape}")
    c, d = centroids.shape
    names = list(class_names) if class_names else [str(i) for i in range(c)]
    if len(names) != c:
        raise ValueError(f"{len(names)} class names for {c} centroids")
    counts = np.zeros(c, np.int64) if counts is None else np.asarray(counts, np.int64)
    table = pa.table({"class": pa.array(np.arange(c, dtype=np.int32)), "name": pa.array(names, pa.string()),
                      "count": pa.array(counts),
                      "centroid": pa.FixedSizeListArray.from_arrays(pa.array(centroids.reshape(-1)), d)})
    table = table.replace_schema_metadata({META_KEY: json.dumps({**meta, "kind": "centroids"},
                                                                sort_keys=True).encode()})
    return write_table_atomic(table, path)


def read_centroids(path: str, fingerprint: Optional[str] = None) -> tuple[np.ndarray, dict]:
    """(float32 ``[C, D]`` centroids, meta) of a centroids file, or of teacher ``fingerprint`` in a
    cache root; refuses centroids of another teacher ``fingerprint``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(teacher_dir(path, fingerprint), CENTROIDS_FILE)
    meta = read_meta(path)
    if meta.get("kind") != "centroids":
        raise CacheCorruptError(f"{path} holds {meta.get('kind')!r} rows, not class centroids")
    check_compatible(meta, path=path, fingerprint=fingerprint)
    try:
        table = pq.read_table(path, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as exc:
        raise CacheCorruptError(f"centroids file {path} is truncated or corrupt: {exc}") from exc
    column = table.sort_by("class").column("centroid").combine_chunks()
    return column.values.to_numpy().reshape(-1, column.type.list_size).astype(np.float32), meta
