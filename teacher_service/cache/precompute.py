"""Offline teacher embeddings: ``kd precompute`` (K replayable views per sample) and Embed-KD centroids.

Shards are dealt by Ray Data to a pool of teacher actors (``map_batches`` with
:class:`ShardEmbedder`, one shard per call, fractional CPUs, configurable concurrency), or to actors
that call a running teacher app. Each actor reads its shard with the one shard reader
(`teacher_service.shards`): bad samples are skipped and counted by reason exactly as training
skips them, so a cache holds a row for every sample a run will ask for. Views come from
:func:`teacher_service.contract.augment.augment_view` with the run's image size and seed, so the
cached embedding of ``(key, view)`` is the embedding of the pixels the student trains on; per-row
digests prove it at training time. The driver writes one Parquet file per shard (atomically) as
each shard's rows arrive: a finished shard is the unit of resumability, and a crash loses at most
the shards in flight.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from teacher_service.cache.centroids import class_centroids, drawn_class_views
from teacher_service.cache.embedders import embed_chunked, make_embedder, tokenize, tokenizer_for
from teacher_service.cache.store import (
    CENTROIDS_FILE,
    CacheCorruptError,
    CacheMismatchError,
    check_compatible,
    make_meta,
    read_meta,
    rows_table,
    stored_answer_dtype,
    teacher_dir,
    write_centroids,
    write_table_atomic,
)
from teacher_service.config import TeacherConfig
from teacher_service.contract.augment import augment_view, image_digests, token_digests, view_recipe
from teacher_service.private_files import check_under_roots, make_private_dir, write_roots
from teacher_service.shards import SkipCounts, load_dataset_info, read_samples

log = logging.getLogger(__name__)

ROW_COLUMNS = ("key", "view", "image_emb", "text_emb", "image_digest", "text_digest")


# ---------------------------------------------------------------------------------------------
# samples → rows


def sample_views(sample: dict, views: list[int], recipe: dict) -> np.ndarray:
    """uint8 [len(views), S, S, 3]: the views of one decoded sample a run with ``recipe`` trains on."""
    return np.stack([augment_view(sample["image"], sample["__key__"], v, recipe["seed"], recipe["image_size"],
                                  train=recipe["train"]) for v in views])


def embed_views(embedder, tokenizer, keys: list[str], captions: list[str], view_ids: list[list[int]],
                pixels: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Cache rows for sample ``i``'s views ``view_ids[i]`` (pixels ``pixels[i]``, one array per
    sample): each caption is embedded once, each view once."""
    context = int(embedder.info["context_length"])
    tokens = tokenize(tokenizer, captions)
    text = embed_chunked(embedder, tokens=tokens, field_name="text_features")
    tdig = token_digests(tokens, context)
    index = np.concatenate([np.full(len(v), i, dtype=np.int64) for i, v in enumerate(view_ids)])
    views = np.concatenate(pixels)
    return {"key": np.array([keys[i] for i in index], dtype=object),
            "view": np.concatenate([np.asarray(v, dtype=np.int32) for v in view_ids]),
            "image_emb": embed_chunked(embedder, images=views, field_name="image_features"),
            "text_emb": text[index], "image_digest": image_digests(views), "text_digest": tdig[index]}


@dataclass
class ShardRows:
    """One shard's cache rows, with what the reader skipped, as an actor hands them to the driver."""

    shard: str
    rows: dict[str, np.ndarray]
    samples: int
    skipped: dict[str, int]
    teacher_s: float


