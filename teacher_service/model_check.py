"""An open_clip model's configuration checked on the driver, before Ray or Serve starts.

A teacher (or student) that names an unknown architecture, a pretrained tag its architecture does
not have, a checkpoint file that is not there, or overrides open_clip cannot build with fails the
same way in every replica and worker: Serve would restart replicas for a minute before giving up,
Ray Train its worker group. `check_model` refuses such a configuration in the process that was
given it, with one line naming the value and the nearest valid names (`difflib`).

It reads open_clip's registry and the local file system only: a pretrained tag is looked up, never
downloaded; a checkpoint path is checked for existence and readability, never loaded; overrides are
tried by building the architecture on the meta device (no memory, no initialisation, no weights),
and the outcome is remembered per (model, overrides), so checking a config again is free.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import inspect
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

import open_clip
import torch

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
# create_model arguments the project's loaders set themselves: an override of one would clash with them
RESERVED_OVERRIDES = ("model_name", "pretrained", "output_dict", "device", "cast_dtype")
# what a meta build must never do: download tower weights, read a local-dir's or a tower's weight file
_NO_WEIGHTS = {"load_weights": False, "pretrained_image": False, "pretrained_text": False,
               "pretrained_image_path": None, "pretrained_text_path": None, "require_pretrained": False}
TEACHER_FIELDS = ("teacher model", "teacher pretrained", "teacher overrides")


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


@contextlib.contextmanager
def no_random_init_warning() -> Iterator[None]:
    """open_clip warns on the root logger that a model made without a pretrained tag is random;
    a model whose weights come from a local file next (a teacher checkpoint, a student loaded for
    evaluation), or one that has no weights at all (the meta device), is not, so that warning would mislead."""
    drop = _DropRandomInitWarning()
    logging.getLogger().addFilter(drop)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(drop)


def meta_model(model: str, **kwargs: Any) -> torch.nn.Module:
    """open_clip's `model` built on the meta device: every shape, no memory, no initialisation and no
    draw from the global RNG. Built there, not moved there: `create_model(device="meta")` alone
    initialises on the CPU first (9 s for ViT-B-32 on a busy 2-core machine, 0.4 s this way)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"), no_random_init_warning():
        return open_clip.create_model(model, pretrained=None, device="meta", **kwargs)


def check_model(model: str, pretrained: str | None = None, overrides: dict | None = None, *,
                fields: tuple[str, str, str] = TEACHER_FIELDS, presets: Iterable[str] = ()) -> None:
    """Raise ValueError naming the first of `model`, `pretrained`, `overrides` open_clip would refuse.

    `fields` name the three in messages (a student's are "model.name", ...); `presets` are names of
    this project's that stand for an architecture where the caller resolves them (offered as
    suggestions, never accepted here)."""
    schema, identifier = _parse(model, fields[0])
    if schema == "hf-hub":
        _refuse_pretrained_with_schema(model, pretrained, fields[1])
        return  # its config lives on the Hub: nothing to check without a download
    if schema == "local-dir":
        _refuse_pretrained_with_schema(model, pretrained, fields[1])
        base = _local_dir_config(identifier, fields[0])
    else:
        arch = identifier.replace("/", "-")  # as open_clip looks it up ("ViT-B/32" is ViT-B-32)
        base = open_clip.get_model_config(arch)
        if base is None:
            known = [*open_clip.list_models(), *presets]
            what = "an open_clip architecture nor a preset of this project" if presets else "an open_clip architecture"
            raise ValueError(f"{fields[0]} {model!r} is not {what}; nearest: {nearest(model, known)} "
                             f"(open_clip.list_models() names all {len(open_clip.list_models())})")
        check_pretrained(arch, pretrained, fields[1])
    if overrides:
        check_overrides(model, base, overrides, fields[2])


def _parse(model: Any, field: str) -> tuple[str | None, str]:
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"{field}: expected an open_clip architecture name, got {model!r}")
    try:
        return open_clip.factory.parse_model_name(model)
    except ValueError as e:  # an empty identifier after the schema
        raise ValueError(f"{field} {model!r}: {e}") from None


def _refuse_pretrained_with_schema(model: str, pretrained: str | None, field: str) -> None:
    if pretrained is not None:
        raise ValueError(f"{field} {pretrained!r} is given with model {model!r}, whose weights come from there "
                         "(open_clip ignores pretrained for it): set pretrained to null")


def _local_dir_config(path: str, field: str) -> dict:
    """The model config of an open_clip folder (`kd export` writes one)."""
    config = os.path.join(os.path.expanduser(path), "open_clip_config.json")
    try:
        with open(config, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{field} 'local-dir:{path}': cannot read {config} "
                         f"({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_cfg"), dict):
        raise ValueError(f"{field} 'local-dir:{path}': {config} holds no model_cfg mapping")
    return data["model_cfg"]


