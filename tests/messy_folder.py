"""A folder of generated images in every format and mode `kd data folder` accepts, with the broken
files and bad rows a real photo folder has, and a second tar written by another tool (members
named .webp/.tiff/.gif/.jpg, as img2dataset-style shards have), for the end-to-end test."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from shard_builders import write_tar


def _image(width: int, height: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))  # mode I;16
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    return rgb if mode == "RGB" else rgb.convert(mode)


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


# name, size, mode, format: every format and mode the folder writer takes
GOOD = [
    ("photo-rgb.jpg", (40, 30), "RGB", "JPEG"),
    ("grey.jpg", (30, 30), "L", "JPEG"),
    ("alpha.png", (32, 24), "RGBA", "PNG"),
    ("grey.png", (20, 20), "L", "PNG"),
    ("bilevel.png", (33, 17), "1", "PNG"),
    ("deep16.png", (24, 24), "I;16", "PNG"),
    ("palette.png", (21, 21), "P", "PNG"),
    ("web.webp", (36, 28), "RGB", "WEBP"),
    ("web-alpha.webp", (30, 30), "RGBA", "WEBP"),
    ("scan.tiff", (28, 28), "RGB", "TIFF"),
    ("scan-deep.tif", (16, 16), "I;16", "TIFF"),
    ("old.bmp", (25, 25), "RGB", "BMP"),
    ("bilevel.bmp", (25, 25), "1", "BMP"),
    ("anim.gif", (20, 20), "P", "GIF"),
    ("tiny.png", (1, 1), "RGB", "PNG"),
    ("banner.png", (2000, 6), "RGB", "PNG"),
    ("tower.jpg", (8, 1200), "RGB", "JPEG"),
]
# what the folder writer skips, by reason, for the rows written below
FOLDER_SKIPS = {"undecodable_image": 1, "truncated_image": 2, "missing_image": 1, "missing_caption": 2,
                "outside_folder": 2, "bad_label": 1}


def make_folder(root: Path) -> tuple[Path, Path]:
    """(images folder, captions CSV); returns after writing every file."""
    images = root / "photos"
    (images / "sub").mkdir(parents=True)
    rows = []
    for i, (name, (w, h), mode, fmt) in enumerate(GOOD):
        path = images / ("sub/" + name if i % 3 == 0 else name)
        path.write_bytes(_encoded(_image(w, h, mode, i), fmt))
        rows.append((path.relative_to(images).as_posix(), f"a picture called {name}", "cat" if i % 2 else "dog"))
    (images / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 3)
    (images / "empty.png").write_bytes(b"")
    whole = _encoded(_image(64, 64, "RGB", 99), "PNG")
    (images / "cut.png").write_bytes(whole[: len(whole) // 2])
    (root / "secret.png").write_bytes(_encoded(_image(8, 8, "RGB", 5), "PNG"))  # outside the folder
    (images / "uncaptioned.png").write_bytes(_encoded(_image(8, 8, "RGB", 6), "PNG"))  # no row names it
    rows += [("garbage.jpg", "not an image", "cat"), ("empty.png", "an empty file", "dog"),
             ("cut.png", "cut in half", "cat"), ("gone.png", "never existed", "dog"),
             ("tiny.png", "   ", "cat"), ("../secret.png", "a way out", "cat"),
             (str(root / "secret.png"), "an absolute way out", "dog"), ("alpha.png", "a negative label", "-5")]
    captions = images / "captions.csv"
    lines = ["image,caption,label"] + [f"{p},{c},{label}" for p, c, label in rows]
    captions.write_text("\n".join(lines) + "\n")
    return images, captions


# a shard from another tool: raw members of mixed formats, and the bad samples the reader skips
FOREIGN_SKIPS = {"truncated_image": 1, "missing_caption": 1, "missing_image": 1}


def make_foreign_shard(path: Path) -> int:
    """Write the tar; returns how many of its samples are usable."""
    jpg = _encoded(_image(30, 20, "RGB", 1), "JPEG")
    samples = [
        ("f0", {"webp": _encoded(_image(26, 26, "RGB", 2), "WEBP"), "txt": b"a webp", "cls": b"0"}),
        ("f1", {"tiff": _encoded(_image(26, 26, "L", 3), "TIFF"), "txt": b"a tiff", "cls": b"1"}),
        ("f2", {"gif": _encoded(_image(26, 26, "P", 4), "GIF"), "txt": b"a gif", "cls": b"0"}),
        ("f3", {"jpg": jpg, "txt": b"a jpeg", "cls": b"1"}),
        ("f4", {"png": _encoded(_image(26, 26, "I;16", 5), "PNG"), "txt": b"deep", "cls": b"0"}),
        ("f5", {"jpg": jpg[: len(jpg) // 3], "txt": b"cut jpeg", "cls": b"1"}),
        ("f6", {"webp": _encoded(_image(26, 26, "RGB", 6), "WEBP"), "cls": b"0"}),
        ("f7", {"txt": b"caption without an image", "cls": b"1"}),
    ]
    write_tar(path, samples)
    return 5
