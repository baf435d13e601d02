"""Shard writers: byte-reproducible digits shards, member layout, folder import with counted skips."""
from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter, defaultdict

import numpy as np
import pytest
from PIL import Image

from student_trainer.data.write_shards import (
    CAPTION_TEMPLATES,
    CLASS_NAMES,
    ZERO_SHOT_TEMPLATES,
    write_digits_shards,
    write_folder_shards,
)


def _members(path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            samples[key][ext] = tar.extractfile(info).read()
    return dict(samples)


def _no_tmp_files(directory) -> bool:
    return not [n for n in os.listdir(directory) if ".tmp-" in n]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    return out, write_digits_shards(out, seed=3, image_size=12, samples_per_shard=500)


def test_digits_shards_are_byte_identical_across_runs(digits, tmp_path):
    out, summaries = digits
    write_digits_shards(tmp_path, seed=3, image_size=12, samples_per_shard=500)
    names = sorted(os.listdir(out))
    assert names == sorted(os.listdir(tmp_path))
    assert names == ["dataset.json", "train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"]
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_digits_seed_changes_the_split(digits, tmp_path):
    out, _ = digits
    write_digits_shards(tmp_path, seed=4, image_size=12, samples_per_shard=500)
    assert (out / "val-000000.tar").read_bytes() != (tmp_path / "val-000000.tar").read_bytes()


def test_digits_member_layout_and_metadata(digits):
    out, summaries = digits
    assert summaries["train"].samples == 1437 and summaries["val"].samples == 360
    assert summaries["train"].skipped == {} and len(summaries["train"].shards) == 3
    seen_sources: set[int] = set()
    for split, summary in summaries.items():
        labels = Counter()
        for shard in summary.shards:
            for key, sample in _members(shard).items():
                assert set(sample) == {"png", "txt", "cls", "json"}
                meta = json.loads(sample["json"])
                label = int(sample["cls"])
                caption = sample["txt"].decode()
                assert meta == {"label": label, "class_name": CLASS_NAMES[label], "caption": caption,
                                "source_index": meta["source_index"]}
                assert caption in {t.format(CLASS_NAMES[label]) for t in CAPTION_TEMPLATES}
                assert key.startswith(f"digits-{meta['source_index']:04d}-")
                image = Image.open(io.BytesIO(sample["png"]))
                assert image.mode == "RGB" and image.size == (12, 12)
                assert meta["source_index"] not in seen_sources
                seen_sources.add(meta["source_index"])
                labels[label] += 1
        if split == "val":  # stratified: every class gets ~20 % of its ~180 samples
            assert set(labels) == set(range(10)) and all(34 <= n <= 38 for n in labels.values())
    assert seen_sources == set(range(1797))


def test_digits_pixels_follow_the_source(digits):
    """Ink (high sklearn value) is dark; the upscaled image correlates with the 8x8 original."""
    from sklearn.datasets import load_digits

    out, summaries = digits
    key, sample = next(iter(_members(summaries["val"].shards[0]).items()))
    source = load_digits().data[json.loads(sample["json"])["source_index"]].reshape(8, 8)
    grey = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("L").resize((8, 8), Image.BILINEAR), float)
    assert np.corrcoef(grey.ravel(), source.ravel())[0, 1] < -0.8


def test_digits_captions_vary_and_dataset_json(digits):
    out, summaries = digits
    captions = {s["txt"] for shard in summaries["train"].shards for s in _members(shard).values()}
    templates_used = {c.decode().split(" ")[1] for c in captions}
    assert len(templates_used) > 3
    info = json.loads((out / "dataset.json").read_text())
    assert info["class_names"] == CLASS_NAMES and info["templates"] == ZERO_SHOT_TEMPLATES
    assert info["splits"]["train"] == {"shards": ["train-000000.tar", "train-000001.tar", "train-000002.tar"],
                                       "samples": 1437, "samples_per_shard": [500, 500, 437]}
    assert info["splits"]["val"]["samples_per_shard"] == [360]
    assert _no_tmp_files(out)


def test_digits_jpg_format(tmp_path):
    summaries = write_digits_shards(tmp_path, image_size=8, val_fraction=0.5, samples_per_shard=2000, image_format="jpg")
    sample = next(iter(_members(summaries["val"].shards[0]).values()))
    assert set(sample) == {"jpg", "txt", "cls", "json"}
    assert Image.open(io.BytesIO(sample["jpg"])).format == "JPEG"
    with pytest.raises(ValueError, match="image_format"):
        write_digits_shards(tmp_path, image_format="gif")


# ---------------------------------------------------------------------------------------------
# folders


