"""Weight inheritance (TinyCLIP): a student that starts from its teacher's weights.

TinyCLIP (Wu et al., ICCV 2023) reports that a student initialised from the teacher (blocks
taken from the teacher's stacks, every tensor cut to the student's widths) trains 1.4-7.8x
faster to the same accuracy than one that starts at random. This module maps an open_clip
teacher's state dict onto a student of the same family, tensor by tensor:

- **blocks** (`...resblocks.<i>.`): student block i takes teacher block `block_map(k, n)[i]` of
  the same stack: "interval" (i·⌊n/k⌋, TinyCLIP's `interval_front`) or "first" (block i).
- **widths**: every dimension where the student is smaller takes the teacher's leading slice
  (`teacher[:n]`); equal dimensions are copied whole.
- **packed attention** (`attn.in_proj_weight` [3W, W], `attn.in_proj_bias` [3W]): q, k and v
  are sliced one by one; a leading slice of the packed rows would give the student's k and v
  rows of the teacher's q. With equal head widths this takes the teacher's first heads whole;
  with other head widths the same rows are regrouped into the student's heads.

Refused with an `InheritanceError` naming the first student parameter that cannot be taken:
an image tower that is not an open_clip ViT on either side (ConvNeXt / timm trunks, ResNet), a
student deeper than the teacher in a stack, a student wider than the teacher in any dimension,
a parameter the teacher lacks or holds with another rank, a different patch size (the patch
conv's kernel and channels must be equal), a different image grid (the visual positional
embedding's token count must be equal: positions are not interpolated, so every inherited tensor
stays an exact slice of a teacher tensor) and a different vocabulary. A shorter text context
is fine: its positional embeddings are the teacher's first positions.

The driver checks a run on shapes alone (`check_inheritable`, models built on the meta device,
no weights read); each worker of a fresh run then loads the teacher on the CPU and copies its
weights (`inherit_from_teacher`).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from student_trainer.config import INHERIT_LAYERS, TrainConfig
from teacher_service.config import TeacherConfig

_BLOCK = re.compile(r"^(?P<stack>.*\bresblocks)\.(?P<index>\d+)\.(?P<rest>.+)$")
_PACKED = (".attn.in_proj_weight", ".attn.in_proj_bias")
_VIT_BLOCKS = "visual.transformer.resblocks."


class InheritanceError(ValueError):
    """A student parameter the teacher's weights cannot initialise; the message names it and why."""


@dataclass(frozen=True)
class Inheritance:
    """The student's new state dict and what was taken: the checkpoint provenance records it."""

    state: dict[str, torch.Tensor]
    layers: str
    blocks: dict[str, list[int]]  # block stack -> the teacher block each student block took
    teacher_depth: dict[str, int]
    sliced: int  # tensors cut to a smaller shape
    copied: int  # tensors taken whole

    def record(self) -> dict:
        return {"layers": self.layers, "blocks": dict(self.blocks), "teacher_depth": dict(self.teacher_depth),
                "tensors_sliced": self.sliced, "tensors_copied": self.copied}


def block_map(student_depth: int, teacher_depth: int, layers: str = "interval") -> list[int]:
    """The teacher block each of `student_depth` blocks takes; a deeper student has no answer."""
    if layers not in INHERIT_LAYERS:
        raise ValueError(f"inherit layers {layers!r}: expected one of {INHERIT_LAYERS}")
    if not 0 < student_depth <= teacher_depth:
        raise ValueError(f"a stack of {student_depth} blocks cannot take blocks of a {teacher_depth}-block stack")
    step = teacher_depth // student_depth if layers == "interval" else 1
    return [i * step for i in range(student_depth)]


