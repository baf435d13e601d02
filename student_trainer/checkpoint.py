"""Student checkpoints: weights plus the model config needed to rebuild them anywhere.

A checkpoint folder holds `model.pt` (the weights), `model_config.json` (the run's ModelConfig),
`open_clip_model_cfg.json` (the open_clip config it resolves to, written since issue 28), and from
a run `provenance.json`, `metrics.json`, `train_state.pt`; `evaluation.json` once it is evaluated.
"""
from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path

import torch

from student_trainer.config import ModelConfig, TeacherSourceConfig, TrainConfig, from_plain, to_plain
from student_trainer.factory import create_student, open_clip_model_cfg, student_shape
from student_trainer.teacher.outputs import split_ensemble_fingerprint
from teacher_service.atomic_files import write_atomic
from teacher_service.model import load_checkpoint_strict
from teacher_service.model_check import no_random_init_warning

MODEL_FILE = "model.pt"
MODEL_CONFIG_FILE = "model_config.json"
OPEN_CLIP_CONFIG_FILE = "open_clip_model_cfg.json"
PROVENANCE_FILE = "provenance.json"
METRICS_FILE = "metrics.json"
EVALUATION_FILE = "evaluation.json"
COMMAND_KEY = "_driver_command"  # train_loop_config key: the command line that started the run

log = logging.getLogger(__name__)


