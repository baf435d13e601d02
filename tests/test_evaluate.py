"""evaluate_model on hand-built cases whose metrics are known exactly, plus a tiny real open_clip."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from student_trainer.data.batches import Batch
from student_trainer.data.write_shards import CLASS_NAMES
from student_trainer.evaluate import _pessimistic_rank, evaluate_model, retrieval_metrics

CAPTION_TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]
ZS_TEMPLATES = CAPTION_TEMPLATES + ["a {}."]
METRICS = {"zero_shot_top1", "zero_shot_top5", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"}


def fake_tokenizer(texts: list[str]) -> torch.Tensor:
    """Row = [class id, template id], recovered from the text."""
    rows = []
    for text in texts:
        matches = [(c, t) for c, name in enumerate(CLASS_NAMES) for t, tpl in enumerate(ZS_TEMPLATES) if tpl.format(name) == text]
        assert len(matches) == 1, text
        rows.append(matches[0])
    return torch.tensor(rows, dtype=torch.long)


class FakeClip(torch.nn.Module):
    """Image class/template are read from channel 0/1 pixel values (20 * id); text class goes through
    ``perm``. Features are one-hot(class) ⊕ one-hot(template), so the right answer is known."""

    def __init__(self, perm: list[int] | None = None):
        super().__init__()
        self.visual = torch.nn.Module()
        self.visual.preprocess_cfg = {"size": 4, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0),
                                      "interpolation": "bilinear", "resize_mode": "squash"}
        self.perm = torch.tensor(perm if perm is not None else list(range(10)))
        self.modes_seen: set[bool] = set()

    def _features(self, cls: torch.Tensor, tpl: torch.Tensor, normalize: bool) -> torch.Tensor:
        self.modes_seen.add(self.training)
        x = torch.cat([torch.nn.functional.one_hot(cls, 10), torch.nn.functional.one_hot(tpl, len(ZS_TEMPLATES))], 1).float()
        return torch.nn.functional.normalize(x, dim=-1) if normalize else x

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        assert pixels.shape[1:] == (3, 4, 4)
        ids = torch.round(pixels[:, :2].mean(dim=(2, 3)) * 255 / 20).long()
        return self._features(ids[:, 0], ids[:, 1], normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self._features(self.perm[tokens[:, 0]], tokens[:, 1], normalize)


def make_batch(classes=range(10), copies: int = 2, unlabeled_every: int = 0) -> Batch:
    keys, images, labels, captions = [], [], [], []
    for c in classes:
        for t, template in enumerate(CAPTION_TEMPLATES):
            for copy in range(copies):
                image = np.zeros((4, 4, 3), np.uint8)
                image[..., 0], image[..., 1] = 20 * c, 20 * t
                keys.append(f"k{c}-{t}-{copy}")
                images.append(image)
                labels.append(c)
                captions.append(template.format(CLASS_NAMES[c]))
    if unlabeled_every:
        labels = [-1 if i % unlabeled_every == 0 else lab for i, lab in enumerate(labels)]
    return Batch(keys=keys, images=np.stack(images), tokens=fake_tokenizer(captions).numpy(),
                 labels=np.asarray(labels, np.int64), captions=captions)


def run(model, data, class_names=CLASS_NAMES, batch_size=7):
    return evaluate_model(model, data, class_names=list(class_names), templates=ZS_TEMPLATES,
                          tokenizer=fake_tokenizer, batch_size=batch_size)


def test_perfect_model_scores_one_everywhere():
    model = FakeClip().train()
    metrics = run(model, make_batch())
    assert set(metrics) == METRICS
    assert metrics == {name: 1.0 for name in METRICS}
    assert model.training and model.modes_seen == {False}  # measured in eval mode, mode restored


def test_swapped_classes_lower_exactly():
    """Text for 'zero' and 'one' swapped: the 8 of 40 images of those classes fail at 1 (and at 5,
    where the true class ties with 8 others), so do the 4 of 20 captions naming them."""
    metrics = run(FakeClip(perm=[1, 0, 2, 3, 4, 5, 6, 7, 8, 9]), make_batch())
    assert metrics["zero_shot_top1"] == pytest.approx(0.8)
    assert metrics["zero_shot_top5"] == pytest.approx(0.8)
    assert metrics["i2t_r1"] == pytest.approx(0.8)
    assert metrics["t2i_r1"] == pytest.approx(16 / 20)
    for way in ("i2t", "t2i"):
        assert metrics[f"{way}_r1"] <= metrics[f"{way}_r5"] <= metrics[f"{way}_r10"] <= 1.0


def test_derangement_scores_zero_top1():
    metrics = run(FakeClip(perm=[(c + 1) % 10 for c in range(10)]), make_batch())
    assert metrics["zero_shot_top1"] == 0.0 and metrics["i2t_r1"] == 0.0 and metrics["t2i_r1"] == 0.0


def test_top5_is_clamped_with_fewer_classes():
    """3 classes: top-5 means top-3, which is always right; the swap still costs top-1."""
    data = make_batch(classes=range(3))
    metrics = run(FakeClip(perm=[1, 0, 2, 3, 4, 5, 6, 7, 8, 9]), data, class_names=CLASS_NAMES[:3])
    assert metrics["zero_shot_top1"] == pytest.approx(4 / 12)
    assert metrics["zero_shot_top5"] == 1.0
    assert metrics["i2t_r10"] == 1.0 and metrics["t2i_r10"] == 1.0  # 6 captions, 12 images


def test_unlabeled_samples_are_left_out_of_zero_shot():
    partly = run(FakeClip(perm=[1, 0, 2, 3, 4, 5, 6, 7, 8, 9]), make_batch(unlabeled_every=2))
    assert partly["zero_shot_top1"] == pytest.approx(16 / 20)  # every other image of each (c, t) pair
    none = make_batch()
    none.labels[:] = -1
    metrics = run(FakeClip(), none)
    assert math.isnan(metrics["zero_shot_top1"]) and metrics["i2t_r1"] == 1.0


def test_retrieval_counts_any_matching_caption():
    images = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    metrics = retrieval_metrics(images, texts, torch.tensor([0, 0, 1]))
    assert metrics["i2t_r1"] == pytest.approx(2 / 3)  # image 1 prefers the other caption
    assert metrics["i2t_r5"] == 1.0
    assert metrics["t2i_r1"] == 1.0  # caption 0 is found through image 0 even though image 1 misses it


def test_ties_count_against_the_correct_item():
    scores = torch.zeros(2, 4)
    correct = torch.tensor([[False, True, False, False], [True, True, False, False]])
    assert _pessimistic_rank(scores, correct).tolist() == [3, 2]


def test_rejects_labels_without_class_names():
    with pytest.raises(ValueError, match="label 9 has no class name"):
        run(FakeClip(), make_batch(), class_names=CLASS_NAMES[:5])


def test_tiny_open_clip_model():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.create_model(
        "ViT-B-32", pretrained=None, embed_dim=32,
        vision_cfg={"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        text_cfg={"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        output_dict=True,
    )
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    data = make_batch(classes=range(10), copies=1)
    data.images = np.random.default_rng(0).integers(0, 256, (len(data), 8, 8, 3), dtype=np.uint8)  # resized to 16
    metrics = evaluate_model(model, data, class_names=CLASS_NAMES, templates=ZS_TEMPLATES, tokenizer=tokenizer, batch_size=8)
    assert set(metrics) == METRICS
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert metrics["i2t_r1"] <= metrics["i2t_r5"] <= metrics["i2t_r10"]
    assert metrics["zero_shot_top1"] <= metrics["zero_shot_top5"]
