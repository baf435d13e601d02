"""`kd export`: a student checkpoint as open_clip's own folder.

The export is loaded in a separate Python (`-I`, nothing but open_clip, torch, numpy and PIL
imported) that reads the val shards with tarfile and PIL and scores zero-shot top-1 itself; its
figure and every per-image prediction equal `kd eval`'s. Checkpoints are written with
`save_student` (no Ray); a Ray-trained checkpoint's records are checked in
tests/test_init_from_teacher.py.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_teacher_overrides

from cluster.cli.main import main
from student_trainer.checkpoint import (OPEN_CLIP_CONFIG_FILE, driver_command, load_student, provenance,
                                        save_student)
from student_trainer.config import DataConfig, ModelConfig, TeacherSourceConfig, TrainConfig
from student_trainer.data.write_shards import CLASS_NAMES, write_digits_shards
from student_trainer.export import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE, export_checkpoint
from student_trainer.factory import create_student, open_clip_model_cfg
from teacher_service.atomic_files import TMP_MARK

STUDENT = ModelConfig(name="digits-student")

# Runs in a fresh interpreter: open_clip's local-dir loader, open_clip's own transforms and
# tokenizer, the shards read with tarfile + PIL; zero-shot top-1 with ties counted as wrong (as
# student_trainer.evaluate does), images and prompts encoded in batches of 256 (as it does).
PLAIN_OPEN_CLIP = r"""
import glob, io, json, sys, tarfile
import numpy as np, open_clip, torch
from PIL import Image

folder, data, out = sys.argv[1:4]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
model.eval()
info = json.load(open(data + "/dataset.json"))
keys, pngs, labels = [], {}, {}
for shard in sorted(glob.glob(data + "/val-*.tar")):
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            if ext == "png":
                keys.append(key)
                pngs[key] = tar.extractfile(member).read()
            elif ext == "cls":
                labels[key] = int(tar.extractfile(member).read())

def encode(encoder, inputs):
    return torch.cat([encoder(inputs[i:i + 256], normalize=True).float() for i in range(0, len(inputs), 256)])

with torch.no_grad():
    pixels = torch.stack([preprocess(Image.open(io.BytesIO(pngs[k]))) for k in keys])
    images = encode(model.encode_image, pixels)
    names, templates = info["class_names"], info["templates"]
    prompts = tokenizer([t.format(n) for n in names for t in templates])
    classes = encode(model.encode_text, prompts).view(len(names), len(templates), -1).mean(dim=1)
    classes = torch.nn.functional.normalize(classes, dim=-1)
scores = images @ classes.T
truth = torch.tensor([labels[k] for k in keys])
right = scores.gather(1, truth[:, None])[:, 0]
best_wrong = scores.scatter(1, truth[:, None], float("-inf")).max(dim=1).values
project = sorted(m for m in sys.modules if m.split(".")[0] in ("teacher_service", "student_trainer", "cluster"))
np.save(out + "/pixels.npy", pixels[:8].numpy())
json.dump({"zero_shot_top1": float((right > best_wrong).float().mean()), "samples": len(keys),
           "predictions": dict(zip(keys, scores.argmax(dim=1).tolist())), "project_modules": project,
           "model_class": type(model).__name__, "context_length": int(tokenizer.context_length)},
          open(out + "/result.json", "w"))
"""


def plain_open_clip(folder: Path, data: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-I", "-c", PLAIN_OPEN_CLIP, str(folder), str(data), str(out)],
                          capture_output=True, text=True, timeout=600, cwd=out)
    assert proc.returncode == 0, proc.stderr
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Digits shards at 48 px: evaluation resizes them to the student's 32, so the resize matters."""
    out = tmp_path_factory.mktemp("digits48")
    write_digits_shards(out, image_size=48, samples_per_shard=200)
    return out


def run_cfg(data: Path, storage: Path) -> TrainConfig:
    return TrainConfig(run_name="export-test", storage_path=str(storage), model=STUDENT,
                       data=DataConfig(train_shards=str(data / "train-*.tar"), val_shards=str(data / "val-*.tar")),
                       teacher=TeacherSourceConfig(mode="remote", app_name="kd-teacher"),
                       losses={"clip": 1.0, "icl": 1.0})


