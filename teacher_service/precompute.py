"""Offline teacher embeddings: ``kd precompute`` (K replayable views per sample), centroids, audits.

Shards are read with Ray Data (``read_webdataset``, raw bytes) and embedded by a pool of
teacher actors (``map_batches`` with :class:`ViewEmbedder`, fractional CPUs, configurable
concurrency) or through a running teacher app. Images are decoded exactly as training decodes
them and views come from :func:`teacher_service.views.augment_view` with the run's image size and
seed, so the cached embedding of ``(key, view)`` is the embedding of the pixels the student will
train on; per-row digests prove it at training time. The driver gathers rows per shard and
writes one Parquet file per shard (atomically) as soon as the shard is complete: a finished shard
is the unit of resumability, and a crash loses at most the shards in flight.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

from .cache import (
    CENTROIDS_FILE,
    CacheCorruptError,
    CacheMismatchError,
    EmbeddingCache,
    check_compatible,
    make_meta,
    read_meta,
    rows_table,
    write_centroids,
    write_table_atomic,
)
from .config import TeacherConfig
from .private_files import check_under_roots, make_private_dir, write_roots
from .protocol import EmbedRequest
from .views import augment_view, decode_image, image_digests, sample_image_member, token_digests, view_recipe

log = logging.getLogger(__name__)

_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key/extension rule
_CHUNK = 256  # samples per teacher request
DATASET_INFO = "dataset.json"


# ---------------------------------------------------------------------------------------------
# teachers: a local engine or a running Serve app


class LocalEmbedder:
    """The teacher loaded in this process (a Ray Data actor, the CLI, an audit)."""

    def __init__(self, teacher: TeacherConfig) -> None:
        from .engine import TeacherEngine
        from .model import load_teacher

        self.engine = TeacherEngine(load_teacher(teacher))
        self.info = self.engine.teacher.info()
        self.teacher_s = 0.0

    def embed(self, images: Optional[np.ndarray] = None, tokens: Optional[np.ndarray] = None):
        n = len(images) if images is not None else len(tokens)
        start = time.perf_counter()
        resp = self.engine.embed(EmbedRequest(keys=[str(i) for i in range(n)], images=images, tokens=tokens,
                                              run="precompute"))
        self.teacher_s += time.perf_counter() - start
        return resp


class ServeEmbedder:
    """A running teacher app (``--app-name``); the handle is made here, inside the caller's process."""

    def __init__(self, app_name: str, timeout_s: float = 300.0) -> None:
        from .deployment import get_teacher_handle

        self.handle = get_teacher_handle(app_name, timeout_s=timeout_s)
        self.timeout_s = timeout_s
        self.info = self.handle.info.remote().result(timeout_s=timeout_s)
        self.teacher_s = 0.0

    def embed(self, images: Optional[np.ndarray] = None, tokens: Optional[np.ndarray] = None):
        n = len(images) if images is not None else len(tokens)
        start = time.perf_counter()
        request = EmbedRequest(keys=[str(i) for i in range(n)], images=images, tokens=tokens, run="precompute")
        resp = self.handle.embed.remote(request).result(timeout_s=self.timeout_s)
        self.teacher_s += time.perf_counter() - start
        return resp


def make_embedder(teacher: Optional[TeacherConfig | dict] = None, app_name: Optional[str] = None):
    if (teacher is None) == (app_name is None):
        raise ValueError("give exactly one of a teacher config (local teacher) or app_name (running app)")
    if app_name is not None:
        return ServeEmbedder(app_name)
    cfg = teacher if isinstance(teacher, TeacherConfig) else TeacherConfig.from_dict(teacher)
    return LocalEmbedder(cfg)


def _embed_chunked(embedder, *, images: Optional[np.ndarray] = None, tokens: Optional[np.ndarray] = None,
                   field_name: str) -> np.ndarray:
    data = images if images is not None else tokens
    parts = []
    for start in range(0, len(data), _CHUNK):
        chunk = data[start:start + _CHUNK]
        resp = embedder.embed(images=chunk if images is not None else None,
                              tokens=chunk if tokens is not None else None)
        parts.append(np.asarray(getattr(resp, field_name), dtype=np.float16))
    return np.concatenate(parts)


# ---------------------------------------------------------------------------------------------
# samples → rows