def save_student(model: torch.nn.Module, model_cfg: ModelConfig, directory: str | Path) -> None:
    """Weights + config: enough for `kd eval`, for resuming, to serve the model as a teacher, or to
    export it (`kd export`) as open_clip's own folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / MODEL_FILE)
    (directory / MODEL_CONFIG_FILE).write_text(json.dumps(to_plain(model_cfg), indent=2))
    resolved = {"model_cfg": open_clip_model_cfg(model_cfg), "preprocess_cfg": to_plain(model.visual.preprocess_cfg)}
    (directory / OPEN_CLIP_CONFIG_FILE).write_text(json.dumps(resolved, indent=2))


def load_model_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / MODEL_CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory}: not a student checkpoint (no {MODEL_CONFIG_FILE})")
    try:
        return from_plain(ModelConfig, json.loads(path.read_text()))
    except ValueError as exc:  # not JSON, or unknown keys
        raise ValueError(f"{path}: not a student model config: {exc}") from None


def open_clip_config(directory: str | Path) -> dict:
    """`{"model_cfg", "preprocess_cfg"}`: the open_clip config the checkpoint's student is, as
    recorded; for a checkpoint written before it was recorded, resolved now from its preset or
    architecture and overrides, with the preprocessing `load_student` gives it."""
    recorded = Path(directory) / OPEN_CLIP_CONFIG_FILE
    if recorded.is_file():
        return json.loads(recorded.read_text())
    cfg = load_model_config(directory)
    cfg = ModelConfig(name=cfg.name, overrides=cfg.overrides)
    return {"model_cfg": open_clip_model_cfg(cfg), "preprocess_cfg": to_plain(student_shape(cfg).visual.preprocess_cfg)}


def load_student(directory: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, ModelConfig]:
    """Rebuild the architecture from its saved config and load the weights strictly (eval mode),
    with the preprocessing it trained with where the checkpoint records it (a pretrained tag's)."""
    from open_clip.model import set_model_preprocess_cfg

    model_cfg = load_model_config(directory)
    with no_random_init_warning():  # its weights come from model.pt, next
        model = create_student(ModelConfig(name=model_cfg.name, overrides=model_cfg.overrides), device)
    load_checkpoint_strict(model, Path(directory) / MODEL_FILE)
    recorded = Path(directory) / OPEN_CLIP_CONFIG_FILE
    if recorded.is_file():
        set_model_preprocess_cfg(model, json.loads(recorded.read_text())["preprocess_cfg"])
    return model.eval(), model_cfg


def driver_command() -> str:
    """This process's command line as its user typed it (`kd train ...`, `python -m ...`)."""
    argv = list(sys.orig_argv if Path(sys.argv[0]).name == "__main__.py" else sys.argv)
    return shlex.join([Path(argv[0]).name, *argv[1:]])


def provenance(cfg: TrainConfig, teacher_info: dict, init: dict | None = None, command: str | None = None) -> dict:
    """What a checkpoint was distilled from: the teacher (fingerprint, model, where its outputs came
    from), the loss weights, and how the student's weights started (`init`: random, pretrained, or
    inherited from a teacher with the blocks taken; None for runs resumed from checkpoints written
    before it was recorded); the data (shards, dataset.json's class names and templates), the whole
    run config and the `command` that started the run. Written beside every checkpoint; resumes,
    `kd eval` and `kd export` (the model card) read it."""
    members = cfg.teacher.members()
    fingerprint = teacher_info.get("fingerprint", "")
    record = {"run_name": cfg.run_name, "seed": cfg.seed, "init": init,
              "teacher": {"fingerprint": fingerprint, "model": teacher_info.get("model"),
                          **_where(members[0] if len(members) == 1 else cfg.teacher)},
              "losses": dict(cfg.losses),
            "loss_options": {k: v for k, v in cfg.loss_options.items() if isinstance(v, (int, float, str, type(None)))},
              "data": _data(cfg), "command": command, "config": cfg.to_dict()}
    if cfg.teacher.is_ensemble:  # every teacher: its name, fingerprint, weight, labels and where it answers from
        fingerprints = split_ensemble_fingerprint(fingerprint)
        record["teacher"]["mode"] = "ensemble"
        record["teachers"] = [{"name": m.name, "fingerprint": fingerprints.get(m.name, ""),
                               "loss_weight": m.loss_weight, "labels": m.labels, **_where(m)} for m in members]
    return record


def _data(cfg: TrainConfig) -> dict:
    """The shards a run read, and the class names and templates of their dataset.json (None where
    there is none)."""
    from teacher_service.shards import load_dataset_info, resolve_shards

    try:
        info = load_dataset_info(resolve_shards(cfg.data.train_shards))
    except (OSError, ValueError):
        info = {}
    return {"train_shards": cfg.data.train_shards, "val_shards": cfg.data.val_shards,
            "class_names": info.get("class_names"), "templates": info.get("templates")}


def _where(teacher: TeacherSourceConfig) -> dict:
    """Where one teacher's outputs come from (mode, app, cache root and, in a root holding several
    teachers, which one's rows)."""
    return {"mode": teacher.mode.value, "app_name": teacher.app_name if teacher.mode.needs_app else None,
            "cache_path": teacher.cache_path, "cache_teacher": teacher.cache_teacher}


def read_provenance(directory: str | Path) -> dict | None:
    """The provenance a checkpoint records (None for checkpoints written before it was recorded)."""
    path = Path(directory) / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def record_evaluation(directory: str | Path, shards, metrics: dict, limit: int | None = None) -> None:
    """Keep an evaluation's figures with the checkpoint (`evaluation.json`, the latest per shard
    spec), for its model card; a folder this process cannot write keeps its checkpoint as it is."""
    path = Path(directory) / EVALUATION_FILE
    recorded = read_evaluations(directory)
    recorded[str(shards)] = {"limit": limit, **{k: v for k, v in metrics.items()
                                                if isinstance(v, (int, float)) and not isinstance(v, bool)}}
    try:
        write_atomic(path, json.dumps(recorded, indent=2), mode=0o600)
    except OSError as exc:
        log.warning("evaluation not recorded with the checkpoint (%s: %s)", path, exc)


def read_evaluations(directory: str | Path) -> dict:
    """Shard spec → the figures of the checkpoint's latest evaluation on it ({} when none)."""
    path = Path(directory) / EVALUATION_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest ``checkpoint_*`` directory of a run (Ray Train names them by time), or None.

    Directories only: Ray Train also writes ``checkpoint_manager_snapshot.json`` there, newer
    than the checkpoints, and taking it hid the provenance from the driver's resume check."""
    found = sorted((p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


class TeacherChangedError(ValueError):
    """A run would resume against another teacher than the one its checkpoint was distilled from."""


def check_same_teacher(recorded: dict | None, fingerprint: str, where: str, allow_change: bool) -> None:
    """Refuse to go on from ``recorded`` provenance with a teacher of another ``fingerprint`` (an
    ensemble's is every teacher's name and fingerprint, `ensemble_fingerprint`: a teacher added,
    dropped, renamed or changed is refused, naming it)."""
    saved = ((recorded or {}).get("teacher") or {}).get("fingerprint", "")
    if recorded is None or saved == fingerprint or allow_change:
        return
    if recorded.get("teachers") or "=" in fingerprint:
        before, now = split_ensemble_fingerprint(saved), split_ensemble_fingerprint(fingerprint)
        changed = sorted(n for n in set(before) | set(now) if before.get(n) != now.get(n))
        raise TeacherChangedError(
            f"cannot resume {where}: its teachers changed ({', '.join(f'{n}: {before.get(n)!r} -> {now.get(n)!r}' for n in changed)}); "
            f"it was distilled from {saved!r}, the run now has {fingerprint!r}. Use a new run name, the same "
            f"teachers, or teacher.allow_teacher_change (--allow-teacher-change) to continue on purpose.")
    raise TeacherChangedError(
        f"cannot resume {where}: it was distilled from teacher fingerprint {saved or 'none'!r} "
        f"({recorded['teacher'].get('model')}, {recorded['teacher'].get('mode')}), the current teacher has "
        f"fingerprint {fingerprint or 'none'!r}. Use a new run name, the same teacher, or "
        f"teacher.allow_teacher_change (--allow-teacher-change) to continue on purpose.")
