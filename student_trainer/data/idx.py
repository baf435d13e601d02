"""IDX data sets (MNIST, Fashion-MNIST, KMNIST, EMNIST) → train/val WebDataset shards.

The MNIST family shares one format: ``*-images-idx3-ubyte`` (a big-endian header: magic
0x00000803, count, rows, cols; then uint8 pixels) and ``*-labels-idx1-ubyte`` (0x00000801, count;
uint8 labels), gzipped or not. The training files are named ``train-*``, the test files ``t10k-*``
(``test-*`` in EMNIST, whose files carry an ``emnist-<split>-`` prefix). The test files become the
``val`` split.

Each data set is a preset (`PRESETS`): its class names, zero-shot templates, caption templates
(one picked per sample from the seed, as for the digits), and EMNIST's quirks (images stored
transposed; the letters split counts its labels from 1). Images are stored as the digits' are:
RGB PNG (or JPEG), at their own 28x28 size unless ``image_size`` asks for a bilinear resize; the
pixel values are the file's (light objects on black), so a shard's pixels equal the IDX content.
Samples go through the one shard writer (`write_shards.write_split`).
"""
from __future__ import annotations

import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from student_trainer.data.templates import GENERIC_TEMPLATES, check_templates
from student_trainer.data.write_shards import (
    CAPTION_TEMPLATES,
    CLASS_NAMES,
    ZERO_SHOT_TEMPLATES,
    ShardSummary,
    check_image_options,
    templated_sample,
    write_split,
)

DATASETS_ROOT = Path("/usr/share/datasets")  # where Debian's dataset-* packages put their files
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801  # uint8 (0x08), 3-d and 1-d
SPLIT_FILES = {"train": ("train",), "val": ("t10k", "test")}  # our split → the data sets' file names

FASHION_TEMPLATES = ["a photo of a {}.", "a black and white photo of a {}.", "a low resolution photo of a {}.",
                     "a photo of the {}, a type of clothing."]
CHARACTER_TEMPLATES = ["a handwritten {}.", "a photo of the character {}.", "a scanned image of a handwritten {}.",
                       "a black and white image of the character {}."]


@dataclass(frozen=True)
class IdxPreset:
    """What a known IDX data set's files do not say: class names, prompts, file naming, quirks."""

    name: str
    class_names: tuple[str, ...]
    templates: tuple[str, ...]  # zero-shot templates for dataset.json
    caption_templates: tuple[str, ...]  # one per sample becomes its training caption
    file_prefix: str = ""  # EMNIST: "emnist-<split>-"
    label_offset: int = 0  # subtracted from stored labels (EMNIST letters: 1..26 → 0..25)
    transpose: bool = False  # EMNIST stores each image column-major
    apt_package: str | None = None  # the Debian package that installs it under DATASETS_ROOT

    @property
    def default_dir(self) -> Path:
        return DATASETS_ROOT / self.name


def _emnist_names(chars: str) -> tuple[str, ...]:
    """EMNIST class names that survive a lower-casing tokenizer: 'capital A' and 'small a' where both
    cases are classes, 'letter C' where the two cases share one, 'digit 7'."""
    def name(c: str) -> str:
        if c.isdigit():
            return f"digit {c}"
        if c.isupper():
            return f"capital {c}" if c.lower() in chars else f"letter {c}"
        return f"small {c}" if c.upper() in chars else f"letter {c}"
    return tuple(name(c) for c in chars)


_DIGITS, _UPPER, _LOWER = "0123456789", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz"
_EMNIST_MERGED = _DIGITS + _UPPER + "abdefghnqrt"  # balanced and bymerge: 15 letters share one class


def _emnist(split: str, names: tuple[str, ...], templates, captions, label_offset: int = 0) -> IdxPreset:
    return IdxPreset(f"emnist-{split}", names, tuple(templates), tuple(captions), f"emnist-{split}-",
                     label_offset, transpose=True)


