"""IDX ingestion (`kd data idx`): tiny IDX files built here (CI has no Debian dataset package), round
trips through the one shard writer, class-stratified seeded subsets, and one clear error per bad input."""
from __future__ import annotations

import gzip
import io
import json
import re
import struct
import tarfile
from collections import Counter

import numpy as np
import pytest
from idx_builders import make_split
from PIL import Image

from cluster.cli.main import main
from student_trainer.data.idx import (
    FASHION_TEMPLATES,
    LABELS_MAGIC,
    PRESETS,
    IdxFiles,
    class_subset,
    find_idx_files,
    read_idx_pair,
    write_idx_shards,
)

FASHION = PRESETS["fashion-mnist"]
TRAIN_COUNTS = [6, 5, 4, 4, 4, 4, 4, 4, 4, 3]  # 42 training samples, unbalanced on purpose
TEST_COUNTS = [2] * 10


@pytest.fixture(params=[True, False], ids=["gz", "raw"])
def fashion_dir(request, tmp_path):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    train = make_split(folder, "train", TRAIN_COUNTS, 1, gz=request.param)
    test = make_split(folder, "t10k", TEST_COUNTS, 2, gz=request.param)
    return folder, {"train": train, "val": test}


def shard_samples(out, split: str) -> dict[str, dict[str, bytes]]:
    """key → members of every sample of ``split``, read back from the tars listed in dataset.json."""
    info = json.loads((out / "dataset.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for shard in info["splits"][split]["shards"]:
        with tarfile.open(out / shard) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_round_trip_pixels_labels_and_dataset_json(fashion_dir, tmp_path):
    folder, source = fashion_dir
    out = tmp_path / "out"
    summaries = write_idx_shards(out, find_idx_files(folder, FASHION), samples_per_shard=16)
    assert {s: summaries[s].samples for s in summaries} == {"train": 42, "val": 20}
    for split, (images, labels) in source.items():
        samples = shard_samples(out, split)
        indices = []
        for key, members in samples.items():
            assert set(members) == {"png", "txt", "cls", "json"}
            meta = json.loads(members["json"])
            i = meta["source_index"]
            indices.append(i)
            stored = Image.open(io.BytesIO(members["png"]))
            assert stored.mode == "RGB" and stored.size == (28, 28)
            pixels = np.asarray(stored)
            assert (pixels == images[i][:, :, None]).all()  # every channel is the IDX image, unresampled
            assert int(members["cls"]) == labels[i] == meta["label"]
            assert meta["class_name"] == FASHION.class_names[labels[i]]
            caption = members["txt"].decode()
            assert caption == meta["caption"] and caption in {t.format(meta["class_name"]) for t in FASHION.caption_templates}
            assert key.startswith(f"fashion-mnist-{'train' if split == 'train' else 'test'}-{i:06d}-")
        assert sorted(indices) == list(range(len(labels)))  # each source sample exactly once
        assert indices != sorted(indices)  # in a shuffled order, so shards mix the classes
    info = json.loads((out / "dataset.json").read_text())
    assert info["class_names"] == list(FASHION.class_names) and info["class_names"][0] == "T-shirt/top"
    assert info["templates"] == FASHION_TEMPLATES and "a photo of a {}." in info["templates"]
    assert info["caption_templates"] == list(FASHION.caption_templates)
    assert info["splits"]["train"]["samples_per_shard"] == [16, 16, 10]
    assert info["source"]["splits"]["val"]["images"] == str(next(folder.glob("t10k-images-idx3-ubyte*")))
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_class_subset_is_seeded_and_stratified():
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), [600, 500] + [400] * 7 + [300]))
    a, b = class_subset(labels, 1200, seed=3), class_subset(labels, 1200, seed=3)
    assert (a == b).all() and len(set(a.tolist())) == 1200
    assert set(a.tolist()) != set(class_subset(labels, 1200, seed=4).tolist())
    counts = Counter(labels[a].tolist())
    expected = {c: n * 1200 / len(labels) for c, n in Counter(labels.tolist()).items()}
    assert all(abs(counts[c] - expected[c]) <= 1 for c in expected), counts  # each class keeps its share
    everything = class_subset(labels, None, seed=3)
    assert sorted(everything.tolist()) == list(range(len(labels))) and (everything == class_subset(labels, 10**6, 3)).all()
    with pytest.raises(ValueError, match="must be positive"):
        class_subset(labels, 0, seed=3)


