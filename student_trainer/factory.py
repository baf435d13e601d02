"""Creating students: any open_clip architecture, plus small presets sized for 32 px digits on a CPU."""
from __future__ import annotations

import copy
import inspect
from typing import Callable

import open_clip
import torch

from student_trainer.config import ModelConfig
from teacher_service.model_check import check_model, meta_model

_TEXT_VOCAB = 49408

# Small CLIPs for the digits demo and tests. Real runs name an open_clip architecture directly.
PRESETS: dict[str, dict] = {
    "digits-student": {
        "base": "ViT-B-32",
        "overrides": {
            "embed_dim": 64,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
            "text_cfg": {"context_length": 16, "vocab_size": _TEXT_VOCAB, "width": 64, "heads": 2, "layers": 2},
        },
    },
    "digits-teacher": {
        "base": "ViT-B-32",
        "overrides": {
            "embed_dim": 128,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 192, "layers": 4, "head_width": 32},
            "text_cfg": {"context_length": 16, "vocab_size": _TEXT_VOCAB, "width": 128, "heads": 4, "layers": 3},
        },
    },
}


# how a student's model fields are named in errors: the run config's keys
STUDENT_FIELDS = ("model.name", "model.pretrained", "model.overrides")


def resolve_model(cfg: ModelConfig) -> tuple[str, dict]:
    """(open_clip architecture name, create_model kwargs) for a preset or a plain architecture."""
    if cfg.name in PRESETS:
        preset = PRESETS[cfg.name]
        overrides = copy.deepcopy(preset["overrides"])
        overrides.update(copy.deepcopy(cfg.overrides))
        return preset["base"], overrides
    if cfg.name not in open_clip.list_models():
        check_model(cfg.name, fields=STUDENT_FIELDS, presets=PRESETS)  # names the nearest architectures and presets
    return cfg.name, copy.deepcopy(cfg.overrides)


def check_model_config(cfg: ModelConfig) -> None:
    """The student's architecture (or preset), pretrained tag or file and overrides checked against
    open_clip as a teacher's are (`teacher_service.model_check`), so a mistake fails on the driver
    instead of in every Ray Train worker."""
    arch, overrides = resolve_model(cfg)
    check_model(arch, cfg.pretrained, overrides, fields=STUDENT_FIELDS, presets=PRESETS)


# `open_clip.create_model` arguments that change the architecture, and the model_cfg entry each sets
_FORCED_ENTRIES = {"force_quick_gelu": ("quick_gelu",), "force_custom_text": ("custom_text",),
                   "force_patch_dropout": ("vision_cfg", "patch_dropout"),
                   "force_image_size": ("vision_cfg", "image_size"),
                   "force_context_length": ("text_cfg", "context_length")}


def open_clip_model_cfg(cfg: ModelConfig) -> dict:
    """The whole open_clip model config `create_student` builds for `cfg`: the architecture's own
    config with the overrides applied as `open_clip.create_model` applies them (its `force_*`
    arguments first, then every other key replacing the config's top-level entry). A checkpoint
    records it, and an export's `open_clip_config.json` holds it, so open_clip alone, without this
    project's presets, rebuilds the student."""
    arch, overrides = resolve_model(cfg)
    model_cfg = open_clip.get_model_config(arch)
    arguments = inspect.signature(open_clip.create_model).parameters
    for key, value in overrides.items():
        if key in _FORCED_ENTRIES and value not in (None, False):
            *parents, name = _FORCED_ENTRIES[key]
            target = model_cfg
            for parent in parents:
                target = target[parent]
            target[name] = value
    model_cfg.update({k: copy.deepcopy(v) for k, v in overrides.items() if k not in arguments})
    return model_cfg


def create_student(cfg: ModelConfig, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A trainable open_clip model returning feature dicts (output_dict=True)."""
    arch, overrides = resolve_model(cfg)
    model = open_clip.create_model(
        arch, pretrained=cfg.pretrained, device=device, output_dict=True, **overrides
    )
    return model


def student_shape(cfg: ModelConfig) -> torch.nn.Module:
    """The student's architecture on the meta device: its widths and context length with no memory
    and no weights, so a worker can set up what depends only on them (the tokenizer, its first
    teacher requests) before the real model is created. Leaves the global RNG as it found it, so
    the real model's initialisation does not depend on whether this was called."""
    arch, overrides = resolve_model(cfg)
    return meta_model(arch, output_dict=True, **overrides)


def create_tokenizer(model: torch.nn.Module, cfg: ModelConfig) -> Callable:
    """open_clip's tokenizer for the architecture, at the model's own context length."""
    arch, _ = resolve_model(cfg)
    return open_clip.get_tokenizer(arch, context_length=int(model.context_length))


def embed_dim(model: torch.nn.Module) -> int:
    """Width of the joint embedding space."""
    return int(model.text_projection.shape[1]) if getattr(model, "text_projection", None) is not None \
        else int(model.visual.output_dim)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