class ShardEmbedder:
    """Ray Data UDF (one teacher per actor): shard paths → each shard's rows for views 0..K-1."""

    def __init__(self, teacher: Optional[dict], app_name: Optional[str], recipe: dict, views: int,
                 fingerprint: str, batch_size: int) -> None:
        self.embedder = make_embedder(teacher, app_name)
        if self.embedder.info["fingerprint"] != fingerprint:
            raise CacheMismatchError(f"teacher actor computes fingerprint {self.embedder.info['fingerprint']!r}, "
                                     f"the driver expected {fingerprint!r} (non-deterministic teacher load?)")
        self.tokenizer = tokenizer_for(recipe)
        self.recipe = recipe
        self.views = list(range(int(views)))
        self.batch_size = int(batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done = [pickle.dumps(self.embed_shard(str(shard))) for shard in batch["shard"]]
        return {"shard": np.asarray([str(s) for s in batch["shard"]], dtype=object),
                "payload": np.asarray(done, dtype=object)}

    def embed_shard(self, shard: str) -> ShardRows:
        skips = SkipCounts()
        start = self.embedder.teacher_s
        parts, chunk = [], []
        for sample in read_samples([shard], skips=skips):
            # keep only the small views: an original photo is dropped as soon as its views exist
            chunk.append((sample["__key__"], sample["txt"], sample_views(sample, self.views, self.recipe)))
            if len(chunk) == self.batch_size:
                parts.append(self._embed(chunk))
                chunk = []
        if chunk:
            parts.append(self._embed(chunk))
        samples = sum(len(p["key"]) for p in parts) // max(1, len(self.views))
        rows = {k: np.concatenate([p[k] for p in parts]) for k in ROW_COLUMNS} if parts else {}
        return ShardRows(shard, rows, samples, dict(skips.skipped), self.embedder.teacher_s - start)

    def _embed(self, chunk: list) -> dict[str, np.ndarray]:
        keys, captions, pixels = (list(c) for c in zip(*chunk))
        return embed_views(self.embedder, self.tokenizer, keys, captions, [self.views] * len(keys), pixels)


def _probe(teacher: Optional[dict], app_name: Optional[str]) -> dict:
    """The teacher's info (fingerprint first of all), computed where the teacher actors run."""
    embedder = make_embedder(teacher, app_name)
    return {k: v for k, v in embedder.info.items() if k != "device"}


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
    answer_dtype: str  # the dtype the rows are stored in
    computed: list[str] = field(default_factory=list)  # shard paths embedded by this call
    skipped: list[str] = field(default_factory=list)  # already complete: left untouched
    recomputed: list[str] = field(default_factory=list)  # corrupt / incomplete outputs replaced
    rows: int = 0
    samples: int = 0  # samples embedded by this call
    samples_skipped: dict[str, int] = field(default_factory=dict)  # bad samples by reason (this call)
    wall_s: float = 0.0
    teacher_s: float = 0.0  # summed time inside teacher calls (over all actors)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _existing_state(path: str, info: dict, recipe: dict, views: int, answer_dtype: str) -> str:
    """"done", "missing" or "redo" for an output file; a file of another teacher/recipe/dtype raises.

    A file is written whole (temp file, then rename) once its shard is read to the end, so a file
    that opens, matches and holds ``samples x views`` rows as its metadata says is complete."""
    if not os.path.exists(path):
        return "missing"
    try:
        meta = read_meta(path)
    except CacheCorruptError as exc:
        log.warning("%s; recomputing it", exc)
        return "redo"
    check_compatible(meta, path=path, fingerprint=info["fingerprint"], preprocess=info.get("preprocess"),
                     recipe=recipe, expected_from="this precompute's teacher", answer_dtype=answer_dtype)
    try:
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:  # noqa: BLE001 - reported and recomputed
        log.warning("%s unreadable (%s); recomputing it", path, exc)
        return "redo"
    samples = (meta.get("writer") or {}).get("samples")
    return "done" if meta.get("views") == views and samples is not None and rows == samples * views else "redo"


def precompute(shards: list[str], out: str, *, views: int, teacher: Optional[TeacherConfig] = None,
               app_name: Optional[str] = None, image_size: int = 32, seed: int = 0,
               tokenizer: Optional[str] = None, context_length: Optional[int] = None,
               batch_size: int = 64, concurrency: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0,
               answer_dtype: Optional[str] = None, progress: bool = True) -> PrecomputeSummary:
    """Embed views ``0..views-1`` of every usable sample of ``shards`` into the cache ``out``; resumable.

    The rows go to the teacher's own directory of ``out`` (:func:`teacher_dir`), so several teachers
    precomputed into one ``out`` sit side by side; ``summary.out`` is that directory.

    ``image_size`` and ``seed`` must be the student run's ``data.image_size`` and ``seed`` (view
    ``v`` is what epoch ``v`` trains on). Finished shard files are skipped; files of another
    teacher or recipe are refused (CacheMismatchError); corrupt or incomplete ones are redone.
    Bad samples are skipped and counted by reason (``summary.samples_skipped``), as training skips them.
    Rows are stored in ``answer_dtype`` (:func:`rows_answer_dtype` says which when None).
    """
    import ray

    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    shards = [os.path.abspath(s) for s in shards]
    if not shards:
        raise ValueError("precompute: no shards given")
    check_under_roots(out, write_roots(), "precompute output")
    clash = _first_clash({s: shard_output(out, s) for s in shards})
    if clash:
        raise ValueError(f"shards {clash[0]} and {clash[1]} would both write {shard_output(out, clash[0])}: "
                         "give shards with distinct file names")
    start = time.perf_counter()
    teacher_dict = teacher.replica_dict() if teacher is not None else None  # the actors load it as a replica does
    resources = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    info = ray.get(ray.remote(_probe).options(**resources).remote(teacher_dict, app_name))
    recipe = view_recipe(image_size, seed, train=True, tokenizer=tokenizer or info["model"],
                         context_length=int(context_length or info["context_length"]))
    rows_dir = teacher_dir(make_private_dir(out), info["fingerprint"], create=True)  # this teacher's rows
    answer_dtype = rows_answer_dtype(rows_dir, answer_dtype, teacher, info)
    outputs = {s: shard_output(rows_dir, s) for s in shards}
    summary = PrecomputeSummary(out=rows_dir, fingerprint=info["fingerprint"], answer_dtype=answer_dtype)
    todo = []
    for shard in shards:
        state = _existing_state(outputs[shard], info, recipe, views, answer_dtype)
        if state == "done":
            summary.skipped.append(shard)
        else:
            todo.append(shard)
            if state == "redo":
                summary.recomputed.append(shard)
    if todo:
        base_meta = {s: make_meta(info, recipe, kind="shard", source=s, views=views, teacher_config=teacher_dict,
                                  app_name=app_name, answer_dtype=answer_dtype) for s in todo}
        udf_args = {"teacher": teacher_dict, "app_name": app_name, "recipe": recipe, "views": views,
                    "fingerprint": info["fingerprint"], "batch_size": batch_size}
        for done in _embedded_shards(todo, udf_args, concurrency=concurrency, resources=resources, progress=progress):
            meta = {**base_meta[done.shard], "writer": {**base_meta[done.shard]["writer"], "samples": done.samples,
                                                        "skipped": done.skipped,
                                                        "teacher_s": round(done.teacher_s, 6)}}
            summary.rows += _write_shard(outputs[done.shard], meta, done.rows)
            summary.computed.append(done.shard)
            summary.samples += done.samples
            summary.teacher_s += done.teacher_s
            for reason, count in done.skipped.items():
                summary.samples_skipped[reason] = summary.samples_skipped.get(reason, 0) + count
    summary.computed.sort(key=shards.index)  # shards finish in any order; report them in the order given
    summary.wall_s = time.perf_counter() - start
    return summary


def rows_answer_dtype(rows_dir: str, asked: Optional[str], teacher: Optional[TeacherConfig], info: dict) -> str:
    """The dtype a precompute stores rows in: the dtype of the rows the teacher already has in
    ``rows_dir`` (one cache, one dtype: asking for another is refused), else ``asked``, else the
    teacher config's ``serving.answer_dtype``, else the app's (``info``), else fp16."""
    stored = stored_answer_dtype(rows_dir)
    if stored and asked and asked != stored:
        raise CacheMismatchError(f"embedding cache {rows_dir} stores this teacher's rows in {stored}; "
                                 f"--answer-dtype {asked} would mix dtypes in one cache. Precompute {asked} rows "
                                 f"into another --out, or leave --answer-dtype out (or give {stored})")
    return stored or asked or (teacher.serving.answer_dtype if teacher else info.get("answer_dtype", "fp16"))


def _first_clash(outputs: dict[str, str]) -> Optional[tuple[str, str]]:
    seen: dict[str, str] = {}
    for shard, path in outputs.items():
        if path in seen:
            return seen[path], shard
        seen[path] = shard
    return None


def _embedded_shards(todo: list[str], udf_args: dict, *, concurrency: int, resources: dict, progress: bool):
    """Ray Data: shard paths → map_batches(ShardEmbedder) on an actor pool → ShardRows as each shard ends."""
    import ray.data
    from tqdm import tqdm

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our bar counts shards, the unit of resumability
    ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(ShardEmbedder, batch_size=1, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=concurrency),
                        fn_constructor_kwargs=udf_args, **resources)
    bar = tqdm(total=len(todo), desc="precompute shards", unit="shard", disable=not progress)
    try:
        for row in ds.iter_rows():
            done: ShardRows = pickle.loads(row["payload"])
            if done.shard not in todo:
                raise RuntimeError(f"precompute got rows for {done.shard!r}, which is not one of the shards read")
            yield done
            bar.update(1)
    finally:
        bar.close()


