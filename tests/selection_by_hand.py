"""Data selection restated by hand for the tests: each row's contrastive loss with plain loops, and
the top rows by a plain sort (`tests/test_selection.py`, `tests/test_selection_ray.py`)."""
from __future__ import annotations

import math

import numpy as np


def hand_row_losses(image: np.ndarray, text: np.ndarray, scale: float) -> list[float]:
    """Each row's symmetric InfoNCE loss written out with loops over rows and dimensions: half the
    cross-entropy of image i against every caption, plus half that of caption i against every image."""
    n, d = len(image), len(image[0])

    def dot(a, b) -> float:
        return sum(float(a[k]) * float(b[k]) for k in range(d))

    losses = []
    for i in range(n):
        image_logits = [scale * dot(image[i], text[j]) for j in range(n)]
        text_logits = [scale * dot(text[i], image[j]) for j in range(n)]
        image_ce = math.log(sum(math.exp(v) for v in image_logits)) - image_logits[i]
        text_ce = math.log(sum(math.exp(v) for v in text_logits)) - text_logits[i]
        losses.append(0.5 * (image_ce + text_ce))
    return losses


def hand_top(scores: list[float], keep: int) -> list[int]:
    """The `keep` best rows by a plain sort (ties: the earlier row), listed in batch order."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:keep])
