"""Student checkpoints: weights plus the model config needed to rebuild them anywhere."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from student_trainer.config import ModelConfig, from_plain, to_plain
from student_trainer.factory import create_student

MODEL_FILE = "model.pt"
MODEL_CONFIG_FILE = "model_config.json"


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
    model = create_student(ModelConfig(name=model_cfg.name, overrides=model_cfg.overrides), device)
    state = torch.load(Path(directory) / MODEL_FILE, map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.eval(), model_cfg