def make_checkpoint(folder: Path, data: Path | None = None, seed: int = 0, cfg: ModelConfig = STUDENT) -> Path:
    """A checkpoint as a run leaves it: weights, configs, and with `data` the run's metrics and provenance."""
    torch.manual_seed(seed)
    save_student(create_student(cfg), cfg, folder)
    if data is not None:
        (folder / "metrics.json").write_text(json.dumps({"epoch": 3, "step": 42, "loss": 1.25, "clip_loss": 0.75}))
        record = provenance(run_cfg(data, folder.parent), {"fingerprint": "0123456789abcdef", "model": "ViT-B-32"},
                            {"from": "random"}, command="kd train --config run.yaml")
        (folder / "provenance.json").write_text(json.dumps(record))
    return folder


@pytest.fixture(scope="module")
def exported(data, tmp_path_factory) -> dict:
    """A checkpoint, `kd eval` on the val shards (which records its figures), `kd export`."""
    root = tmp_path_factory.mktemp("exported")
    checkpoint = make_checkpoint(root / "run" / "checkpoint_000003", data)
    evaluation = run_kd(["eval", "--checkpoint", str(checkpoint), "--shards", str(data / "val-*.tar")])
    printed = run_kd(["export", str(checkpoint), "--out", str(root / "student")])
    return {"checkpoint": checkpoint, "out": root / "student", "eval": json.loads(evaluation), "printed": printed}


def run_kd(argv: list[str], code: int = 0) -> str:
    """`kd ARGV` in this process: its stdout, or (expecting an error) its stderr."""
    import contextlib

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(argv) == code, err.getvalue()
    return out.getvalue() if code == 0 else err.getvalue()


def project_predictions(checkpoint: Path, data: Path) -> dict[str, int]:
    """Each val image's zero-shot class as student_trainer.evaluate scores it."""
    from student_trainer.data.batches import eval_set
    from student_trainer.evaluate import _image_features, class_embeddings
    from student_trainer.factory import create_tokenizer
    from teacher_service.shards import load_dataset_info, resolve_shards

    model, cfg = load_student(checkpoint)
    tokenizer = create_tokenizer(model, cfg)
    shards = resolve_shards(str(data / "val-*.tar"))
    info = load_dataset_info(shards)
    batch = eval_set(shards, image_size=32, tokenizer=tokenizer)
    with torch.no_grad():
        images = _image_features(model, batch.images, batch_size=256, device="cpu")
        classes = class_embeddings(model, info["class_names"], info["templates"], tokenizer=tokenizer,
                                   batch_size=256, device="cpu")
    return dict(zip(batch.keys, (images @ classes.T).argmax(dim=1).tolist()))


@pytest.mark.slow  # a fresh process with plain open_clip scores 360 samples
def test_plain_open_clip_loads_the_export_and_scores_what_kd_eval_scores(exported, data, tmp_path):
    out = exported["out"]
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, CARD_FILE])
    assert f"local-dir:{out}" in exported["printed"]
    result = plain_open_clip(out, data, tmp_path)
    assert result["project_modules"] == []
    assert (result["model_class"], result["context_length"]) == ("CLIP", 16)
    assert result["samples"] == exported["eval"]["samples"] == 360
    assert result["zero_shot_top1"] == exported["eval"]["zero_shot_top1"]
    assert result["predictions"] == project_predictions(exported["checkpoint"], data)
    assert len(set(result["predictions"].values())) > 1  # a model that says one class everywhere proves little


