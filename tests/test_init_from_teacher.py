"""Weight inheritance (TinyCLIP): a student initialised from its teacher's weights.

The expected values are written out plainly here (which teacher block, which slice), not taken
from `student_trainer.inherit`. Architectures are the digits presets (teacher: vision width 192,
4 blocks, text width 128, 3 blocks, embed 128; student: 64 / 2 / 64 / 2 / 64), random init;
incompatible pairs are built on the meta device (shapes only).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import train_shards

from student_trainer.config import DataConfig, ModelConfig, OptimConfig, TeacherSourceConfig, TrainConfig
from student_trainer.factory import create_student, resolve_model
from student_trainer.inherit import (
    InheritanceError,
    architecture_state,
    block_map,
    inherit_state,
    teacher_config_for,
)
from teacher_service.config import TeacherConfig

VISUAL, TEXT = "visual.transformer.resblocks", "transformer.resblocks"
TEACHER_ARCH, TEACHER_OVERRIDES = resolve_model(ModelConfig(name="digits-teacher"))
TEACHER = TeacherConfig(model=TEACHER_ARCH, overrides=TEACHER_OVERRIDES, seed=0, torch_threads=1)


def created(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_student(ModelConfig(name=name))


@pytest.fixture(scope="module")
def teacher() -> dict[str, torch.Tensor]:
    return created("digits-teacher", 1).state_dict()


@pytest.fixture(scope="module")
def student() -> torch.nn.Module:
    return created("digits-student", 2)


@pytest.fixture(scope="module")
def inherited(student, teacher):
    return inherit_state(student.state_dict(), teacher)


def student_shape(**changes) -> dict[str, torch.Tensor]:
    """The digits student's state on the meta device, with `vision_cfg` / `text_cfg` entries changed."""
    _, overrides = resolve_model(ModelConfig(name="digits-student"))
    for tower, values in changes.items():
        overrides[tower] = {**overrides[tower], **values}
    return architecture_state("ViT-B-32", overrides)


def test_blocks_taken_from_the_teacher():
    assert block_map(2, 4) == [0, 2]  # TinyCLIP's interval: i * (n // k)
    assert block_map(2, 3) == [0, 1]
    assert block_map(3, 12) == [0, 4, 8]
    assert block_map(2, 4, "first") == [0, 1]
    with pytest.raises(ValueError):
        block_map(5, 4)


def test_named_student_tensors_are_teacher_slices(inherited, teacher):
    s, t = inherited.state, teacher
    # image tower: student block 1 is teacher block 2 (4 blocks // 2), widths 192 -> 64, MLP 768 -> 256
    assert torch.equal(s[f"{VISUAL}.1.mlp.c_fc.weight"], t[f"{VISUAL}.2.mlp.c_fc.weight"][:256, :64])
    assert torch.equal(s[f"{VISUAL}.1.mlp.c_proj.weight"], t[f"{VISUAL}.2.mlp.c_proj.weight"][:64, :256])
    assert torch.equal(s[f"{VISUAL}.0.ln_1.bias"], t[f"{VISUAL}.0.ln_1.bias"][:64])
    # packed q, k, v (teacher rows 0:192, 192:384, 384:576) are sliced one by one
    w, tw = s[f"{VISUAL}.1.attn.in_proj_weight"], t[f"{VISUAL}.2.attn.in_proj_weight"]
    assert torch.equal(w[0:64], tw[0:64, :64])
    assert torch.equal(w[64:128], tw[192:256, :64])
    assert torch.equal(w[128:192], tw[384:448, :64])
    b, tb = s[f"{VISUAL}.1.attn.in_proj_bias"], t[f"{VISUAL}.2.attn.in_proj_bias"]
    assert torch.equal(b, torch.cat([tb[0:64], tb[192:256], tb[384:448]]))
    # text tower: 3 teacher blocks, 2 student blocks -> blocks 0 and 1; width 128 -> 64
    assert torch.equal(s[f"{TEXT}.1.attn.out_proj.weight"], t[f"{TEXT}.1.attn.out_proj.weight"][:64, :64])
    assert torch.equal(s[f"{TEXT}.1.attn.in_proj_weight"][64:128], t[f"{TEXT}.1.attn.in_proj_weight"][128:192, :64])
    # embeddings, class token, positions (same 4x4 grid + CLS), patch conv, projections, ln, scale
    assert torch.equal(s["token_embedding.weight"], t["token_embedding.weight"][:, :64])
    assert torch.equal(s["positional_embedding"], t["positional_embedding"][:, :64])
    assert torch.equal(s["visual.positional_embedding"], t["visual.positional_embedding"][:, :64])
    assert torch.equal(s["visual.class_embedding"], t["visual.class_embedding"][:64])
    assert torch.equal(s["visual.conv1.weight"], t["visual.conv1.weight"][:64])
    assert torch.equal(s["visual.proj"], t["visual.proj"][:64, :64])
    assert torch.equal(s["text_projection"], t["text_projection"][:64, :64])
    assert torch.equal(s["ln_final.weight"], t["ln_final.weight"][:64])
    assert torch.equal(s["logit_scale"], t["logit_scale"])
    assert inherited.record()["blocks"] == {VISUAL: [0, 2], TEXT: [0, 1]}
    assert inherited.record()["teacher_depth"] == {VISUAL: 4, TEXT: 3}