def _tokenizer(recipe: dict):
    import open_clip

    return open_clip.get_tokenizer(recipe["tokenizer"], context_length=int(recipe["context_length"]))


def _tokens(tokenizer, captions: list[str]) -> np.ndarray:
    tokens = tokenizer(captions)
    if hasattr(tokens, "detach"):
        tokens = tokens.detach().cpu().numpy()
    return np.asarray(tokens, dtype=np.int64)


def embed_views(embedder, tokenizer, recipe: dict, keys: list[str], images: list[np.ndarray],
                captions: list[str], pairs: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """Rows for ``pairs`` of (sample index, view id): each caption is embedded once, each view once."""
    context = int(embedder.info["context_length"])
    tokens = _tokens(tokenizer, captions)
    text = _embed_chunked(embedder, tokens=tokens, field_name="text_features")
    tdig = token_digests(tokens, context)
    views = np.stack([augment_view(images[i], keys[i], v, recipe["seed"], recipe["image_size"],
                                   train=recipe["train"]) for i, v in pairs])
    index = np.fromiter((i for i, _ in pairs), dtype=np.int64, count=len(pairs))
    return {"key": np.array([keys[i] for i, _ in pairs], dtype=object),
            "view": np.fromiter((v for _, v in pairs), dtype=np.int32, count=len(pairs)),
            "image_emb": _embed_chunked(embedder, images=views, field_name="image_features"),
            "text_emb": text[index], "image_digest": image_digests(views), "text_digest": tdig[index]}


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


class ViewEmbedder:
    """Ray Data UDF (one teacher per actor): raw webdataset rows → cache rows for views 0..K-1."""

    def __init__(self, teacher: Optional[dict], app_name: Optional[str], recipe: dict, views: int,
                 fingerprint: str) -> None:
        self.embedder = make_embedder(teacher, app_name)
        if self.embedder.info["fingerprint"] != fingerprint:
            raise CacheMismatchError(f"teacher actor computes fingerprint {self.embedder.info['fingerprint']!r}, "
                                     f"the driver expected {fingerprint!r} (non-deterministic teacher load?)")
        self.tokenizer = _tokenizer(recipe)
        self.recipe = recipe
        self.views = int(views)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [str(k) for k in batch["__key__"]]
        columns = list(batch)
        images, captions = [], []
        for i, key in enumerate(keys):
            image, caption = _decoded({c: batch[c][i] for c in columns}, key)
            images.append(image)
            captions.append(caption)
        before = self.embedder.teacher_s
        pairs = [(i, v) for i in range(len(keys)) for v in range(self.views)]
        rows = embed_views(self.embedder, self.tokenizer, self.recipe, keys, images, captions, pairs)
        rows["url"] = np.repeat(np.asarray([str(u) for u in batch["__url__"]], dtype=object), self.views)
        rows["teacher_s"] = np.zeros(len(pairs), np.float64)
        rows["teacher_s"][0] = self.embedder.teacher_s - before
        return rows


class PrecomputeInputError(ValueError):
    """A sample precompute cannot embed, named by key and shard (the job stops on it)."""


def _decoded(sample: dict, key: str) -> tuple[np.ndarray, str]:
    """(RGB pixels, caption) of one raw sample, or PrecomputeInputError naming the sample and why.

    Precompute stops on a bad sample rather than skipping it: a shard file is complete when it has
    a row per sample, so a skip would need its own bookkeeping (not built yet)."""
    where = f"precompute: sample {key!r} in {sample.get('__url__')!r}"
    try:
        ext = sample_image_member(sample)
        image = decode_image(bytes(sample[ext]), ext)
        if sample.get("txt") is None:
            raise ValueError("no txt caption")
        return image, _text(sample["txt"])
    except (ValueError, UnicodeDecodeError) as exc:
        raise PrecomputeInputError(
            f"{where}: {exc}. Rebuild the shards without it (`kd data folder` skips and counts bad "
            f"samples) or remove it from the tar, then rerun: finished shards are kept.") from None


def _probe(teacher: Optional[dict], app_name: Optional[str]) -> dict:
    """The teacher's info (fingerprint first of all), computed where the teacher actors run."""
    embedder = make_embedder(teacher, app_name)
    return {k: v for k, v in embedder.info.items() if k != "device"}


# ---------------------------------------------------------------------------------------------
# shards


def _tar_samples(path: str, names_only: bool = False) -> Iterator[dict]:
    """Samples of one tar (consecutive members sharing a key), as webdataset groups them."""
    sample: dict = {}
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            match = _MEMBER.match(member.name) if member.isfile() else None
            if not match:
                continue
            key, ext = match.group(1), match.group(2)
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            sample.setdefault("__key__", key)
            sample["__url__"] = path
            if not names_only:
                sample[ext.lower()] = tar.extractfile(member).read()
    if sample:
        yield sample


def shard_counts(shards: list[str]) -> list[int]:
    """Samples per shard: from ``dataset.json`` beside the shards when it lists them, else a tar scan."""
    counts = []
    for shard in shards:
        info_path = os.path.join(os.path.dirname(shard), DATASET_INFO)
        recorded = None
        if os.path.isfile(info_path):
            with open(info_path, encoding="utf-8") as stream:
                for entry in json.load(stream).get("splits", {}).values():
                    named = dict(zip(entry.get("shards", []), entry.get("samples_per_shard", [])))
                    recorded = named.get(os.path.basename(shard), recorded)
        counts.append(int(recorded) if recorded is not None else sum(1 for _ in _tar_samples(shard, True)))
    return counts


def shard_output(out: str, shard: str) -> str:
    """``DIR/train-000001.tar`` → ``OUT/train-000001.parquet``."""
    name = os.path.basename(shard)
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return os.path.join(out, f"{name}.parquet")


# ---------------------------------------------------------------------------------------------
# precompute


@dataclass
class PrecomputeSummary:
    out: str
    fingerprint: str
    computed: list[str] = field(default_factory=list)  # shard paths embedded by this call
    skipped: list[str] = field(default_factory=list)  # already complete: left untouched
    recomputed: list[str] = field(default_factory=list)  # corrupt / incomplete outputs replaced
    rows: int = 0
    wall_s: float = 0.0
    teacher_s: float = 0.0  # summed time inside teacher calls (over all actors)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _existing_state(path: str, info: dict, recipe: dict, views: int, count: int) -> str:
    """"done", "missing" or "redo" for an output file; a file of another teacher/recipe raises."""
    if not os.path.exists(path):
        return "missing"
    try:
        meta = read_meta(path)
    except CacheCorruptError as exc:
        log.warning("%s; recomputing it", exc)
        return "redo"
    check_compatible(meta, path=path, fingerprint=info["fingerprint"], preprocess=info.get("preprocess"),
                     recipe=recipe, expected_from="this precompute's teacher")
    try:
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:  # noqa: BLE001 - reported and recomputed
        log.warning("%s unreadable (%s); recomputing it", path, exc)
        return "redo"
    return "done" if meta.get("views") == views and rows == count * views else "redo"


def precompute(shards: list[str], out: str, *, views: int, teacher: Optional[TeacherConfig] = None,
               app_name: Optional[str] = None, image_size: int = 32, seed: int = 0,
               tokenizer: Optional[str] = None, context_length: Optional[int] = None,
               batch_size: int = 64, concurrency: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0,
               counts: Optional[list[int]] = None, progress: bool = True) -> PrecomputeSummary:
    """Embed views ``0..views-1`` of every sample of ``shards`` into the cache ``out``; resumable.

    ``image_size`` and ``seed`` must be the student run's ``data.image_size`` and ``seed`` (view
    ``v`` is what epoch ``v`` trains on). Finished shard files are skipped; files of another
    teacher or recipe are refused (CacheMismatchError); corrupt or incomplete ones are redone.
    """
    import ray

    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    shards = [os.path.abspath(s) for s in shards]
    if not shards:
        raise ValueError("precompute: no shards given")
    check_under_roots(out, write_roots(), "precompute output")
    out = make_private_dir(out)
    outputs = {s: shard_output(out, s) for s in shards}
    clash = _first_clash(outputs)
    if clash:
        raise ValueError(f"shards {clash[0]} and {clash[1]} would both write {outputs[clash[0]]}: "
                         "give shards with distinct file names")
    counts = list(counts) if counts is not None else shard_counts(shards)
    start = time.perf_counter()
    teacher_dict = teacher.to_dict() if teacher is not None else None
    resources = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    info = ray.get(ray.remote(_probe).options(**resources).remote(teacher_dict, app_name))
    recipe = view_recipe(image_size, seed, train=True, tokenizer=tokenizer or info["model"],
                         context_length=int(context_length or info["context_length"]))
    summary = PrecomputeSummary(out=out, fingerprint=info["fingerprint"])
    expected = dict(zip(shards, counts))
    todo = []
    for shard in shards:
        state = _existing_state(outputs[shard], info, recipe, views, expected[shard])
        if state == "done":
            summary.skipped.append(shard)
        else:
            todo.append(shard)
            if state == "redo":
                summary.recomputed.append(shard)
    if todo:
        meta_for = {s: make_meta(info, recipe, kind="shard", source=s, views=views, teacher_config=teacher_dict,
                                 app_name=app_name) for s in todo}
        rows, teacher_s = _run_pipeline(todo, expected, outputs, meta_for, teacher_dict, app_name, recipe,
                                        views=views, batch_size=batch_size, concurrency=concurrency,
                                        resources=resources, progress=progress,
                                        fingerprint=info["fingerprint"])
        summary.computed, summary.rows, summary.teacher_s = todo, rows, teacher_s
    summary.wall_s = time.perf_counter() - start
    return summary


def _first_clash(outputs: dict[str, str]) -> Optional[tuple[str, str]]:
    seen: dict[str, str] = {}
    for shard, path in outputs.items():
        if path in seen:
            return seen[path], shard
        seen[path] = shard
    return None


def _run_pipeline(todo, expected, outputs, meta_for, teacher_dict, app_name, recipe, *, views, batch_size,
                  concurrency, resources, progress, fingerprint) -> tuple[int, float]:
    """read_webdataset → map_batches(ViewEmbedder) → rows gathered per shard → one file per shard."""
    import ray.data
    from tqdm import tqdm

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our bar counts shards, the unit of resumability
    ds = ray.data.read_webdataset(todo, decoder=None, override_num_blocks=len(todo))
    ds = ds.map_batches(ViewEmbedder, batch_size=batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=concurrency),
                        fn_constructor_kwargs={"teacher": teacher_dict, "app_name": app_name,
                                               "recipe": recipe, "views": views, "fingerprint": fingerprint},
                        **resources)
    pending: dict[str, list[dict]] = {s: [] for s in todo}
    have = {s: 0 for s in todo}
    rows_written, teacher_s = 0, 0.0
    bar = tqdm(total=len(todo), desc="precompute shards", unit="shard", disable=not progress)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            teacher_s += float(np.sum(batch["teacher_s"]))
            for url in np.unique(batch["url"]):
                shard = os.path.abspath(str(url))
                if shard not in pending:
                    raise RuntimeError(f"precompute got rows for {url!r}, which is not one of the shards read")
                sel = np.flatnonzero(batch["url"] == url)
                pending[shard].append({k: batch[k][sel] for k in
                                       ("key", "view", "image_emb", "text_emb", "image_digest", "text_digest")})
                have[shard] += sel.size
                want = expected[shard] * views
                if have[shard] > want:
                    raise RuntimeError(f"shard {shard} yielded more than {expected[shard]} samples x {views} "
                                       "views: duplicate keys in the tar, or a stale dataset.json count")
                if have[shard] == want:
                    rows_written += _write_shard(outputs[shard], meta_for[shard], pending.pop(shard))
                    bar.update(1)
    finally:
        bar.close()
    if pending:
        short = {s: f"{have[s] // views}/{expected[s]}" for s in pending}
        raise RuntimeError(f"precompute: shards ended incomplete (samples seen/expected): {short}; "
                           "their files were not written")
    return rows_written, teacher_s


