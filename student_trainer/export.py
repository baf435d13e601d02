"""`kd export`: a student checkpoint as open_clip's own folder, which open_clip alone loads.

The folder holds what `open_clip.create_model_and_transforms("local-dir:DIR")` and
`open_clip.get_tokenizer("local-dir:DIR")` read (open_clip 3.3, `factory.py`), and a model card:

- `open_clip_config.json`: `model_cfg`, the whole open_clip config the student was built from (its
  architecture's config with the run's overrides applied, `factory.open_clip_model_cfg`; the
  tokenizer follows from its `text_cfg`: open_clip's SimpleTokenizer at its context length), and
  `preprocess_cfg`: the input size, mean and std the student trained with, and the resize the
  project's evaluation gives it (`augment.EVAL_RESIZE`: PIL bilinear, straight to the size), so
  open_clip's eval transform hands it the pixels `kd eval` does;
- `open_clip_model.safetensors`: the weights (the first file name open_clip looks for);
- `README.md`: architecture, teacher, losses, data, evaluation figures, the command that made it.

It is written beside `out` under a temporary name and renamed when complete. Before that, open_clip
builds the model from the written config and the checkpoint's weights are loaded into it strictly:
a checkpoint whose weights do not fit its config exports nothing.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from student_trainer.checkpoint import (MODEL_CONFIG_FILE, MODEL_FILE, METRICS_FILE, latest_checkpoint,
                                        load_model_config, open_clip_config, read_evaluations, read_provenance)
from student_trainer.events import EVAL_METRICS
from student_trainer.factory import count_parameters
from teacher_service.atomic_files import atomic_path
from teacher_service.contract.augment import EVAL_RESIZE
from teacher_service.model import load_checkpoint_strict, load_state_dict_file
from teacher_service.model_check import no_random_init_warning

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
CARD_FILE = "README.md"
NOT_RECORDED = "not recorded (the checkpoint was written before this was)"


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Write the student checkpoint folder `checkpoint` as open_clip's folder `out`. An existing
    `out` is refused unless `force`; then it is replaced whole once the new folder is complete."""
    from safetensors.torch import save

    checkpoint, out = Path(checkpoint), Path(out)
    _check_checkpoint(checkpoint)
    _check_target(checkpoint, out, force)
    config = exported_config(checkpoint)
    state = {k: v.detach().clone().contiguous() for k, v in load_state_dict_file(checkpoint / MODEL_FILE).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, replace_dir=force) as tmp:
        tmp.mkdir()
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        (tmp / WEIGHTS_FILE).write_bytes(save(state, metadata={"format": "pt"}))  # the umask's mode, as the rest
        model = _built_by_open_clip(tmp, checkpoint)
        (tmp / CARD_FILE).write_text(model_card(checkpoint, out, config, model))
    return out


def _check_checkpoint(checkpoint: Path) -> None:
    """A student checkpoint folder holds its weights and model config; a run folder is named with
    its latest checkpoint."""
    missing = [name for name in (MODEL_FILE, MODEL_CONFIG_FILE) if not (checkpoint / name).is_file()]
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint folder")
    if missing:
        latest = latest_checkpoint(checkpoint)
        hint = f"; a run folder? its latest checkpoint is {latest}" if latest else ""
        raise FileNotFoundError(f"{checkpoint}: not a student checkpoint (no {', '.join(missing)}){hint}")


def _check_target(checkpoint: Path, out: Path, force: bool) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ValueError(f"{out} exists and is not a folder; nothing written")
    if out.exists() and not force:
        raise ValueError(f"{out} already exists; nothing written (kd export --force replaces it)")
    if out.resolve() == checkpoint.resolve() or out.resolve() in checkpoint.resolve().parents:
        raise ValueError(f"{out} holds the checkpoint {checkpoint} itself; export to another folder")


