"""What compressed teacher answers cost: error, loss error and bytes of fp16 / bf16 / int8 (issue 29 item 5).

The pool computes L2-normalised float16 rows and encodes each response in the dtype its caller asks
for (`teacher_service.contract.answer_codec`). This script measures, against the float32 rows the
teacher computed before the pool's fp16 rounding:

  codecs   fp16 (the wire's rows as they are), bf16, int8 with a scale per row (the codec), and two
           int8 variants with a scale per dimension measured here to choose between them: one scale
           per column of a batch of `--batch` rows (what a response would carry) and one per column
           of the whole set (what a cache file would carry);
  sources  a trained teacher's rows (L2-normalised, as a pool answers them): a Fashion-MNIST teacher
           (`--teacher-dir`, a `kd train` checkpoint) on the first `--rows` Fashion-MNIST test
           photographs and their captions; random unit vectors (D = 64, 128, 512, 768) beside them;
  figures  max / mean absolute error an element, cosine of each decoded row to its float32 row (mean,
           min), the largest deviation of a row's norm from 1, and the error the losses see: the KL
           divergence of softmax(s I Tᵀ) (images to texts and texts to images, a batch of `--batch`
           pairs) of the decoded rows from that of the float32 rows, at s = 1/0.07 and s = 100; for
           the Fashion-MNIST teacher, the zero-shot top-1 of the decoded image rows; which int8 scale
           (per row, per dimension) loses less; bytes a row (values and scales) at D = 64, 128,
           512, 768; the wire's bytes a sample (a serialized gRPC EmbedReply with keys, image and
           text features) and the cache's bytes a row (a Parquet row file's size over its rows)
           for fp16, bf16, int8 with a scale per row and int8 with a scale per dimension.

    python benchmarks/answer_codec.py --teacher-dir CHECKPOINT --out benchmarks/results

(a digits teacher trained here for a few hundred steps was tried as a source and dropped: at
that length it had not learnt the task, caption top-1 in a batch 0.03, and its rows were no
teacher's.)

writes `answer_codec.json` (every figure) and `answer_codec.md` (the tables) under `--out`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from teacher_service.atomic_files import write_atomic
from teacher_service.contract.answer_codec import INT8_LEVELS, bytes_per_row, decode_rows, encode_rows

DIMS = (64, 128, 512, 768)
SCALES = {"1/0.07": 1 / 0.07, "100": 100.0}
CODECS = ("fp16", "bf16", "int8/row", "int8/dim-batch", "int8/dim-file")


# ------------------------------------------------------------------------------------------- rows
def random_rows(n: int, dim: int, seed: int) -> dict[str, np.ndarray]:
    """Independent random unit vectors for images and texts (float32 [n, dim])."""
    rng = np.random.default_rng(seed)
    return {name: _unit(rng.standard_normal((n, dim))) for name in ("image", "text")}


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def fashion_samples(folder: Path, n: int, image_size: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """The first `n` Fashion-MNIST test photographs as plain `image_size` px views, a caption each
    ("a photo of a {class}.") and their labels."""
    from student_trainer.data.idx import find_idx_files, preset_for, read_idx_pair
    from teacher_service.contract.augment import augment_view

    preset = preset_for("fashion-mnist")
    images, labels = read_idx_pair(find_idx_files(folder, preset)["val"])
    images, labels = images[:n], labels[:n]
    views = np.stack([augment_view(img, str(i), 0, 0, image_size, train=False) for i, img in enumerate(images)])
    return views, [preset.templates[0].format(preset.class_names[y]) for y in labels], labels


def load_teacher_dir(teacher_dir: Path):
    """A trained CLIP (a `kd train` checkpoint: model_config.json + model.pt, e.g. kd demo's
    `<workdir>/teacher`) loaded as the pool loads a teacher (a FrozenTeacher), and its tokenizer."""
    import open_clip

    from student_trainer.checkpoint import load_model_config
    from student_trainer.factory import resolve_model
    from teacher_service.config import TeacherConfig
    from teacher_service.model import load_teacher

    arch, overrides = resolve_model(load_model_config(teacher_dir))
    teacher = load_teacher(TeacherConfig(model=arch, overrides=overrides, pretrained=str(teacher_dir / "model.pt")))
    return teacher, open_clip.get_tokenizer(arch, context_length=teacher.context_length)


def checkpoint_training(directory: Path) -> dict:
    """How far the checkpoint's run had trained (its metrics.json: epoch, step, CLIP loss), if it says."""
    path = directory / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    return {k: metrics[k] for k in ("epoch", "step", "clip_loss") if k in metrics}