def _write_shard(path: str, meta: dict, parts: list[dict]) -> int:
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    keys = [str(k) for k in cols["key"]]
    pairs = set(zip(keys, cols["view"].tolist()))
    if len(pairs) != len(keys):
        raise RuntimeError(f"{meta['source']}: duplicate sample keys within the shard; keys must be unique")
    table = rows_table(meta, keys, cols["view"], cols["image_emb"], cols["text_emb"], cols["image_digest"],
                       cols["text_digest"])
    write_table_atomic(table, path)
    return table.num_rows


# ---------------------------------------------------------------------------------------------
# class centroids (Embed-KD)


def _dataset_classes(shards: list[str]) -> list[str]:
    info_path = os.path.join(os.path.dirname(shards[0]), DATASET_INFO)
    if not os.path.isfile(info_path):
        return []
    with open(info_path, encoding="utf-8") as stream:
        return list(json.load(stream).get("class_names", []))


def precompute_centroids(shards: list[str], out: str, per_class: int, *, teacher: Optional[TeacherConfig] = None,
                         app_name: Optional[str] = None, image_size: int = 32,
                         num_classes: Optional[int] = None) -> str:
    """Write Embed-KD class centroids ``[C, D_t]`` to ``OUT/centroids.parquet``; returns its path.

    Each centroid is the mean teacher image embedding of the first ``per_class`` samples of the
    class (in shard order), embedded at their plain resized view (``train=False``). Classes come
    from ``cls`` members; C from ``num_classes``, else dataset.json's class_names, else max+1.
    """
    from .centroids import class_centroids

    shards = [os.path.abspath(s) for s in shards]
    class_names = _dataset_classes(shards)
    images: list[np.ndarray] = []
    labels: list[int] = []
    taken: dict[int, int] = {}
    for shard in shards:
        for sample in _tar_samples(shard):
            if sample.get("cls") is None:
                continue
            label = int(_text(sample["cls"]))
            if taken.get(label, 0) >= per_class:
                continue
            ext = sample_image_member(sample)
            images.append(augment_view(decode_image(sample[ext], ext), sample["__key__"], 0, 0, image_size,
                                       train=False))
            labels.append(label)
            taken[label] = taken.get(label, 0) + 1
    if not labels:
        raise ValueError(f"no labelled samples (cls members) in {len(shards)} shards, e.g. {shards[0]}")
    classes = int(num_classes or len(class_names) or max(labels) + 1)
    embedder = make_embedder(teacher, app_name)
    stack, label_arr = np.stack(images), np.asarray(labels, dtype=np.int64)
    centroids = class_centroids(lambda x: _embed_chunked(embedder, images=x, field_name="image_features"),
                                stack, label_arr, classes, per_class)
    counts = np.bincount(label_arr[(label_arr >= 0) & (label_arr < classes)], minlength=classes)[:classes]
    info = {k: v for k, v in embedder.info.items() if k != "device"}
    meta = make_meta(info, view_recipe(image_size, None, train=False), kind="centroids", source=None,
                     teacher_config=teacher.to_dict() if teacher is not None else None, app_name=app_name,
                     writer={"per_class": per_class, "shards": len(shards)})
    make_private_dir(out)
    names = class_names if len(class_names) == classes else None
    return write_centroids(os.path.join(out, CENTROIDS_FILE), centroids, meta, counts=counts, class_names=names)