def exported_config(checkpoint: str | Path) -> dict:
    """`open_clip_config.json` for the checkpoint's student: its open_clip model config, and the
    preprocessing `kd eval` gives it, in open_clip's terms."""
    recorded = open_clip_config(checkpoint)
    model_cfg, preprocess = recorded["model_cfg"], recorded["preprocess_cfg"]
    hf_tokenizer = model_cfg.get("text_cfg", {}).get("hf_tokenizer_name")
    if hf_tokenizer:
        raise ValueError(f"{checkpoint}: its text tower uses the Hugging Face tokenizer {hf_tokenizer!r}, whose "
                         "files open_clip's local-dir loader reads from the folder; exporting them is not supported")
    return {"model_cfg": model_cfg,
            "preprocess_cfg": {"size": preprocess["size"], "mean": preprocess["mean"], "std": preprocess["std"],
                               **EVAL_RESIZE}}


def _built_by_open_clip(folder: Path, checkpoint: Path) -> torch.nn.Module:
    """The model open_clip builds from `folder`'s config, with the checkpoint's weights loaded
    strictly (an error names the keys that do not fit)."""
    import open_clip

    try:
        with no_random_init_warning():  # the weights are loaded next
            model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    except (RuntimeError, TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"{checkpoint}: open_clip cannot build its model config: {type(exc).__name__}: {exc}") from None
    load_checkpoint_strict(model, checkpoint / MODEL_FILE)
    return model.eval()


# --------------------------------------------------------------------------- the model card
def model_card(checkpoint: Path, out: Path, config: dict, model: torch.nn.Module) -> str:
    """README.md: what the student is and how it was made, from what its checkpoint records."""
    recorded = read_provenance(checkpoint) or {}
    sections = [
        f"# {out.name}: a CLIP student distilled with clip-kd-server\n",
        _usage(out, recorded.get("data") or {}),
        _architecture(checkpoint, config, model),
        _teacher(recorded),
        _data(recorded),
        _training(checkpoint),
        _evaluation(checkpoint),
        _made_by(checkpoint, out, recorded),
    ]
    return "\n".join(sections)


def _usage(out: Path, data: dict) -> str:
    classes = data.get("class_names") or ["cat", "dog"]
    template = (data.get("templates") or ["a photo of a {}."])[0]
    return (f"Load it with open_clip alone:\n\n```python\nimport open_clip, torch\nfrom PIL import Image\n\n"
            f"model, _, preprocess = open_clip.create_model_and_transforms(\"local-dir:{out.name}\")\n"
            f"tokenizer = open_clip.get_tokenizer(\"local-dir:{out.name}\")\nmodel.eval()\n"
            f"classes = {json.dumps(classes[:10])}\n"
            f"with torch.no_grad():\n"
            f"    text = model.encode_text(tokenizer([{template!r}.format(c) for c in classes]), normalize=True)\n"
            f"    image = model.encode_image(preprocess(Image.open(\"image.png\")).unsqueeze(0), normalize=True)\n"
            f"print(classes[int((image @ text.T).argmax())])\n```\n")


def _architecture(checkpoint: Path, config: dict, model: torch.nn.Module) -> str:
    model_cfg, preprocess = config["model_cfg"], config["preprocess_cfg"]
    student = load_model_config(checkpoint)
    towers = {k: v for k, v in model_cfg.items() if k not in ("embed_dim", "vision_cfg", "text_cfg")}
    return ("## Architecture\n\n"
            f"- open_clip `{type(model).__name__}`, {count_parameters(model):,} parameters, embed_dim "
            f"{model_cfg.get('embed_dim')}{f', {json.dumps(towers)}' if towers else ''}\n"
            f"- vision tower: `{json.dumps(model_cfg.get('vision_cfg', {}))}`\n"
            f"- text tower: `{json.dumps(model_cfg.get('text_cfg', {}))}`\n"
            f"- built as `{student.name}` with overrides `{json.dumps(student.overrides)}` "
            f"(pretrained: {student.pretrained or 'none'})\n"
            f"- input: {preprocess['size']} px, {preprocess['interpolation']} resize ({preprocess['resize_mode']}), "
            f"mean {preprocess['mean']}, std {preprocess['std']}\n")