def _png(path, value: int, mode: str = "RGB") -> None:
    Image.new(mode, (5, 7), (value,) * len(mode)).save(path)


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    _png(images / "a.png", 10)
    _png(images / "b.png", 20, "RGBA")
    Image.new("RGB", (6, 6), (30, 30, 30)).save(images / "sub" / "c.jpg", quality=90)
    Image.new("L", (4, 4), 40).save(images / "d.bmp")
    _png(images / "no_caption.png", 50)
    _png(images / "unlisted.png", 60)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return tmp_path, images


ROWS = [
    ("a.png", "a red thing", "cat"),
    ("b.png", "a see-through thing", "dog"),
    ("sub/c.jpg", "a grey square", "cat"),
    ("d.bmp", "a bitmap", ""),
    ("no_caption.png", "   ", "dog"),
    ("broken.png", "broken", "cat"),
    ("gone.png", "missing file", "cat"),
]
EXPECTED_SKIPS = {"missing_caption": 2, "missing_image": 1, "undecodable_image": 1}


def _check_folder_shards(summary, out, class_names):
    assert summary.samples == 4 and summary.skipped == EXPECTED_SKIPS
    samples = {}
    for shard in summary.shards:
        samples.update(_members(shard))
    by_image = {json.loads(s["json"])["image"]: s for s in samples.values()}
    assert set(by_image) == {"a.png", "b.png", "sub/c.jpg", "d.bmp"}
    assert set(by_image["sub/c.jpg"]) == {"jpg", "txt", "json", "cls"}
    assert set(by_image["d.bmp"]) == {"png", "txt", "json"}  # re-encoded; unlabeled → no cls
    assert Image.open(io.BytesIO(by_image["d.bmp"]["png"])).format == "PNG"
    assert by_image["a.png"]["png"] == (out.parent / "images" / "a.png").read_bytes()  # stored as is
    assert by_image["b.png"]["txt"] == b"a see-through thing"
    assert class_names[int(by_image["b.png"]["cls"])] == "dog"
    assert class_names[int(by_image["sub/c.jpg"]["cls"])] == "cat"
    assert _no_tmp_files(out)


def test_folder_csv_counts_skips(folder):
    root, images = folder
    captions = root / "captions.csv"
    captions.write_text("filename,caption,label\n" + "".join(f'{i},"{c}",{l}\n' for i, c, l in ROWS))
    out = root / "shards"
    summary = write_folder_shards(images, captions, out, split="train", max_shard_samples=3)
    assert [os.path.basename(s) for s in summary.shards] == ["train-000000.tar", "train-000001.tar"]
    info = json.loads((out / "dataset.json").read_text())
    assert info["class_names"] == ["cat", "dog"]  # derived from textual labels
    assert info["splits"]["train"]["samples_per_shard"] == [3, 1]
    _check_folder_shards(summary, out, info["class_names"])


def test_folder_jsonl_with_explicit_classes_and_byte_budget(folder):
    root, images = folder
    captions = root / "captions.jsonl"
    lines = [json.dumps({"image": i, "caption": c, **({"label": l} if l else {})}) for i, c, l in ROWS]
    captions.write_text("\n".join(lines) + "\n\n")
    out = root / "shards"
    summary = write_folder_shards(images, captions, out, split="val", max_shard_bytes=1, class_names=["dog", "cat"])
    assert len(summary.shards) == 4  # every sample exceeds the byte budget: one per shard
    _check_folder_shards(summary, out, ["dog", "cat"])


def test_folder_tsv_rewrite_removes_stale_shards_and_keeps_other_splits(folder):
    root, images = folder
    captions = root / "captions.tsv"
    captions.write_text("image\tcaption\n" + "".join(f"{i}\t{c}\n" for i, c, _ in ROWS))
    out = root / "shards"
    write_folder_shards(images, captions, out, split="val", max_shard_samples=1)
    write_folder_shards(images, captions, out, split="train", max_shard_samples=1)
    assert len([n for n in os.listdir(out) if n.startswith("train-")]) == 4
    summary = write_folder_shards(images, captions, out, split="train", max_shard_samples=10)
    assert sorted(n for n in os.listdir(out) if n.startswith("train-")) == ["train-000000.tar"]
    info = json.loads((out / "dataset.json").read_text())
    assert info["splits"]["train"]["shards"] == ["train-000000.tar"]
    assert info["splits"]["val"]["samples_per_shard"] == [1, 1, 1, 1]
    assert summary.samples == 4 and "cls" not in next(iter(_members(summary.shards[0]).values()))