def test_kd_data_idx_subsets_are_reproducible(fashion_dir, tmp_path, capsys):
    folder, source = fashion_dir
    outs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for out, seed in zip(outs, (5, 5, 6)):
        assert main(["data", "idx", "--dir", str(folder), "--out", str(out), "--train-limit", "20",
                     "--val-limit", "10", "--seed", str(seed), "--samples-per-shard", "8"]) == 0
    assert "train: 20 samples in 3 shards" in capsys.readouterr().out
    for name in ("train-000000.tar", "train-000002.tar", "val-000001.tar", "dataset.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    train_keys = [set(shard_samples(out, "train")) for out in outs]
    assert train_keys[0] == train_keys[1] != train_keys[2]
    labels = source["train"][1]
    drawn = Counter(labels[json.loads(m["json"])["source_index"]] for m in shard_samples(outs[0], "train").values())
    assert all(abs(drawn[c] - n * 20 / 42) <= 1 for c, n in enumerate(TRAIN_COUNTS)), drawn
    info = json.loads((outs[0] / "dataset.json").read_text())
    assert info["source"]["splits"]["train"]["limit"] == 20 and info["source"]["splits"]["train"]["available"] == 42


def test_named_files_classes_templates_and_resize(tmp_path):
    """Files named one by one write only their split; --classes-file and --templates override the preset."""
    images, labels = make_split(tmp_path, "mine", [3, 3, 2], 7, gz=False)
    names = tmp_path / "classes.txt"
    names.write_text("hat\nscarf\nglove\n")
    out = tmp_path / "out"
    assert main(["data", "idx", "--dataset", "mnist", "--train-images", str(tmp_path / "mine-images-idx3-ubyte"),
                 "--train-labels", str(tmp_path / "mine-labels-idx1-ubyte"), "--classes-file", str(names),
                 "--templates", "a knitted {}.", "--image-size", "32", "--out", str(out)]) == 0
    info = json.loads((out / "dataset.json").read_text())
    assert info["class_names"] == ["hat", "scarf", "glove"] and info["templates"] == ["a knitted {}."]
    assert set(info["splits"]) == {"train"}
    for members in shard_samples(out, "train").values():
        meta = json.loads(members["json"])
        stored = Image.open(io.BytesIO(members["png"]))
        assert stored.size == (32, 32)
        resized = Image.fromarray(images[meta["source_index"]]).resize((32, 32), Image.BILINEAR)
        assert (np.asarray(stored)[:, :, 0] == np.asarray(resized)).all()
        assert meta["class_name"] == ["hat", "scarf", "glove"][labels[meta["source_index"]]]


def test_emnist_letters_prefix_offset_and_transpose(tmp_path):
    """EMNIST: `emnist-<split>-{train,test}-*` files, images stored column-major, letters labelled 1..26."""
    counts = [2] * 26
    train_images, train_labels = make_split(tmp_path, "train", counts, 3, gz=True, prefix="emnist-letters-",
                                            label_offset=1)
    make_split(tmp_path, "test", counts, 4, gz=True, prefix="emnist-letters-", label_offset=1)
    out = tmp_path / "out"
    assert main(["data", "idx", "--dataset", "emnist-letters", "--dir", str(tmp_path), "--out", str(out)]) == 0
    info = json.loads((out / "dataset.json").read_text())
    assert info["class_names"][0] == "letter a" and len(info["class_names"]) == 26
    assert info["splits"]["val"]["samples"] == 52
    for members in shard_samples(out, "train").values():
        i = json.loads(members["json"])["source_index"]
        assert (np.asarray(Image.open(io.BytesIO(members["png"])))[:, :, 1] == train_images[i].T).all()
        assert int(members["cls"]) == train_labels[i] - 1


def test_emnist_class_names_survive_a_lower_casing_tokenizer():
    for name in ("emnist-byclass", "emnist-balanced", "emnist-bymerge"):
        names = PRESETS[name].class_names
        assert len({n.lower() for n in names}) == len(names), name
    assert len(PRESETS["emnist-byclass"].class_names) == 62 and len(PRESETS["emnist-balanced"].class_names) == 47
    assert {"capital A", "small a", "letter C", "digit 7"} <= set(PRESETS["emnist-balanced"].class_names)


# ---------------------------------------------------------------------------------------------
# bad input: one clear error each, nothing written


def _kd_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kd: error:") and len(err.splitlines()) == 1, err
    return err


def test_missing_folder_names_the_apt_package_and_the_flag(tmp_path, capsys, monkeypatch):
    import student_trainer.data.idx as idx

    monkeypatch.setattr(idx, "DATASETS_ROOT", tmp_path / "usr-share-datasets")  # as on CI: no package
    err = _kd_error(capsys, ["data", "idx", "--out", str(tmp_path / "out")])
    assert "apt-get install dataset-fashion-mnist" in err and "--dir" in err
    assert str(tmp_path / "usr-share-datasets" / "fashion-mnist") in err
    err = _kd_error(capsys, ["data", "idx", "--dataset", "kmnist", "--dir", str(tmp_path / "nope"), "--out",
                             str(tmp_path / "out")])
    assert "apt-get" not in err and "nope" in err
    assert not (tmp_path / "out").exists()


def test_missing_file_unknown_dataset_and_bad_flags(fashion_dir, tmp_path, capsys):
    folder, _ = fashion_dir
    err = _kd_error(capsys, ["data", "idx", "--dir", str(folder), "--classes", "a,b", "--classes-file", "c.txt",
                             "--out", str(tmp_path / "o")])
    assert "--classes or --classes-file" in err
    err = _kd_error(capsys, ["data", "idx", "--dir", str(folder), "--classes", "a,b,a", "--out", str(tmp_path / "o")])
    assert "distinct" in err
    next(folder.glob("t10k-labels*")).unlink()
    err = _kd_error(capsys, ["data", "idx", "--dir", str(folder), "--out", str(tmp_path / "out")])
    assert "no labels file" in err and "t10k-labels-idx1-ubyte" in err and "--val-labels" in err
    err = _kd_error(capsys, ["data", "idx", "--dataset", "cifar", "--dir", str(folder), "--out", str(tmp_path / "o")])
    assert "unknown IDX data set 'cifar'" in err and "emnist-balanced" in err
    err = _kd_error(capsys, ["data", "idx", "--train-images", "x", "--out", str(tmp_path / "o")])
    assert "--train-images and --train-labels go together" in err


def _corrupt(folder, kind: str, change) -> None:
    path = next(folder.glob(f"train-{kind}*"))
    data = path.read_bytes()
    gz = path.suffix == ".gz"
    raw = change(gzip.decompress(data) if gz else data)
    path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)