# ---------------------------------------------------------------------------------------------
# audit


@dataclass
class AuditReport:
    """Cached vs live teacher on a random sample of rows (cosine of the fp16 embeddings)."""

    cache: str
    fingerprint: str
    rows: int
    worst_image_cosine: float
    worst_text_cosine: float
    mean_image_cosine: float
    worst_row: dict
    digest_mismatches: int  # recomputed views/tokens that differ from what was cached (must be 0)
    unlocatable: int  # sampled rows whose source sample could not be found (appended rows without --shards)
    threshold: float = 0.999

    @property
    def ok(self) -> bool:
        return self.rows > 0 and self.digest_mismatches == 0 and \
            min(self.worst_image_cosine, self.worst_text_cosine) >= self.threshold

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ok": self.ok}


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float32), b.astype(np.float32)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def audit_cache(cache_path: str, *, teacher: Optional[TeacherConfig] = None, app_name: Optional[str] = None,
                samples: int = 64, shards: Optional[list[str]] = None, seed: int = 0,
                threshold: float = 0.999) -> AuditReport:
    """Recompute ``samples`` random cached rows with the live teacher and report the worst agreement.

    The teacher is ``app_name`` (a running app), else ``teacher``, else the teacher config the
    cache recorded. Rows are found in their source shard (recorded by precompute) or, for
    appended rows, in ``shards``. The live teacher must have the cache's fingerprint.
    """
    cache = EmbeddingCache.open(cache_path)
    if app_name is None and teacher is None:
        stored = cache.meta.get("teacher_config")
        if not stored:
            raise ValueError(f"cache {cache.path} was computed through app {cache.meta.get('app_name')!r} and "
                             "records no teacher config: pass app_name (--app-name) or a teacher config")
        teacher = TeacherConfig.from_dict(stored)
    embedder = make_embedder(teacher, app_name)
    live = embedder.info["fingerprint"]
    if live != cache.fingerprint:
        raise CacheMismatchError(f"cache {cache.path} holds teacher fingerprint {cache.fingerprint!r}, the live "
                                 f"teacher has {live!r}: an audit would compare two different teachers")
    picks = _pick_rows(cache, samples, seed)
    where = _locate_sources(cache, picks, shards)
    recipe = dict(cache.recipe)
    recipe["tokenizer"] = recipe.get("tokenizer") or cache.meta["teacher"]["model"]
    recipe["context_length"] = recipe.get("context_length") or cache.meta["teacher"]["context_length"]
    tokenizer = _tokenizer(recipe)
    cos_i, cos_t, digest_bad, rows_info = [], [], 0, []
    for shard, wanted in where.items():
        found = {s["__key__"]: s for s in _tar_samples(shard) if s["__key__"] in wanted}
        keys = sorted(found)
        images = [decode_image(found[k][sample_image_member(found[k])], sample_image_member(found[k])) for k in keys]
        captions = [_text(found[k].get("txt", b"")) for k in keys]
        pairs = [(i, v) for i, k in enumerate(keys) for v in wanted[k]]
        if not pairs:
            continue
        live_rows = embed_views(embedder, tokenizer, recipe, keys, images, captions, pairs)
        cached = cache.fetch([cache.index[(keys[i], v)] for i, v in pairs])
        ci, ct = _cosine(cached["image_emb"], live_rows["image_emb"]), _cosine(cached["text_emb"], live_rows["text_emb"])
        cos_i.append(ci)
        cos_t.append(ct)
        digest_bad += int(np.sum((cached["image_digest"] != live_rows["image_digest"])
                                 | (cached["text_digest"] != live_rows["text_digest"])))
        rows_info += [{"key": keys[i], "view": v, "shard": shard, "image_cosine": float(a), "text_cosine": float(b)}
                      for (i, v), a, b in zip(pairs, ci, ct)]
    if not rows_info:
        raise ValueError(f"audit of {cache.path}: none of the {len(picks)} sampled rows could be located in "
                         "their shards (pass shards= / --shards for appended rows)")
    ci, ct = np.concatenate(cos_i), np.concatenate(cos_t)
    worst = min(rows_info, key=lambda r: min(r["image_cosine"], r["text_cosine"]))
    return AuditReport(cache=cache.path, fingerprint=cache.fingerprint, rows=len(rows_info),
                       worst_image_cosine=float(ci.min()), worst_text_cosine=float(ct.min()),
                       mean_image_cosine=float(ci.mean()), worst_row=worst, digest_mismatches=digest_bad,
                       unlocatable=len(picks) - len(rows_info), threshold=threshold)