def teacher_rows(model, images: np.ndarray, tokens, batch: int = 512) -> dict[str, np.ndarray]:
    """float32 L2-normalised image and text features: the rows before the pool's fp16 rounding."""
    import torch
    import torch.nn.functional as F

    from teacher_service.contract.preprocess import preprocess_spec, to_model_input

    spec, out = preprocess_spec(model), {"image": [], "text": []}
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            out["image"].append(F.normalize(model.encode_image(to_model_input(images[s:s + batch], spec)).float(), dim=-1))
            out["text"].append(F.normalize(model.encode_text(torch.as_tensor(tokens[s:s + batch])).float(), dim=-1))
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def fashion_classes(model, tokenizer) -> np.ndarray:
    """float32 [10, D] zero-shot class embeddings of Fashion-MNIST's names and templates."""
    import torch

    from student_trainer.data.idx import preset_for
    from student_trainer.evaluate import class_embeddings

    preset = preset_for("fashion-mnist")
    with torch.inference_mode():
        return class_embeddings(model, list(preset.class_names), list(preset.templates), tokenizer=tokenizer,
                                batch_size=64, device="cpu").float().numpy()


# ----------------------------------------------------------------------------------------- codecs
def int8_per_dim(rows: np.ndarray, group: int) -> tuple[np.ndarray, int]:
    """Decoded rows of int8 with one float32 scale per column of each `group` rows, and the scale
    bytes that costs over all rows (the option the codec did not take)."""
    out = np.empty(rows.shape, np.float32)
    scale_bytes = 0
    for start in range(0, len(rows), group):
        block = rows[start:start + group].astype(np.float32)
        scale = (np.abs(block).max(axis=0) / INT8_LEVELS).astype(np.float32)
        safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(block / safe), -INT8_LEVELS, INT8_LEVELS)
        out[start:start + group] = q * scale
        scale_bytes += scale.nbytes
    return out, scale_bytes


def decoded(rows: np.ndarray, codec: str, batch: int) -> tuple[np.ndarray, float]:
    """(float32 rows a caller decodes, bytes a row) for `codec` over the pool's fp16 `rows`."""
    wire = rows.astype(np.float16)
    if codec in ("fp16", "bf16", "int8/row"):
        enc = encode_rows(wire, codec.split("/")[0])
        return np.asarray(decode_rows(enc), np.float32), enc.nbytes / len(rows)
    values, scale_bytes = int8_per_dim(wire, batch if codec == "int8/dim-batch" else len(rows))
    return values, (values.size + scale_bytes) / len(rows)


# ---------------------------------------------------------------------------------------- figures
def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def kl_batches(ref: dict, dec: dict, scale: float, batch: int) -> np.ndarray:
    """KL(p_ref || p_dec) of softmax(s I Tᵀ) per row (images → texts) and per column (texts →
    images), each batch of `batch` pairs; float64."""
    kls = []
    for start in range(0, len(ref["image"]) - batch + 1, batch):
        sl = slice(start, start + batch)
        a = scale * ref["image"][sl].astype(np.float64) @ ref["text"][sl].astype(np.float64).T
        b = scale * dec["image"][sl].astype(np.float64) @ dec["text"][sl].astype(np.float64).T
        for axis in (1, 0):
            la, lb = _log_softmax(a, axis), _log_softmax(b, axis)
            kls.append((np.exp(la) * (la - lb)).sum(axis=axis))
    return np.concatenate(kls)


