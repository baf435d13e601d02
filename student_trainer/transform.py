"""Replayable augmentation, re-exported from :mod:`teacher_service.views`.

One implementation for the student, the teacher service and the precompute job, so cached
teacher embeddings and the views a student trains on can never drift apart. It lives in the
teacher package because the teacher side must never import student code.
"""
from __future__ import annotations

from teacher_service.views import (
    AUGMENT_VERSION,
    BRIGHTNESS_RANGE,
    CONTRAST_RANGE,
    RATIO_RANGE,
    SCALE_RANGE,
    augment_view,
    to_rgb,
    view_recipe,
    view_rng,
)

__all__ = ["AUGMENT_VERSION", "BRIGHTNESS_RANGE", "CONTRAST_RANGE", "RATIO_RANGE", "SCALE_RANGE",
           "augment_view", "to_rgb", "view_recipe", "view_rng"]
