"""Teacher-scored data selection in the training loop (`SelectionConfig`, issue 30).

Each micro-batch a rank draws is a super-batch of k × B samples, answered by the teacher as a whole
(its embeddings and, from a pool, its per-sample scores). `Selector.choose` keeps the B rows that
score highest and their teacher outputs, so the chosen samples are distilled from the answers the
super-batch was scored with: no second teacher forward.

A score is a row's symmetric InfoNCE loss among the super-batch's rows (`teacher_service.scores`),
the one function the pool, the run's own teacher scoring and the student's share:
- `teacher_loss`: the teacher's score, as the pool answered it (`TeacherOutputs.scores`), or
  computed here from the embeddings the run holds where no pool saw the whole super-batch (an
  inline teacher, a cache, a hybrid batch with cache hits): the same values from the same rows;
- `learnability`: the student's score (its current weights, no gradients, eval mode) minus the
  teacher's;
- `uniform`: the first B rows (the super-batch is already a shuffled draw), no score read.

Several teachers: their scores averaged with their normalised `loss_weight`s, the weights the
losses mix them with, so the choice follows the targets the student is trained towards; every
teacher must answer every row (a sample whose metadata names only some teachers stops the run).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from teacher_service.contract.preprocess import to_model_input
from teacher_service.scores import contrastive_row_loss, teacher_scores

from student_trainer.config import SelectionConfig
from student_trainer.data.batches import Batch
from student_trainer.teacher.outputs import EnsembleOutputs, TeacherOutputs

StudentScores = Callable[[Batch], np.ndarray]  # the student's per-row loss on a super-batch


@dataclass
class SelectionStats:
    """One worker's selection counters since it started: rows drawn and kept, seconds spent
    scoring on this worker (teacher scores from held embeddings; the student's scoring forward),
    bytes of teacher answers for the super-batches, and score sums (means of the drawn and kept
    rows show how selective the choice was)."""

    drawn: int = 0
    kept: int = 0
    teacher_s: float = 0.0
    student_s: float = 0.0
    answer_bytes: int = 0
    scored_rows: int = 0
    score_drawn_sum: float = 0.0
    score_kept_sum: float = 0.0

    def score_means(self) -> dict:
        """Mean score of the drawn and of the kept rows (empty without scores: uniform)."""
        if not self.scored_rows:
            return {}
        kept = self.scored_rows * self.kept / max(self.drawn, 1)
        return {"selection_score_drawn_mean": round(self.score_drawn_sum / self.scored_rows, 6),
                "selection_score_kept_mean": round(self.score_kept_sum / kept, 6)}


def top_rows(scores: np.ndarray, keep: int) -> np.ndarray:
    """Positions of the `keep` highest scores, in batch order (ties: the earlier row)."""
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise FloatingPointError(f"selection: the score of row {bad} of the super-batch is {scores[bad]}")
    return np.sort(np.argsort(-scores, kind="stable")[:keep])


def row_scores(outputs: TeacherOutputs) -> np.ndarray:
    """One teacher's scores of a batch: the pool's where it answered them, else from its embeddings."""
    if outputs.answered is not None and not outputs.answered.all():
        raise RuntimeError(f"selection: teacher {outputs.fingerprint} did not answer {int((~outputs.answered).sum())} "
                           f"samples of the super-batch (their metadata names other teachers); a selection score "
                           f"needs every teacher on every sample")
    if outputs.scores is not None:
        return np.asarray(outputs.scores, np.float32)
    return teacher_scores(outputs.image_features, outputs.text_features, outputs.logit_scale)


def ensemble_scores(outputs: TeacherOutputs | EnsembleOutputs) -> np.ndarray:
    """The run's teacher scores: one teacher's, or the teachers' averaged with their loss weights."""
    if isinstance(outputs, TeacherOutputs):
        return row_scores(outputs)
    total = sum(outputs.weights)
    return sum((w / total) * row_scores(m) for w, m in zip(outputs.weights, outputs.members))


def student_row_losses(student: torch.nn.Module, spec, images: torch.Tensor, tokens: torch.Tensor,
                       use_amp: bool = False) -> np.ndarray:
    """The student's per-row contrastive loss on a super-batch (float32 [n]): no gradients, eval mode
    (restored after), no random draw, so scoring leaves the training exactly as it was."""
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            with torch.autocast(images.device.type, enabled=use_amp):
                pixels = to_model_input(images, spec, device=images.device, dtype=student.logit_scale.dtype)
                image = student.encode_image(pixels, normalize=True)
                text = student.encode_text(tokens, normalize=True)
            rows = contrastive_row_loss(image.float(), text.float(), student.logit_scale.exp().float())
    finally:
        student.train(was_training)
    return rows.cpu().numpy().astype(np.float32)


class Selector:
    """Chooses each super-batch's `batch_size` rows by `cfg.score` and counts what it cost."""

    def __init__(self, cfg: SelectionConfig, batch_size: int) -> None:
        self.cfg = cfg
        self.batch_size = batch_size
        self.stats = SelectionStats()

    def choose(self, batch: Batch, outputs, student: StudentScores | None = None):
        """`(batch, outputs)` of the kept rows; `outputs` (None without a teacher) answered the whole
        super-batch. `student` scores the super-batch on the student (learnability needs it)."""
        n, keep = len(batch), self.batch_size
        if n < keep:
            raise ValueError(f"selection: a super-batch of {n} samples cannot keep {keep}")
        self.stats.drawn += n
        self.stats.kept += keep
        self.stats.answer_bytes += outputs.nbytes if outputs is not None else 0
        if self.cfg.score == "uniform":
            rows = np.arange(keep)
        else:
            scores = self.scores(batch, outputs, student)
            rows = top_rows(scores, keep)
            self.stats.scored_rows += n
            self.stats.score_drawn_sum += float(np.sum(scores, dtype=np.float64))
            self.stats.score_kept_sum += float(np.sum(scores[rows], dtype=np.float64))
        return batch.take(rows), (outputs.take(rows) if outputs is not None else None)

    def scores(self, batch: Batch, outputs, student: StudentScores | None) -> np.ndarray:
        """Each row's score by `cfg.score`, the seconds spent counted (teacher, student)."""
        if outputs is None:
            raise RuntimeError(f"selection.score {self.cfg.score!r}: the super-batch has no teacher outputs")
        started = time.perf_counter()
        teacher = ensemble_scores(outputs)
        self.stats.teacher_s += time.perf_counter() - started
        if self.cfg.score == "teacher_loss":
            return teacher
        if student is None:
            raise ValueError("selection.score 'learnability' needs the student's scores (Selector.choose(student=...))")
        started = time.perf_counter()
        own = student(batch)
        self.stats.student_s += time.perf_counter() - started
        return own - teacher