def codec_figures(ref: dict, codec: str, batch: int) -> dict:
    """Every figure of one codec over one source's image and text rows (and, for a source with
    labels and class embeddings, the zero-shot top-1 of the decoded image rows)."""
    dec, nbytes = {}, []
    for name in ("image", "text"):
        dec[name], per_row = decoded(ref[name], codec, batch)
        nbytes.append(per_row)
    both_ref = np.concatenate([ref["image"], ref["text"]]).astype(np.float64)
    both = np.concatenate([dec["image"], dec["text"]]).astype(np.float64)
    err = np.abs(both - both_ref)
    cos = (both * both_ref).sum(1) / (np.linalg.norm(both, axis=1) * np.linalg.norm(both_ref, axis=1))
    out = {"max_abs_error": float(err.max()), "mean_abs_error": float(err.mean()),
           "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
           "one_minus_cosine_mean": float((1 - cos).mean()),
           "max_norm_error": float(np.abs(np.linalg.norm(both, axis=1) - 1).max()),
           "bytes_per_row": float(np.mean(nbytes))}
    for label, s in SCALES.items():
        kl = kl_batches(ref, dec, s, batch)
        out[f"kl_mean@{label}"], out[f"kl_max@{label}"] = float(kl.mean()), float(kl.max())
    if "labels" in ref:
        out["zero_shot_top1"] = zero_shot_top1(dec["image"], ref["classes"], ref["labels"])
    return out


def zero_shot_top1(image: np.ndarray, classes: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(image.astype(np.float32) @ classes.T, axis=1) == labels))


def byte_table(batch: int, file_rows: int) -> dict:
    """Bytes a row at each width: the codec's (values + scales) and the per-dimension options'."""
    table = {}
    for dim in DIMS:
        table[str(dim)] = {"fp16": bytes_per_row("fp16", dim), "bf16": bytes_per_row("bf16", dim),
                           "int8/row": bytes_per_row("int8", dim),
                           f"int8/dim-batch (B={batch})": dim + 4 * dim / batch,
                           f"int8/dim-file ({file_rows} rows)": dim + 4 * dim / file_rows}
    return table


BENCH_KEY = "digits-{:05d}-0123456789abcdef"  # a sample key as long as the digits' (stem + image hash)


def wire_bytes(src: dict, dtype: str, batch: int, per_dim: bool = False) -> float:
    """Bytes a sample of a serialized gRPC EmbedReply (keys, image + text features) of `batch`
    samples in `dtype`; `per_dim`: int8 with one float32 scale per dimension of the batch in place
    of one per row (the same int8 values: the bytes are what that layout would carry)."""
    from teacher_service.contract.answer_codec import answer_rows
    from teacher_service.contract.protocol import EmbedResponse
    from teacher_service.grpc.codec import encode_embed_reply, tensor_to_proto

    feats = {k: answer_rows(v[:batch].astype(np.float16), dtype) for k, v in src.items()}
    reply = encode_embed_reply(EmbedResponse(
        keys=[BENCH_KEY.format(i) for i in range(batch)], image_features=feats["image"],
        text_features=feats["text"], logit_scale=100.0, logit_bias=None, fingerprint="f" * 16))
    if per_dim:
        dim = src["image"].shape[1]
        for field in ("image_scales", "text_scales"):
            getattr(reply, field).CopyFrom(tensor_to_proto(np.ones(dim, np.float32)))
    return reply.ByteSize() / batch


def cache_bytes(src: dict, dtype: str, rows: int, path: str, per_dim: bool = False) -> float:
    """Bytes a row of a Parquet row file of `rows` rows written by the cache's writer in `dtype`;
    `per_dim`: int8 rows without the per-row scale columns plus one float32 scale per dimension of
    each embedding for the whole file (what that layout would store)."""
    from teacher_service.cache.store import SCALE_COLUMNS, make_meta, rows_table, write_table_atomic
    from teacher_service.contract.augment import view_recipe

    dim = src["image"].shape[1]
    meta = make_meta({"fingerprint": "f" * 16, "embed_dim": dim, "model": "bench"}, view_recipe(32, 0),
                     kind="shard", views=1, answer_dtype=dtype)
    table = rows_table(meta, [BENCH_KEY.format(i) for i in range(rows)], 0, src["image"][:rows],
                       src["text"][:rows], np.arange(rows), np.arange(rows))
    if per_dim:
        table = table.drop_columns(list(SCALE_COLUMNS.values()))
    size = os.path.getsize(write_table_atomic(table, path)) + (2 * 4 * dim if per_dim else 0)
    return size / rows


WIRE_LAYOUTS = {"fp16": ("fp16", False), "bf16": ("bf16", False), "int8/row": ("int8", False),
                "int8/dim": ("int8", True)}


