"""What a teacher source hands the training loop for one batch: a small typed value, not a bare dict."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from teacher_service.contract.answer_codec import decode_rows


@dataclass(frozen=True)
class TeacherOutputs:
    """A batch's teacher embeddings (L2-normalised numpy, one row per sample, in batch order: float16
    from fp16 answers, float32 decoded from bf16 and int8 ones), the teacher's exponentiated logit
    scale, its SigLIP bias (None for CLIP) and its fingerprint."""

    image_features: np.ndarray | None
    text_features: np.ndarray | None
    logit_scale: float
    logit_bias: float | None
    fingerprint: str
    # Per-sample teacher choice: which rows this teacher answered (bool [B]); the others hold zeros
    # and the losses leave them out. None: every row.
    answered: np.ndarray | None = None
    # Each row's score among the batch's rows, as the pool answered it (`teacher_service.scores`,
    # data selection); None where it was not asked or not computed there.
    scores: np.ndarray | None = None

    @classmethod
    def from_response(cls, resp) -> TeacherOutputs:
        """From an `EmbedResponse` of the pool, an inline engine or a gRPC reply, in any answer dtype."""
        return cls(decode_rows(resp.image_features), decode_rows(resp.text_features), float(resp.logit_scale),
                   None if resp.logit_bias is None else float(resp.logit_bias), resp.fingerprint,
                   scores=getattr(resp, "scores", None))

    def __len__(self) -> int:
        rows = self.image_features if self.image_features is not None else self.text_features
        return 0 if rows is None else len(rows)

    @staticmethod
    def merge(parts: Sequence[TeacherOutputs | None]) -> TeacherOutputs | None:
        """The outputs of an optimizer step's micro-batches as one (rows in order); None if none has any."""
        if not _all_answered(parts):
            return None
        if len({p.fingerprint for p in parts}) > 1:
            raise ValueError(f"one step's micro-batches came from different teachers: "
                             f"{sorted({p.fingerprint for p in parts})}")
        if len(parts) == 1:
            return parts[0]

        def rows(name: str):
            first = getattr(parts[0], name)
            return None if first is None else np.concatenate([getattr(p, name) for p in parts])

        answered = None
        if any(p.answered is not None for p in parts):
            answered = np.concatenate([np.ones(len(p), bool) if p.answered is None else p.answered for p in parts])
        scores = np.concatenate([p.scores for p in parts]) if all(p.scores is not None for p in parts) else None
        return replace(parts[0], image_features=rows("image_features"), text_features=rows("text_features"),
                       answered=answered, scores=scores)

    def take(self, rows: np.ndarray) -> TeacherOutputs:
        """The outputs of `rows` (positions into this batch), in that order."""
        def pick(value):
            return None if value is None else value[rows]

        return replace(self, image_features=pick(self.image_features), text_features=pick(self.text_features),
                       answered=pick(self.answered), scores=pick(self.scores))

    @property
    def nbytes(self) -> int:
        """Bytes of the rows' embeddings and scores (what answering them moved)."""
        return sum(int(v.nbytes) for v in (self.image_features, self.text_features, self.scores) if v is not None)

    def spread(self, rows: np.ndarray, size: int) -> TeacherOutputs:
        """These outputs (for `rows` of a batch of `size`) as outputs for the whole batch: zeros and
        `answered` False elsewhere, so every teacher of an ensemble lines up row for row."""
        def full(value):
            if value is None:
                return None
            out = np.zeros((size, *value.shape[1:]), value.dtype)
            out[rows] = value
            return out

        answered = np.zeros(size, bool)
        answered[rows] = True if self.answered is None else self.answered
        return replace(self, image_features=full(self.image_features), text_features=full(self.text_features),
                       answered=answered, scores=None)  # a score is among the rows asked: not the batch's

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
        if self.answered is not None:
            result["answered"] = torch.tensor(self.answered, dtype=torch.bool, device=device)
        return result


@dataclass(frozen=True)
class EnsembleOutputs:
    """A batch's outputs of several teachers, one `TeacherOutputs` each (own width, scale and bias),
    in the run's teacher order, with their names and loss weights."""

    members: tuple[TeacherOutputs, ...]
    names: tuple[str, ...]
    weights: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.members[0]) if self.members else 0

    @property
    def fingerprint(self) -> str:
        return ensemble_fingerprint(dict(zip(self.names, (m.fingerprint for m in self.members))))

    @staticmethod
    def merge(parts: Sequence[EnsembleOutputs | None]) -> EnsembleOutputs | None:
        """An optimizer step's micro-batches as one, teacher by teacher."""
        if not _all_answered(parts):
            return None
        first = parts[0]
        members = tuple(TeacherOutputs.merge([p.members[i] for p in parts]) for i in range(len(first.members)))
        return replace(first, members=members)

    def take(self, rows: np.ndarray) -> EnsembleOutputs:
        """Every teacher's outputs of `rows` (positions into this batch), in that order."""
        return replace(self, members=tuple(m.take(rows) for m in self.members))

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.members)

    def to_tensors(self, device: torch.device | str) -> dict:
        """The dict the loss modules read for an ensemble: ``teachers`` (one `TeacherOutputs.to_tensors`
        dict each), ``teacher_weights`` (normalised to sum 1) and ``teacher_names``."""
        total = sum(self.weights)
        return {"teachers": [m.to_tensors(device) for m in self.members],
                "teacher_weights": [w / total for w in self.weights], "teacher_names": list(self.names)}


def _all_answered(parts: Sequence) -> bool:
    """True when every micro-batch of a step has teacher outputs, False when none has; a step with
    some of each is an error (the loss would mix distilled and undistilled rows)."""
    if not parts or all(p is None for p in parts):
        return False
    if any(p is None for p in parts):
        raise ValueError("some micro-batches of a step have teacher outputs and some do not")
    return True


def merge_outputs(parts: Sequence[TeacherOutputs | EnsembleOutputs | None]):
    """One optimizer step's outputs from its micro-batches', for one teacher or an ensemble."""
    kind = next((type(p) for p in parts if p is not None), TeacherOutputs)
    return kind.merge(parts)


def ensemble_fingerprint(fingerprints: dict[str, str]) -> str:
    """One string naming a set of teachers (name=fingerprint, sorted), for metrics and logs."""
    return ",".join(f"{name}={fp}" for name, fp in sorted(fingerprints.items()))


def split_ensemble_fingerprint(text: str) -> dict[str, str]:
    """`ensemble_fingerprint`'s teachers back (name → fingerprint); a single teacher's plain
    fingerprint comes back under the name ""."""
    if "=" not in text:
        return {"": text}
    return dict(part.split("=", 1) for part in text.split(","))
