"""Zero-shot top-1/top-5 and image↔text retrieval R@1/5/10 for any open_clip CLIP model.

Retrieval on template captions is many-to-many: the same caption string (one template × one
class) belongs to many images. So a text counts as correct for an image when its caption string
equals the image's own caption. Image→text ranks the unique captions (exactly one is correct per
image); text→image queries each unique caption against all images and is correct at k when any
of the top-k images carries that caption. Ranks are pessimistic on ties (a tie with the correct
item counts against it), so a degenerate model that scores everything equally gets no credit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from student_trainer.data.batches import Batch
from teacher_service.contract.preprocess import preprocess_spec, to_model_input

RECALL_KS = (1, 5, 10)


def _pessimistic_rank(scores: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """0-based rank of the best correct entry per row, counting ties against it.

    ``scores`` [N, M], ``correct`` bool [N, M] with at least one True per row.
    """
    best_correct = scores.masked_fill(~correct, float("-inf")).max(dim=1, keepdim=True).values
    better_or_tied_wrong = ((scores >= best_correct) & ~correct).sum(dim=1)
    return better_or_tied_wrong


def _recall(ranks: torch.Tensor, k: int, candidates: int) -> float:
    return float((ranks < min(k, candidates)).float().mean().item())


@torch.no_grad()
def _image_features(model, images: np.ndarray, *, batch_size: int, device: str) -> torch.Tensor:
    spec = preprocess_spec(model)
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = to_model_input(images[start : start + batch_size], spec, device=device)
        chunks.append(model.encode_image(pixels, normalize=True).float())
    return torch.cat(chunks)


def _token_tensor(tokens) -> torch.Tensor:
    return tokens if torch.is_tensor(tokens) else torch.as_tensor(np.asarray(tokens))


@torch.no_grad()
def _token_features(model, tokens: torch.Tensor, *, batch_size: int, device: str) -> torch.Tensor:
    chunks = []
    for start in range(0, len(tokens), batch_size):
        chunks.append(model.encode_text(tokens[start : start + batch_size].to(device), normalize=True).float())
    return torch.cat(chunks)


def _text_features(model, texts: list[str], *, tokenizer, batch_size: int, device: str) -> torch.Tensor:
    return _token_features(model, _token_tensor(tokenizer(texts)), batch_size=batch_size, device=device)


def class_prompts(class_names: list[str], templates: list[str]) -> list[str]:
    """Every template filled with every class name, class-major (what `class_embeddings` averages)."""
    return [template.format(name) for name in class_names for template in templates]


def _class_means(features: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C·T, D] prompt features → [C, D]: per class, the normalised mean over its templates."""
    features = features.view(num_classes, features.shape[0] // num_classes, -1).mean(dim=1)
    return torch.nn.functional.normalize(features, dim=-1)


def class_embeddings(model, class_names: list[str], templates: list[str], *, tokenizer, batch_size: int, device: str) -> torch.Tensor:
    """[C, D]: per class, the normalised mean of the normalised template text features."""
    features = _text_features(model, class_prompts(class_names, templates), tokenizer=tokenizer,
                              batch_size=batch_size, device=device)
    return _class_means(features, len(class_names))


def zero_shot_metrics(image_features: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top1/top5 over labelled images (label >= 0); NaN when no image is labelled."""
    labelled = labels >= 0
    if not bool(labelled.any()):
        return {"zero_shot_top1": math.nan, "zero_shot_top5": math.nan}
    if int(labels.max()) >= classes.shape[0]:
        raise ValueError(f"label {int(labels.max())} has no class name (only {classes.shape[0]} classes)")
    scores = image_features[labelled] @ classes.T
    correct = torch.nn.functional.one_hot(labels[labelled], classes.shape[0]).bool()
    ranks = _pessimistic_rank(scores, correct)
    return {
        "zero_shot_top1": _recall(ranks, 1, classes.shape[0]),
        "zero_shot_top5": _recall(ranks, 5, classes.shape[0]),
    }


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, caption_ids: torch.Tensor) -> dict[str, float]:
    """R@k both ways; ``text_features`` are the unique captions, ``caption_ids[i]`` image i's caption."""
    scores = image_features @ text_features.T  # [N images, U captions]
    matches = torch.nn.functional.one_hot(caption_ids, text_features.shape[0]).bool()
    i2t = _pessimistic_rank(scores, matches)
    t2i = _pessimistic_rank(scores.T, matches.T)
    metrics = {}
    for k in RECALL_KS:
        metrics[f"i2t_r{k}"] = _recall(i2t, k, scores.shape[1])
        metrics[f"t2i_r{k}"] = _recall(t2i, k, scores.shape[0])
    return metrics


@dataclass
class EvalInputs:
    """A test split made ready to evaluate any number of times: its images (uint8, as the student
    sees them), labels, each image's caption among the unique captions, and the class prompts and
    unique captions already tokenised (the evaluation curve prepares them once per worker)."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: torch.Tensor  # int64 [N]
    caption_ids: torch.Tensor  # int64 [N]
    prompt_tokens: torch.Tensor  # [C·T, L], class-major
    caption_tokens: torch.Tensor  # [U, L]
    num_classes: int

    @classmethod
    def prepare(cls, data: Batch, *, class_names: list[str], templates: list[str], tokenizer) -> EvalInputs:
        if len(data.keys) == 0:
            raise ValueError("evaluation got an empty Batch")
        if not class_names or not templates:
            raise ValueError(f"evaluation needs class names and templates, got {len(class_names)} and {len(templates)}")
        unique = list(dict.fromkeys(data.captions))
        index = {caption: i for i, caption in enumerate(unique)}
        return cls(images=data.images, labels=torch.as_tensor(np.asarray(data.labels, dtype=np.int64)),
                   caption_ids=torch.as_tensor([index[c] for c in data.captions], dtype=torch.int64),
                   prompt_tokens=_token_tensor(tokenizer(class_prompts(class_names, templates))),
                   caption_tokens=_token_tensor(tokenizer(unique)), num_classes=len(class_names))


def evaluate_inputs(model, inputs: EvalInputs, *, batch_size: int = 256, device: str = "cpu",
                    rows: np.ndarray | None = None, gather=None) -> dict[str, float]:
    """Zero-shot top-1/top-5 and retrieval R@1/5/10 (fractions in [0, 1]) of ``model`` on ``inputs``.

    ``rows`` (with ``gather``) embeds only those images here: ``gather(features)`` returns every
    image's features in order (`step_eval` spreads one evaluation over the DDP ranks so). The
    model is put in eval mode for the measurement and returned to its previous mode.
    """
    was_training = model.training
    model.eval()
    try:
        images = inputs.images if rows is None else inputs.images[rows]
        features = _image_features(model, images, batch_size=batch_size, device=device)
        features = gather(features) if gather is not None else features
        prompts = _token_features(model, inputs.prompt_tokens, batch_size=batch_size, device=device)
        texts = _token_features(model, inputs.caption_tokens, batch_size=batch_size, device=device)
    finally:
        model.train(was_training)
    classes = _class_means(prompts, inputs.num_classes)
    metrics = zero_shot_metrics(features, classes, inputs.labels.to(features.device))
    metrics.update(retrieval_metrics(features, texts, inputs.caption_ids.to(features.device)))
    return metrics


def evaluate_model(
    model,
    data: Batch,
    *,
    class_names: list[str],
    templates: list[str],
    tokenizer,
    batch_size: int = 256,
    device: str = "cpu",
) -> dict[str, float]:
    """Zero-shot top-1/top-5 and retrieval R@1/5/10 (fractions in [0, 1]) of ``model`` on ``data``.

    The model is put in eval mode for the measurement and returned to its previous mode.
    """
    inputs = EvalInputs.prepare(data, class_names=class_names, templates=templates, tokenizer=tokenizer)
    return evaluate_inputs(model, inputs, batch_size=batch_size, device=device)


def evaluate_on_shards(model, shards, *, tokenizer, limit: int | None = None,
                       device: str = "cpu") -> dict[str, float]:
    """`evaluate_model` on val shards, with class names and templates from their dataset.json."""
    from student_trainer.data.batches import eval_set
    from teacher_service.shards import load_dataset_info, resolve_shards

    shard_list = resolve_shards(shards)
    info = load_dataset_info(shard_list)
    size = preprocess_spec(model).image_size
    data = eval_set(shard_list, image_size=max(size), tokenizer=tokenizer, limit=limit)
    metrics = evaluate_model(model, data, class_names=info["class_names"], templates=info["templates"],
                             tokenizer=tokenizer, device=device)
    metrics["params"] = sum(p.numel() for p in model.parameters())
    metrics["samples"] = len(data.keys)
    return metrics


def evaluate_checkpoint(directory, shards, *, limit: int | None = None, device: str = "cpu") -> dict:
    """Metrics for a student checkpoint directory (model.pt + model_config.json), also kept with
    it (`evaluation.json`, which an export's model card shows)."""
    from student_trainer.checkpoint import load_student, record_evaluation
    from student_trainer.factory import create_tokenizer

    model, model_cfg = load_student(directory, device)
    metrics = evaluate_on_shards(model, shards, tokenizer=create_tokenizer(model, model_cfg),
                                 limit=limit, device=device)
    record_evaluation(directory, shards, metrics, limit)
    return metrics


def evaluate_teacher(cfg, shards, *, limit: int | None = None) -> dict:
    """Metrics for a teacher described by a TeacherConfig (loaded exactly as the Serve replica does)."""
    import open_clip

    from teacher_service.model import load_teacher

    teacher = load_teacher(cfg)
    tokenizer = open_clip.get_tokenizer(cfg.model, context_length=teacher.context_length)
    metrics = evaluate_on_shards(teacher.model, shards, tokenizer=tokenizer, limit=limit,
                                 device=str(teacher.device))
    metrics["fingerprint"] = teacher.fingerprint
    return metrics