def wire_and_cache_bytes(batch: int, rows: int) -> dict:
    """Serialized EmbedReply bytes a sample and Parquet bytes a cache row, per layout and width,
    through the project's encoders and writer (int8/dim: the int8/row message and file with its
    per-row scales swapped for per-dimension ones, see `wire_bytes` and `cache_bytes`)."""
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dim in DIMS:
            src = random_rows(max(batch, rows), dim, seed=dim)
            for layout, (dtype, per_dim) in WIRE_LAYOUTS.items():
                path = os.path.join(tmp, f"{dim}-{dtype}-{per_dim}.parquet")
                out.setdefault(str(dim), {})[layout] = {
                    "wire_bytes_per_sample": wire_bytes(src, dtype, batch, per_dim),
                    "cache_bytes_per_row": cache_bytes(src, dtype, rows, path, per_dim)}
    return out


def int8_scale_choice(sources: dict) -> dict:
    """Per teacher source: which int8 scale loses less (mean 1 - cos and mean KL at s = 100) per
    row or per dimension of a batch, and by how much."""
    choice = {}
    for name, codecs in sources.items():
        if not name.startswith("fashion-teacher"):
            continue
        row, dim = codecs["int8/row"], codecs["int8/dim-batch"]
        choice[name] = {metric: {"row": row[metric], "dim-batch": dim[metric], "dim_over_row": dim[metric] / row[metric]}
                        for metric in ("one_minus_cosine_mean", "kl_mean@100", "max_abs_error")}
    return choice


# ----------------------------------------------------------------------------------------- report
def _table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + \
        ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]


def error_table(result: dict) -> list[str]:
    rows = [[source, codec, f"{f['bytes_per_row']:.1f}", f"{f['max_abs_error']:.2e}", f"{f['mean_abs_error']:.2e}",
             f"{f['one_minus_cosine_mean']:.2e}", f"{f['cosine_min']:.6f}",
             f"{f['kl_mean@1/0.07']:.2e} ({f['kl_max@1/0.07']:.1e})", f"{f['kl_mean@100']:.2e} ({f['kl_max@100']:.1e})",
             f"{f['zero_shot_top1']:.4f}" if "zero_shot_top1" in f else ""]
            for source, codecs in result["sources"].items() for codec, f in codecs.items()]
    return _table(["source", "codec", "bytes/row", "max abs err", "mean abs err", "1 - cos (mean)", "cos min",
                   "KL@1/0.07 mean (max)", "KL@100 mean (max)", "zero-shot top-1"], rows)


def bytes_tables(result: dict) -> list[str]:
    kinds = list(next(iter(result["bytes_per_row"].values())))
    lines = ["", "Bytes a row (values + scales):", ""]
    lines += _table(["D", *kinds], [[dim, *(f"{v:g}" for v in row.values())]
                                    for dim, row in result["bytes_per_row"].items()])
    lines += ["", f"Wire (a serialized EmbedReply: image + text features and keys of {result['batch']} samples) "
              f"and cache (a Parquet row file of {result['file_rows']} rows: key, view, both embeddings, "
              "digests) bytes, through the project's code:", ""]
    rows = []
    for dim, per in result["wire_cache_bytes"].items():
        for dtype, f in per.items():
            wire, cache = f["wire_bytes_per_sample"], f["cache_bytes_per_row"]
            rows.append([dim, dtype, f"{wire:.1f}", f"{wire / per['fp16']['wire_bytes_per_sample']:.3f}",
                         f"{cache:.1f}", f"{cache / per['fp16']['cache_bytes_per_row']:.3f}"])
    return lines + _table(["D", "layout", "wire bytes/sample", "vs fp16", "cache bytes/row", "vs fp16"], rows)


