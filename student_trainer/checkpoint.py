"""Student checkpoints: weights plus the model config needed to rebuild them anywhere."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from student_trainer.config import ModelConfig, TeacherSourceConfig, from_plain, to_plain
from student_trainer.factory import create_student
from student_trainer.teacher.outputs import split_ensemble_fingerprint
from teacher_service.model import no_random_init_warning

MODEL_FILE = "model.pt"
MODEL_CONFIG_FILE = "model_config.json"
PROVENANCE_FILE = "provenance.json"


def save_student(model: torch.nn.Module, model_cfg: ModelConfig, directory: str | Path) -> None:
    """Weights + config: enough for `kd eval`, for resuming, or to serve the model as a teacher."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / MODEL_FILE)
    (directory / MODEL_CONFIG_FILE).write_text(json.dumps(to_plain(model_cfg), indent=2))


def load_model_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / MODEL_CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory}: not a student checkpoint (no {MODEL_CONFIG_FILE})")
    return from_plain(ModelConfig, json.loads(path.read_text()))


def load_student(directory: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, ModelConfig]:
    """Rebuild the architecture from its saved config and load the weights (eval mode)."""
    model_cfg = load_model_config(directory)
    with no_random_init_warning():  # its weights come from model.pt, next
        model = create_student(ModelConfig(name=model_cfg.name, overrides=model_cfg.overrides), device)
    state = torch.load(Path(directory) / MODEL_FILE, map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.eval(), model_cfg


def provenance(cfg, teacher_info: dict, init: dict | None = None) -> dict:
    """What a checkpoint was distilled from: the teacher (fingerprint, model, where its outputs came
    from), the loss weights, and how the student's weights started (`init`: random, pretrained, or
    inherited from a teacher with the blocks taken; None for runs resumed from checkpoints written
    before it was recorded). Written beside every checkpoint; resumes and `kd eval` read it."""
    members = cfg.teacher.members()
    fingerprint = teacher_info.get("fingerprint", "")
    record = {"run_name": cfg.run_name, "seed": cfg.seed, "init": init,
              "teacher": {"fingerprint": fingerprint, "model": teacher_info.get("model"),
                          **_where(members[0] if len(members) == 1 else cfg.teacher)},
              "losses": dict(cfg.losses),
            "loss_options": {k: v for k, v in cfg.loss_options.items() if isinstance(v, (int, float, str, type(None)))}}
    if cfg.teacher.is_ensemble:  # every teacher: its name, fingerprint, weight, labels and where it answers from
        fingerprints = split_ensemble_fingerprint(fingerprint)
        record["teacher"]["mode"] = "ensemble"
        record["teachers"] = [{"name": m.name, "fingerprint": fingerprints.get(m.name, ""),
                               "loss_weight": m.loss_weight, "labels": m.labels, **_where(m)} for m in members]
    return record


def _where(teacher: TeacherSourceConfig) -> dict:
    """Where one teacher's outputs come from (mode, app, cache root and, in a root holding several
    teachers, which one's rows)."""
    return {"mode": teacher.mode.value, "app_name": teacher.app_name if teacher.mode.needs_app else None,
            "cache_path": teacher.cache_path, "cache_teacher": teacher.cache_teacher}


def read_provenance(directory: str | Path) -> dict | None:
    """The provenance a checkpoint records (None for checkpoints written before it was recorded)."""
    path = Path(directory) / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.exists() else None


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
