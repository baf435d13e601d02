"""Writing WebDataset shards: the bundled sklearn digits, user folders of captioned images, and
the one split writer other sources use (`write_split`: IDX files in `student_trainer.data.idx`).

Shards are plain POSIX tars named ``{split}-{index:06d}.tar``; each sample has the members
``<key>.png`` (or ``.jpg``), ``<key>.txt`` (caption), ``<key>.json`` (metadata) and, when a label
is known, ``<key>.cls``. A ``dataset.json`` next to the shards records class names, zero-shot
templates (the digits' own, else the generic ones of `student_trainer.data.templates` unless the
caller names others) and per-shard sample counts, so readers can balance ranks without scanning tars.

Every file is written under a temporary name and moved into place (``teacher_service.atomic_files``),
so a crash never leaves a half-written shard. Tar headers carry a fixed mtime/owner and members are
written in a fixed order, so the same inputs give byte-identical shards.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from student_trainer.data.templates import GENERIC_TEMPLATES, check_templates
from teacher_service.atomic_files import atomic_path, write_atomic
from teacher_service.shards import DATASET_INFO, ImageDecodeError, decode_rgb8

CLASS_NAMES: list[str] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Captions for training pairs; one is picked per sample, deterministically from the seed.
CAPTION_TEMPLATES: list[str] = [
    "a photo of the digit {}.",
    "a handwritten {}.",
    "the number {} written by hand.",
    "a scanned image of the digit {}.",
    "a low resolution picture of a {}.",
    "a black and white image of the number {}.",
]

# Prompts averaged into one class embedding for zero-shot classification.
ZERO_SHOT_TEMPLATES: list[str] = [
    "a photo of the digit {}.",
    "a handwritten {}.",
    "an image of the number {}.",
    "the digit {}.",
]

TAR_MTIME = 946684800  # 2000-01-01: a fixed mtime makes shards byte-reproducible
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
IMAGE_COLUMNS = ("image", "file", "filename", "file_name", "path", "image_path")
CAPTION_COLUMNS = ("caption", "text")
_TAR_HEADER_BYTES = 1024  # header + padding per member, for the shard size budget


@dataclass
class ShardSummary:
    """What a writer produced for one split. ``shards`` are full paths; ``skipped`` maps reason → count."""

    split: str
    samples: int
    shards: list[str]
    skipped: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# writing files (atomically: teacher_service.atomic_files)


def _write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    """Write ``samples`` (``{"__key__": str, ext: bytes}``) as a reproducible tar, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as stream, tarfile.open(fileobj=stream, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                key = sample["__key__"]
                for ext in sorted(k for k in sample if k != "__key__"):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(sample[ext])
                    info.mtime = TAR_MTIME
                    info.mode = 0o444
                    info.uid = info.gid = 0
                    info.uname = info.gname = "kd"
                    tar.addfile(info, io.BytesIO(sample[ext]))


def _remove_stale_shards(out_dir: Path, split: str, keep: list[str]) -> None:
    """Drop ``{split}-*.tar`` left by an earlier, larger write so readers never see them."""
    for old in glob.glob(str(out_dir / f"{glob.escape(split)}-*.tar")):
        if os.path.basename(old) not in keep:
            os.unlink(old)


def _update_dataset_info(out_dir: Path, split: str, shard_names: list[str], counts: list[int], **fields) -> None:
    """Merge one split (and top-level fields) into ``dataset.json``, atomically."""
    path = out_dir / DATASET_INFO
    info = json.loads(path.read_text()) if path.exists() else {}
    info.update(fields)
    info.setdefault("class_names", [])
    info.setdefault("templates", list(GENERIC_TEMPLATES))
    info.setdefault("splits", {})
    info["splits"][split] = {"shards": shard_names, "samples": int(sum(counts)), "samples_per_shard": counts}
    write_atomic(path, json.dumps(info, indent=2, sort_keys=True) + "\n")


def _stable_int(*parts: object) -> int:
    payload = "\x00".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "little")