def stack_depths(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Blocks per stack (`visual.transformer.resblocks`, `transformer.resblocks`, ...)."""
    depths: dict[str, int] = {}
    for name in state:
        match = _BLOCK.match(name)
        if match:
            depths[match["stack"]] = max(depths.get(match["stack"], 0), int(match["index"]) + 1)
    return depths


def inherit_state(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                  layers: str = "interval") -> Inheritance:
    """Every student tensor taken from `teacher` by the module's rules, or InheritanceError.

    Checked in this order, so the error names the parameter that settles it: the image towers'
    family, each stack's depth, then each tensor in the student's own order.
    """
    _check_image_towers(student, teacher)
    depths, teacher_depths = stack_depths(student), stack_depths(teacher)
    blocks = _block_maps(student, depths, teacher_depths, layers)
    state, sliced = {}, 0
    for name, target in student.items():
        source = _teacher_name(name, blocks)
        state[name] = _taken(name, target, teacher.get(source), source)
        sliced += tuple(state[name].shape) != tuple(teacher[source].shape)
    return Inheritance(state, layers, blocks, {s: teacher_depths[s] for s in blocks}, sliced, len(state) - sliced)


def _image_tower(state: dict[str, torch.Tensor]) -> str | None:
    """'vit' (open_clip VisionTransformer), 'other' (timm trunk, ResNet), None (no image tower)."""
    names = [n for n in state if n.startswith("visual.")]
    if not names:
        return None
    return "vit" if any(n.startswith(_VIT_BLOCKS) for n in names) else "other"


def _check_image_towers(student: dict, teacher: dict) -> None:
    kinds = {"student": _image_tower(student), "teacher": _image_tower(teacher)}
    if kinds["student"] is None or kinds == {"student": "vit", "teacher": "vit"}:
        return
    first = next(n for n in student if n.startswith("visual."))
    words = {"vit": "is an open_clip ViT", "other": "is not an open_clip ViT", None: "is absent"}
    raise InheritanceError(
        f"{first}: only open_clip ViT image towers ({_VIT_BLOCKS}*) inherit; the student's image tower "
        f"{words[kinds['student']]}, the teacher's {words[kinds['teacher']]} (another family: train the "
        f"student from random or pretrained weights instead)")


def _block_maps(student: dict, depths: dict[str, int], teacher_depths: dict[str, int],
                layers: str) -> dict[str, list[int]]:
    maps = {}
    for stack, depth in depths.items():
        have = teacher_depths.get(stack, 0)
        if depth > have:
            first = next(n for n in student if (m := _BLOCK.match(n)) and m["stack"] == stack
                         and int(m["index"]) == have)
            raise InheritanceError(f"{first}: the student has {depth} blocks in {stack}, the teacher {have}; "
                                   "a deeper student cannot inherit")
        maps[stack] = block_map(depth, have, layers)
    return maps


def _teacher_name(name: str, blocks: dict[str, list[int]]) -> str:
    match = _BLOCK.match(name)
    if not match:
        return name
    return f"{match['stack']}.{blocks[match['stack']][int(match['index'])]}.{match['rest']}"


def _equal_dims(name: str) -> tuple[tuple[int, ...], str]:
    """Dimensions that must match exactly (a slice would change what the tensor means), and why."""
    if name == "visual.conv1.weight":
        return (1, 2, 3), "the patch embedding's input channels and kernel (the patch size) differ"
    if name == "visual.positional_embedding":
        return (0,), ("the image grids differ (image_size / patch_size); positional embeddings are not "
                      "interpolated")
    if name.endswith("token_embedding.weight"):
        return (0,), "the vocabularies differ"
    return (), ""


def _taken(name: str, target: torch.Tensor, source: torch.Tensor | None, source_name: str) -> torch.Tensor:
    """The teacher's tensor cut to `target`'s shape, or InheritanceError naming `name`."""
    if source is None:
        raise InheritanceError(f"{name}: the teacher has no {source_name!r}")
    shapes = f"student {tuple(target.shape)}, teacher {tuple(source.shape)}"
    if source.ndim != target.ndim:
        raise InheritanceError(f"{name}: tensors of different rank ({shapes})")
    equal, why = _equal_dims(name)
    if any(target.shape[d] != source.shape[d] for d in equal):
        raise InheritanceError(f"{name}: {why} ({shapes})")
    if any(s > t for s, t in zip(target.shape, source.shape)):
        raise InheritanceError(f"{name}: the student is wider than the teacher ({shapes})")
    if name.endswith(_PACKED):
        packed = source.unflatten(0, (3, -1))[(slice(None), slice(0, target.shape[0] // 3),
                                                *(slice(0, n) for n in target.shape[1:]))]
        return packed.flatten(0, 1).to(target.dtype, copy=True)
    return source[tuple(slice(0, n) for n in target.shape)].to(target.dtype, copy=True)


# --------------------------------------------------------------------------- a run's teacher
def teacher_config_for(cfg: TrainConfig) -> TeacherConfig:
    """The teacher whose weights the student inherits: `teacher.teacher` in any mode, else the
    `teacher_config` a cache's files record (`kd precompute` with a local teacher). A remote app
    cannot hand out its weights, so remote runs must name its config."""
    if cfg.teacher.teacher is not None:
        return _weights_only(cfg.teacher.teacher)
    recorded = None
    if cfg.teacher.mode.reads_cache and cfg.teacher.cache_path:
        recorded = _cache_teacher_config(cfg.teacher.cache_path, cfg.teacher.cache_teacher)
        if recorded is not None:
            return _weights_only(TeacherConfig(**{k: recorded[k] for k in ("model", "pretrained", "overrides", "seed")
                                                  if k in recorded}))
    where = (f"; cache {cfg.teacher.cache_path} records none (it was precomputed from a running app, or is empty)"
             if cfg.teacher.mode.reads_cache else "")
    raise ValueError(f"model.init_from_teacher needs the teacher's config to load its weights: give teacher.teacher "
                     f"(a TeacherConfig of the run's teacher){where}")


def _cache_teacher_config(path: str, teacher: str | None) -> dict | None:
    """The first `teacher_config` the row files of `teacher` in a cache record (read from the file footers only)."""
    from teacher_service.cache.store import read_meta, row_files, teacher_dir

    if not os.path.isdir(path):
        return None
    for file in row_files(teacher_dir(path, teacher)):
        try:
            recorded = read_meta(file).get("teacher_config")
        except FileNotFoundError:  # merged away by a concurrent compaction
            continue
        if recorded:
            return recorded
    return None


def _weights_only(cfg: TeacherConfig) -> TeacherConfig:
    """What decides the weights (model, pretrained, overrides, seed), loaded on the CPU in full
    precision with the process's threads and cores left as they are."""
    return TeacherConfig(model=cfg.model, pretrained=cfg.pretrained, overrides=dict(cfg.overrides), seed=cfg.seed,
                         device="cpu", torch_threads=None)


def architecture_state(arch: str, overrides: dict) -> dict[str, torch.Tensor]:
    """The state dict of an open_clip architecture on the meta device: shapes without memory or init cost."""
    from teacher_service.model_check import meta_model

    return meta_model(arch, **overrides).state_dict()


def check_inheritable(cfg: TrainConfig) -> dict:
    """On the driver: the inheritance a fresh run would do, on shapes alone; raises InheritanceError
    (or ValueError when the teacher's config is unknown) before any worker starts."""
    from student_trainer.factory import resolve_model

    teacher = teacher_config_for(cfg)
    arch, overrides = resolve_model(cfg.model)
    done = inherit_state(architecture_state(arch, overrides), architecture_state(teacher.model, teacher.overrides),
                         cfg.model.inherit_layers)
    return done.record()


def inherit_from_teacher(student: torch.nn.Module, cfg: TrainConfig) -> dict:
    """Load the run's teacher on the CPU, copy its weights into `student`; returns the record the
    checkpoint provenance keeps (teacher model and fingerprint, the blocks taken)."""
    from teacher_service.model import load_teacher

    teacher = load_teacher(teacher_config_for(cfg))
    done = inherit_state(student.state_dict(), teacher.model.state_dict(), cfg.model.inherit_layers)
    student.load_state_dict(done.state)
    return {"from": "teacher", "teacher_model": teacher.name, "teacher_fingerprint": teacher.fingerprint,
            **done.record()}