def _write_shard(path: str, meta: dict, cols: dict[str, np.ndarray]) -> int:
    dim = int(meta["embed_dim"])
    if not cols:  # every sample of the shard was bad: an empty file still marks the shard done
        cols = {"key": np.array([], dtype=object), "view": np.zeros(0, np.int32),
                "image_emb": np.zeros((0, dim), np.float16), "text_emb": np.zeros((0, dim), np.float16),
                "image_digest": np.zeros(0, np.uint64), "text_digest": np.zeros(0, np.uint64)}
    keys = [str(k) for k in cols["key"]]
    if len(set(zip(keys, cols["view"].tolist()))) != len(keys):
        raise RuntimeError(f"{meta['source']}: duplicate sample keys within the shard; keys must be unique")
    table = rows_table(meta, keys, cols["view"], cols["image_emb"], cols["text_emb"], cols["image_digest"],
                       cols["text_digest"])
    write_table_atomic(table, path)
    return table.num_rows


# ---------------------------------------------------------------------------------------------
# class centroids (Embed-KD)


def precompute_centroids(shards: list[str], out: str, per_class: int, *, teacher: Optional[TeacherConfig] = None,
                         app_name: Optional[str] = None, image_size: int = 32,
                         num_classes: Optional[int] = None, seed: int = 0) -> str:
    """Write Embed-KD class centroids ``[C, D_t]`` to ``centroids.parquet`` in the teacher's directory
    of ``out`` (:func:`teacher_dir`); returns its path.

    Each centroid is the mean teacher image embedding of ``per_class`` samples of the class drawn
    at random with ``seed`` (:class:`ClassSampler`, as the paper draws N samples), embedded at their
    plain resized view (``train=False``). Classes come from ``cls`` members; C from
    ``num_classes``, else dataset.json's class_names, else max+1. Bad samples are skipped and counted.
    """
    shards = [os.path.abspath(s) for s in shards]
    try:
        class_names = list(load_dataset_info(shards).get("class_names", []))
    except FileNotFoundError:
        class_names = []
    skips = SkipCounts()
    _, labels, views = drawn_class_views(shards, per_class, seed, image_size, skips=skips)
    classes = int(num_classes or len(class_names) or labels.max() + 1)
    embedder = make_embedder(teacher, app_name)
    centroids = class_centroids(lambda x: embed_chunked(embedder, images=x, field_name="image_features"),
                                views, labels, classes)
    counts = np.bincount(labels[(labels >= 0) & (labels < classes)], minlength=classes)[:classes]
    info = {k: v for k, v in embedder.info.items() if k != "device"}
    meta = make_meta(info, view_recipe(image_size, None, train=False), kind="centroids", source=None,
                     teacher_config=teacher.replica_dict() if teacher is not None else None, app_name=app_name,
                     writer={"per_class": per_class, "seed": seed, "shards": len(shards), "skipped": skips.skipped})
    rows_dir = teacher_dir(make_private_dir(out), info["fingerprint"], create=True)
    names = class_names if len(class_names) == classes else None
    return write_centroids(os.path.join(rows_dir, CENTROIDS_FILE), centroids, meta, counts=counts, class_names=names)