def test_open_clip_transforms_give_the_pixels_kd_eval_gives(exported):
    """open_clip's eval transform from the export's preprocess_cfg against the project's evaluation
    path (decode, plain view at the model's size, to_model_input): equal bits, for the digits (48 px
    RGB PNGs) and for other sizes, shapes and modes."""
    import open_clip

    from teacher_service.contract.augment import augment_view
    from teacher_service.contract.preprocess import preprocess_spec, to_model_input
    from teacher_service.shards.images import decode_rgb8

    _, _, transform = open_clip.create_model_and_transforms(f"local-dir:{exported['out']}")
    student, _ = load_student(exported["checkpoint"])
    spec = preprocess_spec(student)
    rng = np.random.default_rng(0)
    sizes = [(48, 48), (37, 53), (90, 20), (32, 32), (16, 16)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    images.append(Image.fromarray(rng.integers(0, 256, (41, 29), dtype=np.uint8), mode="L"))
    for image in images:
        encoded = io.BytesIO()
        image.save(encoded, format="PNG")
        pixels = decode_rgb8(encoded.getvalue())
        ours = to_model_input(augment_view(pixels, "k", 0, 0, spec.image_size[0], train=False)[None], spec)[0]
        theirs = transform(Image.open(io.BytesIO(encoded.getvalue())))
        assert torch.equal(ours, theirs), (image.mode, image.size)


def test_the_config_is_the_whole_open_clip_config_and_the_card_says_what_the_checkpoint_records(exported):
    config = json.loads((exported["out"] / CONFIG_FILE).read_text())
    assert config["model_cfg"] == {"embed_dim": 64,
                                   "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2,
                                                  "head_width": 32},
                                   "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2,
                                                "layers": 2}}
    assert config["preprocess_cfg"] == {"size": [32, 32], "mean": [0.48145466, 0.4578275, 0.40821073],
                                        "std": [0.26862954, 0.26130258, 0.27577711],
                                        "interpolation": "bilinear", "resize_mode": "squash"}
    card = (exported["out"] / CARD_FILE).read_text()
    params = sum(p.numel() for p in create_student(STUDENT).parameters())
    for fact in (f"{params:,} parameters", "`digits-student`", "fingerprint `0123456789abcdef`", "mode remote",
                 "clip 1, icl 1", ", ".join(CLASS_NAMES), "step: 42", "clip_loss: 0.75",
                 f"{exported['eval']['zero_shot_top1']:.4f}", "`kd train --config run.yaml`", "\"run_name\": \"export-test\"",
                 'create_model_and_transforms("local-dir:student")'):
        assert fact in card, fact
    assert "not recorded" not in card


def test_an_old_checkpoint_exports_the_same_folder(exported, tmp_path):
    """A checkpoint written before the open_clip config and the provenance were recorded: the
    config is resolved from its preset at export time."""
    import shutil

    from safetensors.torch import load_file

    old = tmp_path / "old"
    shutil.copytree(exported["checkpoint"], old)
    for name in (OPEN_CLIP_CONFIG_FILE, "provenance.json", "metrics.json", "evaluation.json"):
        (old / name).unlink()
    export_checkpoint(old, tmp_path / "out")
    assert (tmp_path / "out" / CONFIG_FILE).read_text() == (exported["out"] / CONFIG_FILE).read_text()
    ours, theirs = load_file(tmp_path / "out" / WEIGHTS_FILE), load_file(exported["out"] / WEIGHTS_FILE)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    card = (tmp_path / "out" / CARD_FILE).read_text()
    assert card.count("not recorded") == 4 and "none recorded: `kd eval" in card


def test_create_model_arguments_among_the_overrides_are_resolved_as_open_clip_applies_them(tmp_path):
    """`force_*` arguments set their config entry (quick_gelu here changes every activation);
    others (`precision`) are no part of the config."""
    import open_clip

    cfg = ModelConfig(name="ViT-B-32", overrides={**tiny_teacher_overrides(), "force_quick_gelu": True,
                                                  "force_patch_dropout": 0.0, "precision": "fp32"})
    resolved = open_clip_model_cfg(cfg)
    assert resolved["quick_gelu"] is True and resolved["vision_cfg"] == tiny_teacher_overrides()["vision_cfg"]
    assert "precision" not in resolved and not any(k.startswith("force_") for k in resolved)
    export_checkpoint(make_checkpoint(tmp_path / "ckpt", cfg=cfg), tmp_path / "out")
    student, _ = load_student(tmp_path / "ckpt")
    model = open_clip.create_model(f"local-dir:{tmp_path / 'out'}").eval()
    pixels, tokens = torch.randn(2, 3, 32, 32), torch.randint(0, 49408, (2, 16))
    with torch.no_grad():
        assert torch.equal(model.encode_image(pixels), student.encode_image(pixels))
        assert torch.equal(model.encode_text(tokens), student.encode_text(tokens))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TMP_MARK in p.name)


@pytest.fixture()
def checkpoint(tmp_path) -> Path:
    return make_checkpoint(tmp_path / "run" / "checkpoint_000001")