def markdown(result: dict) -> str:
    t = result["teacher"]
    teacher = t["source"] + "".join(f", {k} {t[k]}" for k in ("fingerprint", "epoch", "clip_loss",
                                                             "caption_top1_in_batch", "zero_shot_top1") if k in t)
    lines = ["# Compressed teacher answers: error and bytes (issue 29 item 5)", "",
             f"`{result['command']}` on {result['machine']['platform']} ({result['created']}).", "",
             f"Teacher: {teacher}.", "",
             "Errors are of the decoded rows against the teacher's float32 rows (the pool's fp16 rounding "
             f"included); KL is of softmax(s·I·Tᵀ) over batches of {result['batch']} pairs, both directions, "
             "mean (max) over rows; zero-shot top-1 is of the decoded image rows against float32 class "
             "embeddings.", ""]
    lines += error_table(result)
    lines += ["", "int8 scale per row vs per dimension (of a batch), on teacher rows (dim_over_row > 1: the "
              "per-row scale loses less):", ""]
    lines += _table(["source", "metric", "row", "dim-batch", "dim / row"],
                    [[name, metric, f"{v['row']:.3e}", f"{v['dim-batch']:.3e}", f"{v['dim_over_row']:.2f}"]
                     for name, per in result["int8_scale_choice"].items() for metric, v in per.items()])
    return "\n".join(lines + bytes_tables(result)) + "\n"


def teacher_source(args: argparse.Namespace) -> tuple[dict, dict]:
    """The trained teacher's rows on Fashion-MNIST test photographs ({"image", "text", "classes",
    "labels"}) and what the teacher is."""
    teacher, tokenizer = load_teacher_dir(Path(args.teacher_dir))
    model = teacher.model
    size = model.visual.image_size
    images, captions, labels = fashion_samples(Path(args.fashion_dir), args.rows, int(size[0] if isinstance(size, tuple) else size))
    rows = {**teacher_rows(model, images, tokenizer(captions)), "classes": fashion_classes(model, tokenizer),
            "labels": labels}
    return rows, {"source": f"{args.teacher_dir} on the first {len(images)} Fashion-MNIST test photographs",
                  **checkpoint_training(Path(args.teacher_dir)), "fingerprint": teacher.fingerprint,
                  "samples": len(images), "caption_top1_in_batch": round(_caption_top1(rows, captions, args.batch), 4),
                  "zero_shot_top1": round(zero_shot_top1(rows["image"], rows["classes"], labels), 4)}


def measure(args: argparse.Namespace) -> dict:
    rows, teacher = teacher_source(args)
    sources = {f"fashion-teacher D={rows['image'].shape[1]}": rows}
    for dim in DIMS:
        sources[f"random D={dim}"] = random_rows(args.rows, dim, seed=dim)
    figures = {name: {codec: codec_figures(ref, codec, args.batch) for codec in CODECS} for name, ref in sources.items()}
    return {"teacher": teacher, "batch": args.batch, "file_rows": args.rows, "sources": figures,
            "int8_scale_choice": int8_scale_choice(figures), "bytes_per_row": byte_table(args.batch, args.rows),
            "wire_cache_bytes": wire_and_cache_bytes(args.batch, args.rows)}


def _caption_top1(rows: dict, captions: list[str], batch: int) -> float:
    """How often an image's nearest caption of its batch says what its own says (is it trained?)."""
    hits = []
    for s in range(0, len(captions) - batch + 1, batch):
        best = np.argmax(rows["image"][s:s + batch] @ rows["text"][s:s + batch].T, axis=1)
        hits += [captions[s + b] == captions[s + i] for i, b in enumerate(best)]
    return float(np.mean(hits))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="directory for answer_codec.json / .md")
    parser.add_argument("--teacher-dir", required=True,
                        help="a trained Fashion-MNIST teacher: a kd train checkpoint directory (model_config.json + "
                             "model.pt), e.g. a checkpoint of benchmarks/configs/fashion_teacher.yaml's run")
    parser.add_argument("--fashion-dir", default="/usr/share/datasets/fashion-mnist",
                        help="Fashion-MNIST's IDX files (apt-get install dataset-fashion-mnist)")
    parser.add_argument("--rows", type=int, default=4096, help="rows per source (and rows of a cache file)")
    parser.add_argument("--batch", type=int, default=256, help="samples a response (and a KL batch)")
    args = parser.parse_args(argv)
    result = {"command": "python benchmarks/answer_codec.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "created": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": {"platform": platform.platform(), "python": platform.python_version()},
              **measure(args)}
    write_atomic(Path(args.out) / "answer_codec.json", json.dumps(result, indent=2) + "\n")
    write_atomic(Path(args.out) / "answer_codec.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