def _pick_rows(cache: EmbeddingCache, samples: int, seed: int) -> list[tuple[str, int]]:
    entries = list(cache.index)
    if not entries:
        raise ValueError(f"cache {cache.path} is empty")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(entries), size=min(samples, len(entries)), replace=False)
    return [entries[i] for i in sorted(chosen)]


def _locate_sources(cache: EmbeddingCache, picks: list[tuple[str, int]],
                    shards: Optional[list[str]]) -> dict[str, dict[str, list[int]]]:
    """shard path → {key: [views]} for the picked rows."""
    sources = {}
    for seg_no, segment in enumerate(cache.segments):
        if segment.path is not None:
            sources[seg_no] = read_meta(segment.path).get("source")
    by_key: dict[str, str] = {}
    if shards:
        wanted_keys = {k for k, _ in picks}
        for shard in shards:
            for sample in _tar_samples(os.path.abspath(shard), names_only=True):
                if sample["__key__"] in wanted_keys:
                    by_key.setdefault(sample["__key__"], os.path.abspath(shard))
    where: dict[str, dict[str, list[int]]] = {}
    for key, view in picks:
        source = sources.get(cache.index[(key, view)][0]) or by_key.get(key)
        if source and os.path.isfile(source):
            where.setdefault(source, {}).setdefault(key, []).append(view)
    return where
