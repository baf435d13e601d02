"""What compressed teacher answers cost: error, loss error and bytes of fp16 / bf16 / int8 (issue 29 item 5).

The pool computes L2-normalised float16 rows and encodes each response in the dtype its caller asks
for (`teacher_service.contract.answer_codec`). This script measures, against the float32 rows the
teacher computed before the pool's fp16 rounding:

  codecs   fp16 (the wire's rows as they are), bf16, int8 with a scale per row (the codec), and two
           int8 variants with a scale per dimension measured here to choose between them: one scale
           per column of a batch of `--batch` rows (what a response would carry) and one per column
           of the whole set (what a cache file would carry);
  sources  random unit vectors (D = 64, 128, 512, 768) and a trained digits-teacher (D = 128) on
           every sklearn digit and its caption: trained here for `--teacher-steps` steps of the CLIP
           loss (a minute on one core), or a `kd demo` teacher (`--teacher-dir`);
  figures  max / mean absolute error an element, cosine of each decoded row to its float32 row (mean,
           min), the largest deviation of a row's norm from 1, and the error the losses see: the KL
           divergence of softmax(s I Tᵀ) (images to texts and texts to images, a batch of `--batch`
           pairs) of the decoded rows from that of the float32 rows, at s = 1/0.07 and s = 100;
           bytes a row (values and scales) at D = 64, 128, 512, 768; the wire's bytes a sample (a
           serialized gRPC EmbedReply with image and text features over its samples) and the cache's
           bytes a row (a Parquet row file's size over its rows) per dtype.

    python benchmarks/answer_codec.py --out benchmarks/results
    python benchmarks/answer_codec.py --teacher-dir /tmp/kd-demo/teacher --out /tmp/answer_codec

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


def digits_samples(workdir: Path) -> tuple[np.ndarray, list[str], str]:
    """Every digit (train and val) as its plain 32 px view, its caption, and where the shards are."""
    from student_trainer.data.write_shards import write_digits_shards
    from teacher_service.contract.augment import augment_view
    from teacher_service.shards import read_samples

    data = workdir / "data"
    if not (data / "dataset.json").exists():
        write_digits_shards(data, seed=0, image_size=32)
    images, captions = [], []
    for sample in read_samples(sorted(str(p) for p in data.glob("*.tar"))):
        images.append(augment_view(sample["image"], sample["__key__"], 0, 0, 32, train=False))
        captions.append(sample["txt"])
    return np.stack(images), captions, str(data)


def train_digits_teacher(images: np.ndarray, captions: list[str], steps: int, batch: int = 64):
    """The digits-teacher preset trained with the CLIP loss on the plain views (no Ray, one process)."""
    import open_clip
    import torch

    from student_trainer.config import ModelConfig
    from student_trainer.factory import create_student, create_tokenizer
    from teacher_service.contract.preprocess import preprocess_spec, to_model_input

    torch.manual_seed(0)
    cfg = ModelConfig(name="digits-teacher")
    model = create_student(cfg)
    tokens = create_tokenizer(model, cfg)(captions)
    pixels = to_model_input(images, preprocess_spec(model))
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    rng = np.random.default_rng(0)
    model.train()
    for step in range(steps):
        idx = torch.from_numpy(rng.choice(len(images), batch, replace=False))
        out = model(pixels[idx], tokens[idx])
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, tokens, float(loss)


def load_teacher_dir(teacher_dir: Path, captions: list[str]):
    """A trained teacher from a `kd demo` workdir (`<workdir>/teacher`) and its tokens for `captions`."""
    import open_clip

    from student_trainer.checkpoint import load_model_config
    from student_trainer.factory import resolve_model
    from teacher_service.config import TeacherConfig
    from teacher_service.model import load_teacher

    arch, overrides = resolve_model(load_model_config(teacher_dir))
    teacher = load_teacher(TeacherConfig(model=arch, overrides=overrides, pretrained=str(teacher_dir / "model.pt")))
    tokenizer = open_clip.get_tokenizer(arch, context_length=teacher.context_length)
    return teacher.model, tokenizer(captions), None


def teacher_rows(model, images: np.ndarray, tokens) -> dict[str, np.ndarray]:
    """float32 L2-normalised image and text features: the rows before the pool's fp16 rounding."""
    import torch
    import torch.nn.functional as F

    from teacher_service.contract.preprocess import preprocess_spec, to_model_input

    with torch.inference_mode():
        image = model.encode_image(to_model_input(images, preprocess_spec(model)))
        text = model.encode_text(torch.as_tensor(tokens))
    return {"image": F.normalize(image.float(), dim=-1).numpy(), "text": F.normalize(text.float(), dim=-1).numpy()}


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
    """Every figure of one codec over one source's image and text rows."""
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
    return out


def byte_table(batch: int, file_rows: int) -> dict:
    """Bytes a row at each width: the codec's (values + scales) and the per-dimension options'."""
    table = {}
    for dim in DIMS:
        table[str(dim)] = {"fp16": bytes_per_row("fp16", dim), "bf16": bytes_per_row("bf16", dim),
                           "int8/row": bytes_per_row("int8", dim),
                           f"int8/dim-batch (B={batch})": dim + 4 * dim / batch,
                           f"int8/dim-file ({file_rows} rows)": dim + 4 * dim / file_rows}
    return table