@pytest.mark.parametrize("kind, change, match", [
    ("images", lambda d: struct.pack(">I", LABELS_MAGIC) + d[4:], r"is not IDX images \(idx3-ubyte\): magic 0x00000801"),
    ("labels", lambda d: b"PK\x03\x04" + d[4:], r"is not IDX labels \(idx1-ubyte\): magic 0x504b0304"),
    ("images", lambda d: d[:-100], r"is truncated: its header promises 42x28x28 = 32928 bytes, it holds 32828"),
    ("images", lambda d: d[:10], r"is truncated: 10 bytes, shorter than an IDX header"),
    ("images", lambda d: d + b"\0", r"has 1 bytes after the 42x28x28 values"),
    ("labels", lambda d: d[:4] + struct.pack(">I", 41) + d[8:-1], r"hold 42 images but labels .* hold 41 labels"),
    ("labels", lambda d: d[:-1] + b"\x0c", r"holds label 12, outside the 10 classes of fashion-mnist"),
])
def test_malformed_idx_files(fashion_dir, tmp_path, capsys, kind, change, match):
    folder, _ = fashion_dir
    _corrupt(folder, kind, change)
    out = tmp_path / "out"
    err = _kd_error(capsys, ["data", "idx", "--dir", str(folder), "--out", str(out)])
    assert str(folder) in err
    assert re.search(match, err), err
    assert not out.exists()  # every file is checked before the first shard is written


def test_truncated_gzip_stream(tmp_path):
    make_split(tmp_path, "train", [2, 2], 0, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: corrupt or truncated gzip data"):
        read_idx_pair(IdxFiles(path, tmp_path / "train-labels-idx1-ubyte.gz"))