def check_pretrained(arch: str, pretrained: Any, field: str = "pretrained") -> None:
    """None (random init), one of `arch`'s pretrained tags in open_clip's registry, or a readable
    checkpoint file. A value that looks like a path (a directory separator, a checkpoint suffix) is
    a path; anything else is a tag."""
    if pretrained is None:
        return
    if not isinstance(pretrained, str) or not pretrained:
        raise ValueError(f"{field}: expected a pretrained tag, a checkpoint path or null, got {pretrained!r}")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if _clean_tag(pretrained) in {_clean_tag(t) for t in tags}:
        return
    path = os.path.expanduser(pretrained)
    if os.path.exists(path) or _looks_like_path(pretrained):
        _check_checkpoint_file(path, pretrained, field)
        return
    if not tags:
        raise ValueError(f"{field} {pretrained!r}: {arch} has no pretrained tags in open_clip (nor is it a "
                         "checkpoint file): use null (random init) or a checkpoint path")
    raise ValueError(f"{field} {pretrained!r} is not a pretrained tag of {arch} nor a checkpoint file; nearest tags: "
                     f"{nearest(pretrained, tags)} (open_clip.list_pretrained_tags_by_model({arch!r}) names all "
                     f"{len(tags)})")


def _clean_tag(tag: str) -> str:
    return tag.lower().replace("-", "_")  # as open_clip compares tags


def _looks_like_path(value: str) -> bool:
    return any(sep in value for sep in ("/", os.sep)) or value.lower().endswith(CHECKPOINT_SUFFIXES)


def _check_checkpoint_file(path: str, given: str, field: str) -> None:
    """Exists, is a file, and this user may read it: what can be known without loading it."""
    if os.path.isfile(path):
        if not os.access(path, os.R_OK):
            raise ValueError(f"{field} {given!r}: the checkpoint file is not readable by this user")
        return
    if os.path.isdir(path):
        raise ValueError(f"{field} {given!r} is a directory: give the checkpoint file in it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"{field} {given!r}: no such checkpoint file (its directory {folder} does not exist either)")
    files = [name for name in os.listdir(folder) if name.lower().endswith(CHECKPOINT_SUFFIXES)]
    there = f"nearest there: {nearest(os.path.basename(path), files)}" if files else "it holds no checkpoint files"
    raise ValueError(f"{field} {given!r}: no such checkpoint file in {folder} ({there})")


def check_overrides(model: str, base: dict, overrides: Any, field: str = "overrides") -> None:
    """Every key is an argument open_clip's create_model or the model class takes (a tower config's
    keys, fields of its config class), and the architecture builds with them on the meta device."""
    if not isinstance(overrides, dict):
        raise ValueError(f"{field}: expected a mapping of open_clip create_model arguments, got {overrides!r}")
    model_class = open_clip.CoCa if "multimodal_cfg" in base else open_clip.CLIP
    for key in overrides:
        if key in RESERVED_OVERRIDES:
            raise ValueError(f"{field} key {key!r} is set by the loader itself and cannot be overridden")
    allowed = (_arguments(open_clip.create_model) | _arguments(model_class.__init__)) - set(RESERVED_OVERRIDES)
    _check_keys(overrides, allowed, f"{field} key", f"an argument of open_clip.create_model nor of "
                                                   f"{model_class.__name__}")
    for key, kind in _tower_configs().items():
        value = overrides.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ValueError(f"{field} {key}: expected a mapping of {kind.__name__} fields, got {value!r}")
        _check_keys(value, {f.name for f in dataclasses.fields(kind)}, f"{field} {key} key",
                    f"a field of open_clip's {kind.__name__}")
    if "hf_model_name" in {**base.get("text_cfg", {}), **(overrides.get("text_cfg") or {})}:
        return  # a Hugging Face text tower reads its config from the Hub when built: keys only
    failure = _meta_build_failure(model, overrides)
    if failure:
        raise ValueError(f"{field} {overrides!r}: open_clip cannot build {model} with them: {failure}")


def _arguments(function: Any) -> set[str]:
    return {name for name, p in inspect.signature(function).parameters.items()
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _tower_configs() -> dict[str, type]:
    from open_clip.coca_model import MultimodalCfg

    return {"vision_cfg": open_clip.CLIPVisionCfg, "text_cfg": open_clip.CLIPTextCfg, "multimodal_cfg": MultimodalCfg}


def _check_keys(given: dict, allowed: set[str], what: str, not_a: str) -> None:
    for key in given:
        if key not in allowed:
            raise ValueError(f"{what} {key!r} is not {not_a}; nearest: {nearest(str(key), sorted(allowed))}")


_BUILD_FAILURES: dict[tuple[str, str], str | None] = {}


def _meta_build_failure(model: str, overrides: dict) -> str | None:
    """Why open_clip cannot build `model` with these overrides (None: it can); remembered, as every
    TeacherConfig of the same model (each `updated` copy, each replica's) asks again."""
    key = (model, json.dumps(overrides, sort_keys=True, default=repr))
    if key not in _BUILD_FAILURES:
        try:
            meta_model(model, **{**copy.deepcopy(overrides), **_NO_WEIGHTS})
            _BUILD_FAILURES[key] = None
        except Exception as e:  # noqa: BLE001 - any failure to build is the overrides' fault: reported, not raised
            _BUILD_FAILURES[key] = re.sub(r"\s+", " ", f"{type(e).__name__}: {e}").strip()[:400]
    return _BUILD_FAILURES[key]


def nearest(value: str, names: Iterable[str], n: int = 3) -> str:
    """The `n` names closest to `value` (case-insensitive, difflib's ratio), best first, comma-separated."""
    names = sorted(set(names))
    by_lower: dict[str, str] = {}
    for name in names:
        by_lower.setdefault(name.lower(), name)
    close = difflib.get_close_matches(value.lower(), list(by_lower), n=n, cutoff=0.0)
    return ", ".join(by_lower[c] for c in close) or "none"