def wire_and_cache_bytes(batch: int, rows: int) -> dict:
    """Serialized EmbedReply bytes a sample (image + text features of `batch` samples) and Parquet
    bytes a cache row (`rows` rows, one file) per answer dtype and width, through the real code."""
    from teacher_service.cache.store import make_meta, rows_table, write_table_atomic
    from teacher_service.contract.answer_codec import answer_rows
    from teacher_service.contract.augment import view_recipe
    from teacher_service.contract.protocol import EmbedResponse
    from teacher_service.grpc.codec import encode_embed_reply

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dim in DIMS:
            src = random_rows(max(batch, rows), dim, seed=dim)
            for dtype in ("fp16", "bf16", "int8"):
                feats = {k: answer_rows(v[:batch].astype(np.float16), dtype) for k, v in src.items()}
                reply = encode_embed_reply(EmbedResponse(
                    keys=[f"digits-{i:05d}-0123456789abcdef" for i in range(batch)], image_features=feats["image"],
                    text_features=feats["text"], logit_scale=100.0, logit_bias=None, fingerprint="f" * 16))
                info = {"fingerprint": "f" * 16, "embed_dim": dim, "model": "bench"}
                meta = make_meta(info, view_recipe(32, 0), kind="shard", views=1, answer_dtype=dtype)
                keys = [f"digits-{i:05d}-0123456789abcdef" for i in range(rows)]
                path = write_table_atomic(rows_table(meta, keys, 0, src["image"][:rows], src["text"][:rows],
                                                     np.arange(rows), np.arange(rows)), os.path.join(tmp, f"{dtype}.parquet"))
                out.setdefault(str(dim), {})[dtype] = {"wire_bytes_per_sample": reply.ByteSize() / batch,
                                                        "cache_bytes_per_row": os.path.getsize(path) / rows}
    return out


# ----------------------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    lines = ["# Compressed teacher answers: error and bytes (issue 29 item 5)", "",
             f"`{result['command']}` on {result['machine']['platform']} ({result['created']}).", "",
             "Errors are of the decoded rows against the teacher's float32 rows (the pool's fp16 rounding "
             "included); KL is of softmax(s·I·Tᵀ) over batches of "
             f"{result['batch']} pairs, both directions, mean (max) over rows.", ""]
    head = ["source", "codec", "bytes/row", "max abs err", "mean abs err", "1 - cos (mean)", "cos min",
            "KL@1/0.07 mean (max)", "KL@100 mean (max)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for source, codecs in result["sources"].items():
        for codec, f in codecs.items():
            lines.append(f"| {source} | {codec} | {f['bytes_per_row']:.1f} | {f['max_abs_error']:.2e} | "
                         f"{f['mean_abs_error']:.2e} | {f['one_minus_cosine_mean']:.2e} | {f['cosine_min']:.6f} | "
                         f"{f['kl_mean@1/0.07']:.2e} ({f['kl_max@1/0.07']:.1e}) | "
                         f"{f['kl_mean@100']:.2e} ({f['kl_max@100']:.1e}) |")
    lines += ["", "Bytes a row (values + scales):", "", "| D | " + " | ".join(next(iter(
        result["bytes_per_row"].values()))) + " |", "|---|" + "---|" * len(next(iter(result["bytes_per_row"].values())))]
    for dim, row in result["bytes_per_row"].items():
        lines.append(f"| {dim} | " + " | ".join(f"{v:g}" for v in row.values()) + " |")
    lines += ["", f"Wire (serialized EmbedReply, image + text features, keys, {result['batch']} samples) and cache "
              f"(Parquet row file of {result['file_rows']} rows: key, view, both embeddings, digests) bytes:", "",
              "| D | dtype | wire bytes/sample | vs fp16 | cache bytes/row | vs fp16 |", "|---|---|---|---|---|---|"]
    for dim, per in result["wire_cache_bytes"].items():
        for dtype, f in per.items():
            lines.append(f"| {dim} | {dtype} | {f['wire_bytes_per_sample']:.1f} | "
                         f"{f['wire_bytes_per_sample'] / per['fp16']['wire_bytes_per_sample']:.3f} | "
                         f"{f['cache_bytes_per_row']:.1f} | "
                         f"{f['cache_bytes_per_row'] / per['fp16']['cache_bytes_per_row']:.3f} |")
    return "\n".join(lines) + "\n"


def measure(args: argparse.Namespace) -> dict:
    sources: dict[str, dict] = {}
    teacher: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        images, captions, _ = digits_samples(Path(tmp))
        start = time.perf_counter()
        if args.teacher_dir:
            model, tokens, loss = load_teacher_dir(Path(args.teacher_dir), captions)
        else:
            model, tokens, loss = train_digits_teacher(images, captions, args.teacher_steps)
        rows = teacher_rows(model, images, tokens)
        teacher = {"source": args.teacher_dir or f"digits-teacher trained {args.teacher_steps} steps here",
                   "final_clip_loss": loss, "samples": len(images), "seconds": round(time.perf_counter() - start, 1),
                   "caption_top1_in_batch": _caption_top1(rows, captions, args.batch)}
    sources[f"digits-teacher D={rows['image'].shape[1]}"] = rows
    for dim in DIMS:
        sources[f"random D={dim}"] = random_rows(args.rows, dim, seed=dim)
    figures = {name: {codec: codec_figures(ref, codec, args.batch) for codec in CODECS} for name, ref in sources.items()}
    return {"teacher": teacher, "batch": args.batch, "file_rows": args.rows, "sources": figures,
            "bytes_per_row": byte_table(args.batch, args.rows),
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
    parser.add_argument("--teacher-dir", help="a trained teacher (kd demo's <workdir>/teacher) instead of training one")
    parser.add_argument("--teacher-steps", type=int, default=300, help="CLIP-loss steps of the teacher trained here")
    parser.add_argument("--rows", type=int, default=4096, help="random rows per source (and rows of a cache file)")
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