def test_folder_keys_are_deterministic(folder):
    root, images = folder
    captions = root / "captions.csv"
    captions.write_text("image,caption\na.png,one\nb.png,two\n")
    s1 = write_folder_shards(images, captions, root / "o1")
    s2 = write_folder_shards(images, captions, root / "o2")
    assert open(s1.shards[0], "rb").read() == open(s2.shards[0], "rb").read()


def test_empty_folder_raises_naming_it(tmp_path):
    images = tmp_path / "empty_images"
    images.mkdir()
    captions = tmp_path / "captions.csv"
    captions.write_text("image,caption\n")
    with pytest.raises(ValueError, match="empty_images"):
        write_folder_shards(images, captions, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.tar"))


def test_nothing_usable_raises_with_reasons(folder):
    root, images = folder
    captions = root / "captions.csv"
    captions.write_text("image,caption\nbroken.png,x\ngone.png,y\n")
    with pytest.raises(ValueError, match=r"no usable samples.*undecodable_image"):
        write_folder_shards(images, captions, root / "out")


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("c.csv", "image,description\na.png,hello\n", r"c\.csv needs an image column"),
        ("c.csv", "", r"c\.csv is empty"),
        ("c.jsonl", '{"image": "a.png", "caption": "x"}\n{not json\n', r"c\.jsonl:2 is not valid JSON"),
        ("c.jsonl", '["a.png", "x"]\n', r"c\.jsonl:1 must hold a JSON object"),
    ],
)
def test_malformed_captions_file(folder, name, text, match):
    root, images = folder
    (root / name).write_text(text)
    with pytest.raises(ValueError, match=match):
        write_folder_shards(images, root / name, root / "out")


def test_failed_write_leaves_no_partial_shard(folder, monkeypatch):
    root, images = folder
    captions = root / "captions.csv"
    captions.write_text("image,caption\na.png,one\nb.png,two\n")
    calls = {"n": 0}
    real_addfile = tarfile.TarFile.addfile

    def flaky_addfile(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real_addfile(self, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "addfile", flaky_addfile)
    out = root / "out"
    with pytest.raises(OSError, match="disk full"):
        write_folder_shards(images, captions, out)
    assert os.listdir(out) == []


# ---------------------------------------------------------------------------------------------
# zero-shot templates


def test_folder_default_templates_are_generic_and_kept_across_splits(folder):
    """A folder of arbitrary photos gets CLIP's generic prompts, never the digits' ("a handwritten {}.");
    a later split without --templates keeps the templates an earlier one chose."""
    from student_trainer.data.templates import GENERIC_TEMPLATES

    root, images = folder
    captions = root / "captions.csv"
    captions.write_text("image,caption,label\na.png,one,cat\nb.png,two,dog\n")
    out = root / "out"
    write_folder_shards(images, captions, out, split="train")
    info = json.loads((out / "dataset.json").read_text())
    assert info["templates"] == GENERIC_TEMPLATES and "a photo of a {}." in info["templates"]
    assert not set(info["templates"]) & set(ZERO_SHOT_TEMPLATES)
    write_folder_shards(images, captions, out, split="val", templates=["a {} on a sofa."])
    write_folder_shards(images, captions, out, split="train")
    assert json.loads((out / "dataset.json").read_text())["templates"] == ["a {} on a sofa."]


def test_kd_data_folder_templates_file_and_repeated_flag(folder, capsys):
    from cluster.cli.main import main

    root, images = folder
    captions = root / "captions.csv"
    captions.write_text("image,caption,label\na.png,one,cat\nb.png,two,dog\n")
    listed = root / "templates.txt"
    listed.write_text("# house prompts\na photo of my {}.\n\n  a blurry {}.  \n")
    out = root / "out"
    assert main(["data", "folder", "--images", str(images), "--captions", str(captions), "--out", str(out),
                 "--templates", str(listed), "--templates", "itap of a {}."]) == 0
    info = json.loads((out / "dataset.json").read_text())
    assert info["templates"] == ["a photo of my {}.", "a blurry {}.", "itap of a {}."]
    assert main(["data", "digits", "--out", str(root / "digits"), "--templates", "a {} drawn in ink."]) == 0
    assert json.loads((root / "digits" / "dataset.json").read_text())["templates"] == ["a {} drawn in ink."]
    capsys.readouterr()
    for bad, match in [("a photo", "neither a template"), ("a {} and a {}", "exactly one"),
                       ("{0} and {}", "braces other than"), ("a {name} {}", "braces other than")]:
        code = main(["data", "folder", "--images", str(images), "--captions", str(captions), "--out",
                     str(root / "bad"), "--templates", bad])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("kd: error:") and match in err and len(err.splitlines()) == 1
    assert not (root / "bad").exists()  # templates are checked before anything is written