def test_bad_input_is_one_error_line_and_nothing_written(checkpoint, tmp_path):
    out = tmp_path / "out"
    cases = {
        "not a folder": ([str(tmp_path / "nowhere"), "--out", str(out)], "no such checkpoint folder"),
        "a run folder": ([str(checkpoint.parent), "--out", str(out)],
                         f"not a student checkpoint (no model.pt, model_config.json); a run folder? its latest "
                         f"checkpoint is {checkpoint}"),
        "into itself": ([str(checkpoint), "--out", str(checkpoint.parent), "--force"], "holds the checkpoint"),
    }
    for name, (argv, message) in cases.items():
        err = run_kd(["export", *argv], code=2)
        assert err.startswith("kd: error: ") and message in err and err.count("\n") == 1, (name, err)
        assert not out.exists() and leftovers(tmp_path) == [] and leftovers(checkpoint.parent) == []
    assert sorted(p.name for p in checkpoint.iterdir()) == ["model.pt", "model_config.json", OPEN_CLIP_CONFIG_FILE]


def test_weights_that_do_not_fit_the_config_export_nothing(checkpoint, tmp_path):
    wrong = make_checkpoint(tmp_path / "wrong", cfg=ModelConfig(name="digits-teacher"))
    (checkpoint / "model.pt").write_bytes((wrong / "model.pt").read_bytes())
    err = run_kd(["export", str(checkpoint), "--out", str(tmp_path / "out")], code=2)
    assert err.startswith(f"kd: error: checkpoint '{checkpoint / 'model.pt'}' does not match the model architecture")
    assert "shape mismatches" in err and err.count("\n") == 1
    (checkpoint / "model.pt").write_bytes(b"not a torch file")
    assert "could not be read" in run_kd(["export", str(checkpoint), "--out", str(tmp_path / "out")], code=2)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_an_architecture_with_a_hugging_face_tokenizer_is_refused(checkpoint, tmp_path):
    recorded = json.loads((checkpoint / OPEN_CLIP_CONFIG_FILE).read_text())
    recorded["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = "timm/ViT-B-16-SigLIP"
    (checkpoint / OPEN_CLIP_CONFIG_FILE).write_text(json.dumps(recorded))
    err = run_kd(["export", str(checkpoint), "--out", str(tmp_path / "out")], code=2)
    assert "Hugging Face tokenizer 'timm/ViT-B-16-SigLIP'" in err and not (tmp_path / "out").exists()


def test_an_existing_out_is_refused_unless_forced_then_replaced_whole(checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("from before")
    err = run_kd(["export", str(checkpoint), "--out", str(out)], code=2)
    assert f"kd: error: {out} already exists; nothing written (kd export --force replaces it)\n" == err
    assert [p.name for p in out.iterdir()] == ["stale.txt"]
    run_kd(["export", str(checkpoint), "--out", str(out), "--force"])
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, CARD_FILE])
    assert leftovers(tmp_path) == []
    (tmp_path / "file").write_text("x")
    assert "exists and is not a folder" in run_kd(["export", str(checkpoint), "--out", str(tmp_path / "file"),
                                                   "--force"], code=2)


def test_an_interrupted_export_leaves_nothing_and_keeps_what_it_would_replace(checkpoint, tmp_path, monkeypatch):
    import student_trainer.export

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # after the config and the weights are written, before the card

    monkeypatch.setattr(student_trainer.export, "model_card", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "mine.txt").write_text("mine")
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(checkpoint, tmp_path / "kept", force=True)
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["mine.txt"] and leftovers(tmp_path) == []


def test_a_checkpoint_records_its_data_its_command_and_the_preprocessing_it_trained_with(data, tmp_path, monkeypatch):
    record = provenance(run_cfg(data, tmp_path), {"fingerprint": "f"}, command="kd demo")
    assert record["data"]["class_names"] == CLASS_NAMES and record["data"]["templates"]
    assert record["command"] == "kd demo" and record["config"]["model"]["name"] == "digits-student"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/kd", "train", "--run-name", "a b"])
    assert driver_command() == "kd train --run-name 'a b'"

    # a student created with another normalisation (a pretrained tag's) is evaluated with it
    from open_clip.model import set_model_preprocess_cfg

    from teacher_service.contract.preprocess import preprocess_spec

    model = create_student(STUDENT)
    set_model_preprocess_cfg(model, {**model.visual.preprocess_cfg, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})
    save_student(model, STUDENT, tmp_path / "ckpt")
    assert preprocess_spec(load_student(tmp_path / "ckpt")[0]).mean == (0.5, 0.5, 0.5)