def _encode_image(rgb: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "png":
        Image.fromarray(rgb).save(buffer, format="PNG", optimize=False, compress_level=6)
    else:
        Image.fromarray(rgb).save(buffer, format="JPEG", quality=95, subsampling=0)
    return buffer.getvalue()


def _sample_members(key: str, ext: str, image: bytes, caption: str, label: int | None, meta: dict) -> dict[str, bytes]:
    sample = {
        "__key__": key,
        ext: image,
        "txt": caption.encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }
    if label is not None:
        sample["cls"] = str(int(label)).encode("ascii")
    return sample


# ---------------------------------------------------------------------------------------------
# digits


def _digit_rgb(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """sklearn's 8x8 ink counts (0..16) → dark ink on white paper, bilinear upscaled RGB uint8."""
    grey = np.rint(255.0 - pixels.reshape(8, 8) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    small = Image.fromarray(grey).resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(small.convert("RGB"), dtype=np.uint8)


def _split_digits(labels: np.ndarray, seed: int, val_fraction: float) -> dict[str, np.ndarray]:
    """Stratified, seed-deterministic split of sample indices (each split in shuffled order)."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    if val_fraction <= 0:
        return {"train": np.random.default_rng(seed).permutation(indices)}
    train, val = train_test_split(indices, test_size=val_fraction, stratify=labels, random_state=seed)
    return {"train": np.asarray(train), "val": np.asarray(val)}


def check_image_options(image_format: str, image_size: int | None, samples_per_shard: int) -> str:
    """The normalised image member type ('png' or 'jpg'); ValueError naming a bad option
    (``image_size`` None: the source's own size)."""
    image_format = {"jpeg": "jpg"}.get(image_format, image_format)
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    if samples_per_shard <= 0 or (image_size is not None and image_size <= 0):
        raise ValueError(f"samples_per_shard and image_size must be positive, got {samples_per_shard}, {image_size}")
    return image_format


def write_digits_shards(
    out_dir,
    *,
    seed: int = 0,
    image_size: int = 32,
    val_fraction: float = 0.2,
    samples_per_shard: int = 200,
    image_format: str = "png",
    templates: list[str] | None = None,
) -> dict[str, ShardSummary]:
    """Write sklearn's bundled 8x8 digits (no download) as train/val shards under ``out_dir``.

    Keys are ``digits-<source index>-<hash of the encoded image>`` so a cache keyed by sample key
    can never serve pixels from a differently rendered copy (other ``image_size``/format).
    ``templates``: the zero-shot templates for ``dataset.json`` (default: the digits' own).
    """
    from sklearn.datasets import load_digits

    image_format = check_image_options(image_format, image_size, samples_per_shard)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    templates = check_templates(ZERO_SHOT_TEMPLATES if templates is None else templates)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    labels = digits.target.astype(np.int64)
    summaries: dict[str, ShardSummary] = {}
    for split, indices in _split_digits(labels, seed, val_fraction).items():
        samples = (_digit_sample(digits.data[i], int(i), int(labels[i]), seed, image_size, image_format) for i in indices)
        summaries[split] = write_split(
            out, split, samples, samples_per_shard, class_names=list(CLASS_NAMES), templates=templates,
            caption_templates=list(CAPTION_TEMPLATES), source="sklearn.datasets.load_digits",
        )
    return summaries


def write_split(out: Path, split: str, samples: Iterable[dict[str, bytes]], samples_per_shard: int,
                **info_fields) -> ShardSummary:
    """Write one split's samples (members as built by the sources) in order, ``samples_per_shard``
    to a tar, drop the split's stale tars, and record it (and ``info_fields``) in ``dataset.json``.

    The samples are consumed lazily: a split of any size holds one shard's samples at a time."""
    sink = _ShardSink(out, split, samples_per_shard, max_bytes=2**63)
    for sample in samples:
        sink.add(sample)
    sink.flush()
    _remove_stale_shards(out, split, sink.names)
    _update_dataset_info(out, split, sink.names, sink.counts, **info_fields)
    return ShardSummary(split, sum(sink.counts), [str(out / n) for n in sink.names], {})


def _digit_sample(pixels: np.ndarray, index: int, label: int, seed: int, image_size: int, ext: str) -> dict[str, bytes]:
    return templated_sample(_digit_rgb(pixels, image_size), f"digits-{index:04d}", label, CLASS_NAMES,
                            CAPTION_TEMPLATES, (seed, index), ext, {"source_index": index})


def templated_sample(rgb: np.ndarray, key_stem: str, label: int, class_names: list[str],
                     caption_templates: list[str], caption_seed: tuple, image_format: str,
                     meta: dict) -> dict[str, bytes]:
    """A labelled sample of a class-labelled source (digits, IDX): its caption is one of
    ``caption_templates`` filled with the class name, picked by a stable hash of ``caption_seed``
    (the same inputs give the same caption in any process); its key is ``key_stem`` plus a hash of
    the encoded image, so a cache keyed by sample key never serves pixels of another rendering."""
    image = _encode_image(rgb, image_format)
    template = caption_templates[_stable_int("caption", *caption_seed) % len(caption_templates)]
    caption = template.format(class_names[label])
    key = f"{key_stem}-{hashlib.sha1(image).hexdigest()[:8]}"
    meta = {"label": label, "class_name": class_names[label], "caption": caption, **meta}
    return _sample_members(key, image_format, image, caption, label, meta)


# ---------------------------------------------------------------------------------------------
# user folders


@dataclass
class _Row:
    image: str
    caption: str
    label: str | int | None
    where: str  # "file:line" for error messages
    teacher: str | list | None = None  # which teacher(s) of an ensemble answer it (kept in the sample's JSON)


def _pick_column(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    lowered = {c.strip().lower(): c for c in columns if c is not None}
    return next((lowered[c] for c in candidates if c in lowered), None)


def _read_jsonl(path: Path) -> list[_Row]:
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"captions file {path}:{lineno} is not valid JSON: {exc}") from None
        if not isinstance(record, dict):
            raise ValueError(f"captions file {path}:{lineno} must hold a JSON object, got {type(record).__name__}")
        image_col = _pick_column(list(record), IMAGE_COLUMNS)
        if image_col is None:
            raise ValueError(f"captions file {path}:{lineno} has no image field (one of {IMAGE_COLUMNS})")
        caption_col = _pick_column(list(record), CAPTION_COLUMNS)
        caption = record.get(caption_col) if caption_col else None
        label = record.get("label")
        rows.append(_Row(str(record[image_col] or ""), "" if caption is None else str(caption), label, f"{path}:{lineno}",
                         record.get("teacher")))
    return rows


def _read_table(path: Path) -> list[_Row]:
    text = path.read_text(encoding="utf-8")
    header = text.splitlines()[0] if text.strip() else ""
    if not header:
        raise ValueError(f"captions file {path} is empty (expected a header with image and caption columns)")
    delimiter = "\t" if path.suffix.lower() == ".tsv" or ("\t" in header and path.suffix.lower() != ".csv") else ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    columns = list(reader.fieldnames or [])
    image_col, caption_col = _pick_column(columns, IMAGE_COLUMNS), _pick_column(columns, CAPTION_COLUMNS)
    if image_col is None or caption_col is None:
        raise ValueError(
            f"captions file {path} needs an image column (one of {IMAGE_COLUMNS}) and a caption column "
            f"(one of {CAPTION_COLUMNS}); found columns {columns}"
        )
    label_col = _pick_column(columns, ("label",))
    teacher_col = _pick_column(columns, ("teacher",))
    rows = []
    for lineno, record in enumerate(reader, start=2):
        label = (record.get(label_col) or "").strip() if label_col else ""
        teacher = (record.get(teacher_col) or "").strip() if teacher_col else ""
        rows.append(
            _Row((record.get(image_col) or "").strip(), record.get(caption_col) or "", label or None, f"{path}:{lineno}",
                 [t.strip() for t in teacher.split(";") if t.strip()] or None)
        )
    return rows


def read_captions_file(path) -> list[_Row]:
    """Parse a CSV/TSV (header row) or JSONL captions file; ValueError naming the file when malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file {path} does not exist")
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return _read_jsonl(path)
    return _read_table(path)


def _class_names_for(rows: list[_Row], class_names: list[str] | None, out: Path) -> list[str]:
    """Explicit names win, then names already in ``dataset.json``, then sorted textual labels."""
    if class_names is not None:
        return list(class_names)
    info_path = out / DATASET_INFO
    if info_path.exists():
        existing = json.loads(info_path.read_text()).get("class_names") or []
        if existing:
            return list(existing)
    textual = {str(r.label) for r in rows if r.label is not None and not str(r.label).lstrip("-").isdigit()}
    return sorted(textual)


def _parse_label(label: str | int | None, class_names: list[str]) -> int | None:
    """``None`` when unlabeled; raises ValueError when the label is not a valid class."""
    if label is None:
        return None
    text = str(label).strip()
    if text in class_names:
        return class_names.index(text)
    value = int(text)  # ValueError for unknown names
    if value < 0 or (class_names and value >= len(class_names)):
        raise ValueError(f"label {value} outside [0, {len(class_names)})")
    return value


def _load_image(path: Path) -> tuple[bytes, str]:
    """The stored bytes and extension: JPEG/PNG are kept as is, anything else is stored as the PNG of
    the pixels every reader decodes from it. Checked with the shard reader's own decoder
    (`teacher_service.shards.decode_rgb8`), so a sample written here is a sample every reader takes;
    ImageDecodeError carries the reader's skip reason."""
    data = path.read_bytes()
    pixels = decode_rgb8(data)
    with Image.open(io.BytesIO(data)) as image:
        kind = image.format
    if kind == "JPEG":
        return data, "jpg"
    if kind == "PNG":
        return data, "png"
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue(), "png"


def _folder_key(relpath: str, caption: str, image: bytes) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", os.path.splitext(relpath)[0])[-40:].strip("_") or "img"
    digest = hashlib.sha1(relpath.encode() + b"\x00" + caption.encode() + b"\x00" + image).hexdigest()[:12]
    return f"{stem}-{digest}"


def _folder_images(images_dir: Path) -> set[str]:
    return {
        p.relative_to(images_dir).as_posix()
        for p in images_dir.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    }


class _ShardSink:
    """Accumulates samples and flushes a tar whenever the count or byte budget would be exceeded."""

    def __init__(self, out: Path, split: str, max_samples: int, max_bytes: int):
        self.out, self.split, self.max_samples, self.max_bytes = out, split, max_samples, max_bytes
        self.pending: list[dict[str, bytes]] = []
        self.pending_bytes = 0
        self.names: list[str] = []
        self.counts: list[int] = []

    def add(self, sample: dict[str, bytes]) -> None:
        size = sum(len(v) + _TAR_HEADER_BYTES for k, v in sample.items() if k != "__key__")
        if self.pending and (len(self.pending) >= self.max_samples or self.pending_bytes + size > self.max_bytes):
            self.flush()
        self.pending.append(sample)
        self.pending_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"{self.split}-{len(self.names):06d}.tar"
        _write_tar(self.out / name, self.pending)
        self.names.append(name)
        self.counts.append(len(self.pending))
        self.pending, self.pending_bytes = [], 0


def write_folder_shards(
    images_dir,
    captions_file,
    out_dir,
    *,
    split: str = "train",
    max_shard_samples: int = 1000,
    max_shard_bytes: int = 256 * 2**20,
    class_names: list[str] | None = None,
    templates: list[str] | None = None,
) -> ShardSummary:
    """Shard a folder of images described by a captions file (CSV/TSV with a header, or JSONL).

    ``templates``: the zero-shot templates for ``dataset.json``; None keeps those an earlier split
    wrote there, else the generic ones (`student_trainer.data.templates.GENERIC_TEMPLATES`).

    Image paths in the captions file are relative to ``images_dir``; a path that leads outside it
    (``..``, absolute, a symlink out) is skipped unread as ``outside_folder``. Rows whose image is
    missing or undecodable (the shard reader's reasons: ``undecodable_image``, ``truncated_image``,
    ``image_too_large``), whose caption is missing/empty, or whose label is unknown are skipped and counted
    by reason; images in the folder that no row mentions count as ``missing_caption``.
    """
    images = Path(images_dir)
    if not images.is_dir():
        raise FileNotFoundError(f"images folder {images} does not exist or is not a directory")
    if max_shard_samples <= 0 or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_samples and max_shard_bytes must be positive, got {max_shard_samples}, {max_shard_bytes}")
    template_fields = {} if templates is None else {"templates": check_templates(templates)}
    rows = read_captions_file(captions_file)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = _class_names_for(rows, class_names, out)
    skipped: dict[str, int] = {}
    sink = _ShardSink(out, split, max_shard_samples, max_shard_bytes)
    seen: set[str] = set()
    mentioned: set[str] = set()
    for row in rows:
        reason, sample = _folder_sample(images, row, names, seen, mentioned)
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            sink.add(sample)
    captions_rel = _relative_to(Path(captions_file), images)
    unmentioned = len(_folder_images(images) - mentioned - {captions_rel})
    if unmentioned:
        skipped["missing_caption"] = skipped.get("missing_caption", 0) + unmentioned
    if not sink.pending and not sink.names:
        raise ValueError(
            f"no usable samples in images folder {images} with captions file {captions_file}: skipped {skipped or 'nothing (no rows)'}"
        )
    sink.flush()
    _remove_stale_shards(out, split, sink.names)
    _update_dataset_info(out, split, sink.names, sink.counts, class_names=names, **template_fields)
    return ShardSummary(split, sum(sink.counts), [str(out / n) for n in sink.names], dict(sorted(skipped.items())))


def _relative_to(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return ""


def _folder_sample(
    images: Path, row: _Row, class_names: list[str], seen: set[str], mentioned: set[str]
) -> tuple[str | None, dict[str, bytes] | None]:
    """(skip reason, None) or (None, sample members) for one captions row."""
    relpath = row.image.replace("\\", "/")
    path = images / relpath
    inside = _relative_to(path, images)
    if relpath:
        mentioned.add(inside or relpath)
    if relpath and not inside:  # '../x.png', an absolute path or a symlink out: never read
        return "outside_folder", None
    if not relpath or not path.is_file():
        return "missing_image", None
    caption = row.caption.strip()
    if not caption:
        return "missing_caption", None
    try:
        label = _parse_label(row.label, class_names)
    except ValueError:
        return "bad_label", None
    try:
        data, ext = _load_image(path)
    except ImageDecodeError as exc:
        return exc.reason, None
    except OSError:
        return "unreadable_file", None
    key = _folder_key(relpath, caption, data)
    if key in seen:
        return "duplicate", None
    seen.add(key)
    meta = {"caption": caption, "image": relpath, "label": label}
    if label is not None and label < len(class_names):
        meta["class_name"] = class_names[label]
    if row.teacher:  # per-sample teacher choice, read back by the shard reader (`sample_teachers`)
        meta["teacher"] = row.teacher
    return None, _sample_members(key, ext, data, caption, label, meta)
