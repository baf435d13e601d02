"""`kd demo --data`: the data step of the demo for Fashion-MNIST (tiny IDX files built here: CI has
no Debian package), its subset sizes, the missing-package error before anything starts, and the
flag's checks. No Ray: the whole demo on this path is tests/test_demo.py's stand-in run."""
from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
from idx_builders import make_split
from PIL import Image

import cluster.local
from cluster.cli.main import main
from cluster.demo import DEMO_DATA, DemoConfig, data_summary, ensure_data, locate_data
from student_trainer.data.idx import FASHION_TEMPLATES, PRESETS

FASHION = PRESETS["fashion-mnist"]


@pytest.fixture
def fashion_dir(tmp_path):
    """80 training and 40 test images, 8 and 4 of each class, as the package names its files."""
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    return folder, make_split(folder, "train", [8] * 10, 1, gz=True), make_split(folder, "t10k", [4] * 10, 2, gz=True)


@pytest.fixture
def no_cluster(monkeypatch):
    """Ray must not start: a check that passes would go on to `init_ray`, which fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the demo started Ray before refusing its configuration")
    monkeypatch.setattr(cluster.local, "init_ray", refuse)


def _labels_written(data_dir, split: str, labels: np.ndarray) -> Counter:
    """Class counts of the samples in ``split``'s shards, each checked against its IDX label."""
    info = json.loads((data_dir / "dataset.json").read_text())
    found = Counter()
    for shard in info["splits"][split]["shards"]:
        with tarfile.open(data_dir / shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                assert meta["label"] == labels[meta["source_index"]]
                assert meta["caption"] in {t.format(meta["class_name"]) for t in FASHION.caption_templates}
                stem = name[:-len(".json")]
                assert Image.open(io.BytesIO(members[f"{stem}.png"])).size == (28, 28)  # the files' own size
                found[meta["label"]] += 1
    return found


def test_fashion_data_step_writes_stratified_subsets_with_fashions_prompts(fashion_dir, tmp_path, capsys):
    folder, (_, train_labels), (_, test_labels) = fashion_dir
    cfg = DemoConfig(workdir=str(tmp_path / "demo"), data="fashion-mnist", data_dir=str(folder),
                     train_limit=30, val_limit=20)
    data_dir = ensure_data(cfg, locate_data(cfg))
    assert data_dir == tmp_path / "demo" / "data-fashion-mnist"  # beside the digits' data/, not in it
    info = json.loads((data_dir / "dataset.json").read_text())
    assert info["class_names"] == list(FASHION.class_names) and info["templates"] == FASHION_TEMPLATES
    assert info["source"]["dataset"] == "fashion-mnist"
    assert _labels_written(data_dir, "train", train_labels) == {c: 3 for c in range(10)}  # 30 of 80, stratified
    assert _labels_written(data_dir, "val", test_labels) == {c: 2 for c in range(10)}
    assert data_summary(cfg, data_dir) == {"name": "fashion-mnist", "shards": str(data_dir), "train_samples": 30,
                                           "val_samples": 20}
    assert "wrote fashion-mnist shards: train 30, val 20" in capsys.readouterr().out

    shard = next(data_dir.glob("train-*.tar"))
    written = shard.stat().st_mtime_ns
    ensure_data(cfg, locate_data(cfg))  # the same files, seed and sizes: reused
    assert "reusing fashion-mnist shards" in capsys.readouterr().out and shard.stat().st_mtime_ns == written
    bigger = DemoConfig(workdir=cfg.workdir, data="fashion-mnist", data_dir=str(folder), train_limit=50, val_limit=20)
    ensure_data(bigger, locate_data(bigger))  # other sizes: written again
    assert json.loads((data_dir / "dataset.json").read_text())["splits"]["train"]["samples"] == 50


def test_the_demo_sizes_are_data(tmp_path):
    """Digits keep their budget; Fashion-MNIST's subset and epochs come from DEMO_DATA unless overridden."""
    digits = DemoConfig(workdir=str(tmp_path))
    assert digits.data == "digits" and digits.epochs() == (30, 10) and digits.shards_dir() == tmp_path / "data"
    assert locate_data(digits) is None and DemoConfig(quick=True).epochs() == (1, 1)
    fashion = DEMO_DATA["fashion-mnist"]
    cfg = DemoConfig(data="fashion-mnist")
    assert cfg.limits() == {"train": fashion.train_limit, "val": fashion.val_limit}
    assert cfg.epochs() == (fashion.teacher_epochs, fashion.student_epochs)
    assert DemoConfig(data="fashion-mnist", train_limit=100, teacher_epochs=2).limits()["train"] == 100
    assert fashion.train_limit < 60000 and fashion.val_limit <= 10000  # a subset of the package's photographs


def test_missing_package_fails_on_the_driver_before_anything_starts(tmp_path, monkeypatch, capsys, no_cluster):
    import student_trainer.data.idx as idx

    monkeypatch.setattr(idx, "DATASETS_ROOT", tmp_path / "usr-share-datasets")  # as on CI: no package
    workdir = tmp_path / "demo"
    assert main(["demo", "--data", "fashion-mnist", "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kd: error: no fashion-mnist folder") and len(err.splitlines()) == 1, err
    assert "apt-get install dataset-fashion-mnist" in err and "--data-dir" in err
    assert str(tmp_path / "usr-share-datasets" / "fashion-mnist") in err and "--train-images" not in err
    assert not workdir.exists()

    folder = tmp_path / "incomplete"  # a folder without the test labels
    folder.mkdir()
    make_split(folder, "train", [2] * 10, 0, gz=False)
    make_split(folder, "t10k", [2] * 10, 0, gz=False)
    next(folder.glob("t10k-labels*")).unlink()
    assert main(["demo", "--data", "fashion-mnist", "--data-dir", str(folder), "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert "no labels file in" in err and "point --data-dir at a folder that has them" in err, err
    assert not workdir.exists()


@pytest.mark.parametrize("argv, message", [
    (["--data", "cifar"], "unknown demo data 'cifar'; known: digits, fashion-mnist"),
    (["--train-limit", "500"], "train_limit apply to IDX data (--data fashion-mnist)"),
    (["--data-dir", "somewhere"], "data_dir apply to IDX data"),
    (["--data", "fashion-mnist", "--val-limit", "0"], "val_limit must be a positive number of images, got 0"),
])
def test_data_flags_are_checked_before_anything_starts(tmp_path, capsys, no_cluster, argv, message):
    workdir = tmp_path / "demo"
    assert main(["demo", "--workdir", str(workdir), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kd: error:") and len(err.splitlines()) == 1 and message in err, err
    assert not workdir.exists()


def test_data_flag_defaults_to_digits():
    from cluster.cli.main import build_parser

    args = build_parser().parse_args(["demo"])
    assert (args.data, args.data_dir, args.train_limit, args.val_limit) == ("digits", None, None, None)
    args = build_parser().parse_args(["demo", "--data", "fashion-mnist", "--data-dir", "d", "--train-limit", "9"])
    assert (args.data, args.data_dir, args.train_limit) == ("fashion-mnist", "d", 9)