_digit_prompts = (tuple(ZERO_SHOT_TEMPLATES), tuple(CAPTION_TEMPLATES))
PRESETS: dict[str, IdxPreset] = {p.name: p for p in [
    IdxPreset("fashion-mnist", ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                "Sneaker", "Bag", "Ankle boot"), tuple(FASHION_TEMPLATES),
              tuple(FASHION_TEMPLATES) + ("a product photo of a {}.", "a small grey picture of a {}."),
              apt_package="dataset-fashion-mnist"),
    IdxPreset("mnist", tuple(CLASS_NAMES), *_digit_prompts),
    IdxPreset("kmnist", ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
              ("a handwritten {}.", "the hiragana character {}.", "a photo of the character {}."),
              tuple(CHARACTER_TEMPLATES) + ("the cursive hiragana {}.",)),
    _emnist("mnist", tuple(CLASS_NAMES), *_digit_prompts),
    _emnist("digits", tuple(CLASS_NAMES), *_digit_prompts),
    _emnist("letters", tuple(f"letter {c}" for c in _LOWER), CHARACTER_TEMPLATES, CHARACTER_TEMPLATES, 1),
    _emnist("balanced", _emnist_names(_EMNIST_MERGED), CHARACTER_TEMPLATES, CHARACTER_TEMPLATES),
    _emnist("bymerge", _emnist_names(_EMNIST_MERGED), CHARACTER_TEMPLATES, CHARACTER_TEMPLATES),
    _emnist("byclass", _emnist_names(_DIGITS + _UPPER + _LOWER), CHARACTER_TEMPLATES, CHARACTER_TEMPLATES),
]}


def preset_for(dataset: str) -> IdxPreset:
    """The preset named ``dataset``; ValueError listing the known ones."""
    if dataset not in PRESETS:
        raise ValueError(f"unknown IDX data set {dataset!r}; known: {', '.join(PRESETS)}")
    return PRESETS[dataset]


@dataclass(frozen=True)
class IdxFiles:
    """One split's pair of files."""

    images: Path
    labels: Path


# ---------------------------------------------------------------------------------------------
# reading


def _file_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when they are gzip (by content, whatever the name says)."""
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {path} does not exist")
    data = path.read_bytes()
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as exc:
        raise ValueError(f"IDX file {path}: corrupt or truncated gzip data ({exc})") from None


def read_idx(path, magic: int) -> np.ndarray:
    """A uint8 IDX file (``magic`` 0x803: images [n, rows, cols]; 0x801: labels [n]) as an array;
    ValueError naming the file when its magic, header or length is wrong."""
    path = Path(path)
    data = _file_bytes(path)
    what = "images (idx3-ubyte)" if magic == IMAGES_MAGIC else "labels (idx1-ubyte)"
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"IDX file {path} is truncated: {len(data)} bytes, shorter than an IDX header of {what}")
    found = struct.unpack(">I", data[:4])[0]
    if found != magic:
        raise ValueError(f"IDX file {path} is not IDX {what}: magic 0x{found:08x}, expected 0x{magic:08x}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    size = math.prod(dims)
    body = len(data) - header
    shape = "x".join(str(d) for d in dims)
    if body < size:
        raise ValueError(f"IDX file {path} is truncated: its header promises {shape} = {size} bytes, it holds {body}")
    if body > size:
        raise ValueError(f"IDX file {path} has {body - size} bytes after the {shape} values its header describes")
    if ndim == 3 and 0 in dims[1:]:
        raise ValueError(f"IDX file {path} holds images of size {dims[1]}x{dims[2]}")
    return np.frombuffer(data, dtype=np.uint8, count=size, offset=header).reshape(dims)


def read_idx_pair(files: IdxFiles) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [n, rows, cols], int64 labels [n]); ValueError when the counts differ."""
    images = read_idx(files.images, IMAGES_MAGIC)
    labels = read_idx(files.labels, LABELS_MAGIC).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"IDX images {files.images} hold {len(images)} images but labels {files.labels} "
                         f"hold {len(labels)} labels")
    return images, labels


IDX_FILE_FLAGS = "--train-images/--train-labels/--val-images/--val-labels"  # `kd data idx`'s, one per file


def find_idx_files(folder, preset: IdxPreset, dir_flag: str = "--dir",
                   file_flags: str | None = IDX_FILE_FLAGS) -> dict[str, IdxFiles]:
    """Both splits' files in ``folder`` (``train-images-idx3-ubyte[.gz]`` and the like, also with
    a ``.`` before ``idx``); FileNotFoundError naming what is missing and how to get or name it:
    the apt line, and the caller's flags (``dir_flag`` for the folder, ``file_flags`` for single
    files where it has them), so `kd data idx` and `kd demo` give the same error in their own terms."""
    folder = Path(folder)
    name_them = f"name the files with {file_flags}" if file_flags else f"point {dir_flag} at a folder that has them"
    if not folder.is_dir():
        install = f"install it (apt-get install {preset.apt_package}) or " if preset.apt_package else ""
        or_name = f" (or name them with {file_flags})" if file_flags else ""
        raise FileNotFoundError(f"no {preset.name} folder {folder}: {install}point {dir_flag} at a folder with its "
                                f"IDX files{or_name}")
    return {split: IdxFiles(_find_one(folder, preset.file_prefix, names, "images", 3, name_them),
                            _find_one(folder, preset.file_prefix, names, "labels", 1, name_them))
            for split, names in SPLIT_FILES.items()}


