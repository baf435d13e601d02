"""What a teacher source hands the training loop for one batch: a small typed value, not a bare dict."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass(frozen=True)
class TeacherOutputs:
    """A batch's teacher embeddings (L2-normalised fp16 numpy, one row per sample, in batch order),
    the teacher's exponentiated logit scale, its SigLIP bias (None for CLIP) and its fingerprint."""

    image_features: np.ndarray | None
    text_features: np.ndarray | None
    logit_scale: float
    logit_bias: float | None
    fingerprint: str

    @classmethod
    def from_response(cls, resp) -> TeacherOutputs:
        """From an `EmbedResponse` of the pool, an inline engine or a gRPC reply."""
        return cls(resp.image_features, resp.text_features, float(resp.logit_scale),
                   None if resp.logit_bias is None else float(resp.logit_bias), resp.fingerprint)

    def __len__(self) -> int:
        rows = self.image_features if self.image_features is not None else self.text_features
        return 0 if rows is None else len(rows)

    @staticmethod
    def merge(parts: Sequence[TeacherOutputs | None]) -> TeacherOutputs | None:
        """The outputs of an optimizer step's micro-batches as one (rows in order); None if none has any."""
        if not parts or all(p is None for p in parts):
            return None
        if any(p is None for p in parts):
            raise ValueError("some micro-batches of a step have teacher outputs and some do not")
        if len({p.fingerprint for p in parts}) > 1:
            raise ValueError(f"one step's micro-batches came from different teachers: "
                             f"{sorted({p.fingerprint for p in parts})}")
        if len(parts) == 1:
            return parts[0]

        def rows(name: str):
            first = getattr(parts[0], name)
            return None if first is None else np.concatenate([getattr(p, name) for p in parts])

        return replace(parts[0], image_features=rows("image_features"), text_features=rows("text_features"))

    def to_tensors(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """The dict the loss modules read: float32 features (copied: Ray results are read-only),
        ``logit_scale`` and, for a SigLIP teacher, ``logit_bias``."""
        result = {}
        for name in ("image_features", "text_features"):
            value = getattr(self, name)
            if value is not None:
                result[name] = torch.tensor(value, dtype=torch.float32, device=device)
        result["logit_scale"] = torch.tensor(float(self.logit_scale), device=device)
        if self.logit_bias is not None:
            result["logit_bias"] = torch.tensor(float(self.logit_bias), device=device)
        return result