def expected_source(name: str, blocks: dict[str, dict[int, int]]) -> str:
    for stack, chosen in blocks.items():
        if name.startswith(stack + "."):
            index, rest = name[len(stack) + 1:].split(".", 1)
            return f"{stack}.{chosen[int(index)]}.{rest}"
    return name


def expected_tensor(name: str, shape: torch.Size, source: torch.Tensor) -> torch.Tensor:
    lead = tuple(slice(0, n) for n in shape)
    if name.endswith(("in_proj_weight", "in_proj_bias")):
        return torch.cat([part[(slice(0, shape[0] // 3), *lead[1:])] for part in source.chunk(3)])
    return source[lead]


@pytest.mark.parametrize("layers, blocks", [
    ("interval", {VISUAL: {0: 0, 1: 2}, TEXT: {0: 0, 1: 1}}),
    ("first", {VISUAL: {0: 0, 1: 1}, TEXT: {0: 0, 1: 1}}),
])
def test_every_student_tensor_is_its_teacher_slice(student, teacher, layers, blocks):
    done = inherit_state(student.state_dict(), teacher, layers)
    assert set(done.state) == set(student.state_dict())
    for name, value in done.state.items():
        assert value.shape == student.state_dict()[name].shape, name
        source = teacher[expected_source(name, blocks)]
        assert torch.equal(value, expected_tensor(name, value.shape, source)), name
    loaded = created("digits-student", 3)
    loaded.load_state_dict(done.state)
    out = loaded(torch.zeros(2, 3, 32, 32), torch.ones(2, 16, dtype=torch.long))
    assert torch.isfinite(out["image_features"]).all() and torch.isfinite(out["text_features"]).all()


def test_the_same_architecture_inherits_an_exact_copy(teacher):
    twin = created("digits-teacher", 4)
    twin.load_state_dict(inherit_state(twin.state_dict(), teacher).state)
    assert all(torch.equal(twin.state_dict()[k], v) for k, v in teacher.items())


@pytest.mark.parametrize("student_state, teacher_arch, first_bad, why", [
    (lambda: student_shape(), "RN50", "visual.class_embedding", "only open_clip ViT image towers"),
    (lambda: architecture_state("convnext_base", {}), "digits", "visual.trunk.stem.0.weight", "not an open_clip ViT"),
    (lambda: student_shape(vision_cfg={"width": 256}), "digits", "visual.class_embedding", "wider than the teacher"),
    (lambda: student_shape(vision_cfg={"layers": 6}), "digits", f"{VISUAL}.4.ln_1.weight", "6 blocks .* the teacher 4"),
    (lambda: student_shape(vision_cfg={"patch_size": 4}), "digits", "visual.positional_embedding", "image grids differ"),
    (lambda: student_shape(vision_cfg={"image_size": 64, "patch_size": 16}), "digits", "visual.conv1.weight",
     "patch size"),
    (lambda: student_shape(text_cfg={"vocab_size": 1000}), "digits", "token_embedding.weight", "vocabularies differ"),
])
def test_incompatible_pairs_name_the_first_parameter(student_state, teacher_arch, first_bad, why):
    teacher = architecture_state(*((TEACHER_ARCH, TEACHER_OVERRIDES) if teacher_arch == "digits" else (teacher_arch, {})))
    with pytest.raises(InheritanceError, match=rf"^{first_bad}: .*{why}"):
        inherit_state(student_state(), teacher)


# --------------------------------------------------------------------------- configuration and the driver
def run_cfg(shards: str, storage: Path, mode: str = "none", *, teacher=TEACHER, epochs: int = 1,
            **model) -> TrainConfig:
    return TrainConfig(
        run_name="inherit", storage_path=str(storage),
        model=ModelConfig(name="digits-student", init_from_teacher=True, **model),
        data=DataConfig(train_shards=shards, image_size=32, batch_size=8, shuffle_buffer=20),
        teacher=TeacherSourceConfig(mode=mode, teacher=teacher, cache_path=str(storage / "cache")),
        losses={"clip": 1.0}, optim=OptimConfig(lr=0.0, warmup_steps=0), epochs=epochs, max_steps_per_epoch=1,
        num_workers=1, cpus_per_worker=1, torch_threads=1, log_every_steps=0, max_failures=0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return train_shards(tmp_path_factory, samples_per_shard=40, name="inherit")


def test_config_refuses_pretrained_with_inheritance_and_unknown_layers(shards, tmp_path):
    with pytest.raises(ValueError, match="model.init_from_teacher and model.pretrained"):
        run_cfg(shards, tmp_path, pretrained="openai").validate()
    with pytest.raises(ValueError, match=r"model.inherit_layers 'even'"):
        run_cfg(shards, tmp_path, inherit_layers="even").validate()


def test_the_teacher_config_comes_from_the_run_or_the_cache(shards, tmp_path):
    from teacher_service.cache.store import make_meta, rows_table, write_table_atomic

    assert teacher_config_for(run_cfg(shards, tmp_path, "remote")).overrides == TEACHER_OVERRIDES
    with pytest.raises(ValueError, match="needs the teacher's config .* give teacher.teacher"):
        teacher_config_for(run_cfg(shards, tmp_path, "remote", teacher=None))
    with pytest.raises(ValueError, match="records none"):
        teacher_config_for(run_cfg(shards, tmp_path, "hybrid", teacher=None))  # a new cache
    (tmp_path / "cache").mkdir()
    meta = make_meta({"fingerprint": "0123456789abcdef", "embed_dim": 4}, {}, kind="shard",
                     teacher_config={**TEACHER.to_dict(), "seed": 7})
    write_table_atomic(rows_table(meta, ["k"], 0, np.zeros((1, 4)), np.zeros((1, 4)), [1], [2]),
                       str(tmp_path / "cache" / "shard.parquet"))
    recorded = teacher_config_for(run_cfg(shards, tmp_path, "cache", teacher=None))
    assert (recorded.model, recorded.overrides, recorded.seed, recorded.device) == (
        TEACHER_ARCH, TEACHER_OVERRIDES, 7, "cpu")


def test_the_driver_refuses_an_incompatible_teacher_before_ray(shards, tmp_path):
    import ray

    from student_trainer.preflight import check_run

    was_up = ray.is_initialized()
    wide = TeacherConfig(model=TEACHER_ARCH, overrides={**TEACHER_OVERRIDES, "embed_dim": 32})
    with pytest.raises(InheritanceError, match=r"^text_projection: the student is wider"):
        check_run(run_cfg(shards, tmp_path, "inline", teacher=wide))
    with pytest.raises(ValueError, match="needs the teacher's config"):
        check_run(run_cfg(shards, tmp_path, "none", teacher=None))
    check_run(run_cfg(shards, tmp_path, "inline"))
    (tmp_path / "inherit" / "checkpoint_2026-12-02_00-00-00.000000").mkdir(parents=True)
    check_run(run_cfg(shards, tmp_path, "inline", teacher=wide))  # a resume does not inherit: not checked
    assert ray.is_initialized() == was_up


def test_kd_train_flags_set_inheritance():
    from cluster.cli import build_parser
    from cluster.cli.train import train_config_from_args

    args = ["train", "--train-shards", "x", "--init-from-teacher", "--inherit-layers", "first"]
    cfg = train_config_from_args(build_parser().parse_args(args))
    assert (cfg.model.init_from_teacher, cfg.model.inherit_layers) == (True, "first")
    cfg = train_config_from_args(build_parser().parse_args(["train", "--train-shards", "x"]))
    assert (cfg.model.init_from_teacher, cfg.model.inherit_layers) == (False, "interval")


# --------------------------------------------------------------------------- a run (Ray Train)
def checkpoint_of(result) -> tuple[dict[str, torch.Tensor], dict]:
    with result.checkpoint.as_directory() as d:
        return (torch.load(Path(d) / "model.pt", map_location="cpu", weights_only=True),
                json.loads((Path(d) / "provenance.json").read_text()))


@pytest.mark.ray
def test_a_run_starts_from_the_inherited_weights_and_a_resume_keeps_its_own(ray_cluster, shards, tmp_path):
    """lr 0 keeps the weights where they started, so the checkpoint after a step shows the start.

    The resume names a teacher whose weights cannot be loaded (a file that is not a
    checkpoint): a resume that loaded the teacher again would fail; it restores its checkpoint instead."""
    from student_trainer.train import run_training
    from teacher_service.model import load_teacher

    frozen = load_teacher(TEACHER)
    teacher = frozen.model.state_dict()
    weights, record = checkpoint_of(run_training(run_cfg(shards, tmp_path)))
    assert torch.equal(weights[f"{VISUAL}.1.mlp.c_fc.weight"], teacher[f"{VISUAL}.2.mlp.c_fc.weight"][:256, :64])
    blocks = {VISUAL: {0: 0, 1: 2}, TEXT: {0: 0, 1: 1}}
    for name, value in weights.items():
        assert torch.equal(value, expected_tensor(name, value.shape, teacher[expected_source(name, blocks)])), name
    init = record["init"]
    assert (init["from"], init["teacher_fingerprint"], init["layers"]) == ("teacher", frozen.fingerprint, "interval")
    assert init["blocks"] == {VISUAL: [0, 2], TEXT: [0, 1]}
    # the driver's command line, the data's class names and the whole config reach the provenance
    from student_trainer.checkpoint import driver_command
    from student_trainer.data.write_shards import CLASS_NAMES

    assert record["command"] == driver_command() and record["data"]["class_names"] == CLASS_NAMES
    assert record["config"]["model"]["init_from_teacher"] is True and record["config"]["run_name"] == "inherit"

    broken = tmp_path / "broken.pt"  # passes the driver's file check, fails any load
    broken.write_bytes(b"not a checkpoint")
    other = TeacherConfig(model=TEACHER_ARCH, overrides=TEACHER_OVERRIDES, pretrained=str(broken))
    result = run_training(run_cfg(shards, tmp_path, teacher=other, epochs=2))
    resumed, resumed_record = checkpoint_of(result)
    assert (result.metrics["step"], result.metrics["resumed_from_step"]) == (2, 1)
    assert all(torch.equal(resumed[k], v) for k, v in weights.items())
    assert resumed_record["init"] == init