def _teacher(recorded: dict) -> str:
    if not recorded:
        return f"## Teacher and losses\n\n{NOT_RECORDED}\n"
    teacher = recorded.get("teacher") or {}
    lines = [f"- teacher: `{teacher.get('model')}`, fingerprint `{teacher.get('fingerprint') or 'none'}`, "
             f"mode {teacher.get('mode')}" + (f", app {teacher['app_name']}" if teacher.get("app_name") else "")
             + (f", cache {teacher['cache_path']}" if teacher.get("cache_path") else "")]
    lines += [f"  - `{t['name']}`: fingerprint `{t['fingerprint']}`, weight {t['loss_weight']}, mode {t['mode']}"
              for t in recorded.get("teachers") or []]
    losses = ", ".join(f"{name} {weight:g}" for name, weight in (recorded.get("losses") or {}).items())
    lines.append(f"- losses (weights): {losses or 'none recorded'}")
    if recorded.get("loss_options"):
        lines.append(f"- loss options: `{json.dumps(recorded['loss_options'])}`")
    lines.append(f"- initial weights: `{json.dumps(recorded.get('init'))}`")
    return "## Teacher and losses\n\n" + "\n".join(lines) + "\n"


def _data(recorded: dict) -> str:
    data = recorded.get("data")
    if not data:
        return f"## Data\n\n{NOT_RECORDED}\n"
    classes = data.get("class_names")
    return ("## Data\n\n"
            f"- train shards: `{data.get('train_shards')}`\n- val shards: `{data.get('val_shards')}`\n"
            f"- classes ({len(classes) if classes else 0}, dataset.json): "
            f"{', '.join(map(str, classes)) if classes else 'none recorded'}\n"
            f"- zero-shot templates: {json.dumps(data.get('templates') or [])}\n")


def _training(checkpoint: Path) -> str:
    path = checkpoint / METRICS_FILE
    if not path.is_file():
        return "## Training\n\nno metrics.json with the checkpoint\n"
    metrics = json.loads(path.read_text())
    keys = [k for k in ("epoch", "step", "world_size", "teacher_mode", "loss") if k in metrics]
    keys += sorted(k for k in metrics if k.endswith("_loss"))
    return "## Training (at this checkpoint)\n\n" + "\n".join(f"- {k}: {metrics[k]}" for k in keys) + "\n"


def _evaluation(checkpoint: Path) -> str:
    evaluations = read_evaluations(checkpoint)
    if not evaluations:
        return ("## Evaluation\n\nnone recorded: `kd eval --checkpoint CHECKPOINT --shards VAL` records its "
                "figures with the checkpoint\n")
    columns = [*EVAL_METRICS, "samples"]
    rows = [f"| `{shards}` | " + " | ".join(_figure(figures.get(c)) for c in columns) + " |"
            for shards, figures in evaluations.items()]
    return ("## Evaluation (`kd eval`, fractions)\n\n| shards | " + " | ".join(columns) + " |\n|"
            + "---|" * (len(columns) + 1) + "\n" + "\n".join(rows) + "\n")


def _figure(value) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _made_by(checkpoint: Path, out: Path, recorded: dict) -> str:
    command = recorded.get("command")
    return ("## How it was made\n\n"
            f"- run `{recorded.get('run_name', 'unknown')}`, seed {recorded.get('seed', 'unknown')}\n"
            f"- command: {f'`{command}`' if command else NOT_RECORDED}\n"
            f"- exported from `{checkpoint.resolve()}` by `kd export` on {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n"
            + (f"\nThe run's whole config (`kd train --config` takes it as YAML):\n\n```json\n"
               f"{json.dumps(recorded['config'], indent=2)}\n```\n" if recorded.get("config")
               else f"- the run's whole config: {NOT_RECORDED}\n"))