def _find_one(folder: Path, prefix: str, names: tuple[str, ...], kind: str, ndim: int, name_them: str) -> Path:
    candidates = [f"{prefix}{name}-{kind}{sep}idx{ndim}-ubyte{gz}"
                  for name in names for sep in ("-", ".") for gz in (".gz", "")]
    for candidate in candidates:
        if (folder / candidate).is_file():
            return folder / candidate
    raise FileNotFoundError(f"no {kind} file in {folder} (looked for {candidates[0]} and {len(candidates) - 1} "
                            f"other spellings); {name_them}")


# ---------------------------------------------------------------------------------------------
# writing


def class_subset(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Indices of the samples to write, in a seeded shuffled order: all of them, or ``limit`` drawn
    stratified by class (each class keeps its share, rounded) with the digits split's method,
    sklearn's ``train_test_split(train_size=limit, stratify=labels, random_state=seed)``: the same
    labels, ``limit`` and ``seed`` give the same samples."""
    n = len(labels)
    if limit is not None and limit <= 0:
        raise ValueError(f"a subset limit must be positive, got {limit}")
    if limit is None or limit >= n:
        return np.random.default_rng(seed).permutation(n)
    from sklearn.model_selection import train_test_split

    try:
        chosen, _ = train_test_split(np.arange(n), train_size=limit, stratify=labels, random_state=seed)
    except ValueError as exc:
        raise ValueError(f"cannot draw {limit} of {n} samples stratified by class: {exc}") from None
    return np.asarray(chosen)


def _checked_labels(labels: np.ndarray, preset: IdxPreset, class_names: list[str], files: IdxFiles) -> np.ndarray:
    labels = labels - preset.label_offset
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        bad = int(labels.min() if labels.min() < 0 else labels.max()) + preset.label_offset
        raise ValueError(f"IDX labels file {files.labels} holds label {bad}, outside the {len(class_names)} classes "
                         f"of {preset.name} (labels {preset.label_offset}..{preset.label_offset + len(class_names) - 1}); "
                         f"give the class names with --classes or --classes-file")
    return labels


def _rgb(pixels: np.ndarray, image_size: int | None, transpose: bool) -> np.ndarray:
    grey = np.ascontiguousarray(pixels.T if transpose else pixels)
    image = Image.fromarray(grey)  # uint8 [rows, cols]: mode L
    if image_size is not None and image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def write_idx_shards(
    out_dir,
    files: dict[str, IdxFiles],
    *,
    dataset: str = "fashion-mnist",
    class_names: list[str] | None = None,
    templates: list[str] | None = None,
    limits: dict[str, int | None] | None = None,
    seed: int = 0,
    image_size: int | None = None,
    samples_per_shard: int = 1000,
    image_format: str = "png",
) -> dict[str, ShardSummary]:
    """Write each split of ``files`` (``{"train": IdxFiles, "val": ...}``) as shards under ``out_dir``.

    ``limits``: per split, write a class-stratified subset of that many samples (`class_subset`).
    ``class_names`` / ``templates`` override the preset's. Every file is read and checked before
    the first shard is written, so a bad file leaves ``out_dir`` as it was.
    """
    preset = preset_for(dataset)
    image_format = check_image_options(image_format, image_size, samples_per_shard)
    names = list(preset.class_names if class_names is None else class_names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"class names must be distinct and non-empty, got {names}")
    templates = check_templates(preset.templates if templates is None else templates)
    loaded = {}
    for split, pair in files.items():
        images, labels = read_idx_pair(pair)
        loaded[split] = (images, _checked_labels(labels, preset, names, pair),
                         class_subset(labels, (limits or {}).get(split), seed))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = {"dataset": preset.name, "seed": seed, "image_size": image_size, "splits": {
        split: {"images": str(pair.images), "labels": str(pair.labels), "available": len(loaded[split][1]),
                "limit": (limits or {}).get(split), "order": "seeded shuffle; a limit draws stratified by class"}
        for split, pair in files.items()}}
    summaries = {}
    for split, (images, labels, indices) in loaded.items():
        origin = "train" if split == "train" else "test"
        samples = (templated_sample(_rgb(images[i], image_size, preset.transpose), f"{preset.name}-{origin}-{i:06d}",
                                    int(labels[i]), names, list(preset.caption_templates), (seed, origin, int(i)),
                                    image_format, {"source_index": int(i), "source": origin})
                   for i in indices)
        summaries[split] = write_split(out, split, samples, samples_per_shard, class_names=names, templates=templates,
                                       caption_templates=list(preset.caption_templates), source=source)
    return summaries
