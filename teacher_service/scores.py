"""Per-sample scores for data selection: each sample's contrastive loss among the samples it came with.

One function defines the score wherever it is computed: the pool (a request that asks for
`EmbedRequest.scores`), a run's inline, cache or hybrid teacher (from the embeddings it holds), and
the student's own loss for `learnability` (`student_trainer.selection`). For row i of a batch's
L2-normalised image embeddings I and text embeddings T, with the model's exponentiated logit scale s:

    score_i = ½ · ( −log softmax_j(s · I_i·T_j)[i]  −  log softmax_j(s · T_i·I_j)[i] )

the symmetric InfoNCE (CLIP) loss of that row: its mean over the rows is open_clip's `ClipLoss`. A
sample's score depends on the other rows (its negatives), so it is defined for a batch, not for a
sample alone: the pool scores the rows of one request together, after coalescing has assembled
them, and remembers the scores of a request's rows (`ScoreMemo`) under the digest of its samples'
content identities in order (`serve.coalesce.batch_identity`), so a run asking again for the same
rows, in the same order, gets the same scores without a second computation. A SigLIP teacher's bias
adds the same constant to every logit of a row, which cancels in the softmax: it is scored by the
same loss.

Teacher embeddings arrive as float16; scores are computed in float32 on the CPU from exactly those
values (`teacher_scores`), so the pool and a run computing from the same embeddings agree. A
caller's `answer_dtype` (bf16, int8: `contract.answer_codec`) is applied after scoring, so it never
changes the scores.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F


def contrastive_row_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: float | torch.Tensor
                         ) -> torch.Tensor:
    """Each row's symmetric InfoNCE loss, float [B] (the module docstring's formula). `image` and
    `text` are [B, D] L2-normalised embeddings of the same B samples, in the same order."""
    if image.shape != text.shape or image.ndim != 2:
        raise ValueError(f"contrastive_row_loss: image {tuple(image.shape)} and text {tuple(text.shape)} "
                         "must be the same [B, D]")
    logits = logit_scale * image @ text.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    per_image = F.cross_entropy(logits, labels, reduction="none")
    per_text = F.cross_entropy(logits.T, labels, reduction="none")
    return 0.5 * (per_image + per_text)


def teacher_scores(image: np.ndarray, text: np.ndarray, logit_scale: float) -> np.ndarray:
    """float32 [B] scores of a teacher's answer (its wire embeddings, any float dtype), on the CPU."""
    if image is None or text is None:
        raise ValueError("teacher_scores: a score needs both the image and the text embeddings of every row")
    with torch.no_grad():
        rows = contrastive_row_loss(torch.from_numpy(np.asarray(image, np.float32)),
                                    torch.from_numpy(np.asarray(text, np.float32)), float(logit_scale))
    return rows.numpy().astype(np.float32, copy=False)


class ScoreMemo:
    """The scores of recently scored requests, by the digest of their samples' identities in order.

    Bounded in rows (`max_rows`, least recently used requests go first); 0 keeps nothing. A score
    is a pure function of the rows' embeddings, and the identities name what the teacher embedded
    (fingerprint, pixels, fitted tokens), so a hit is the score a recomputation would give up to
    the last bits of a forward batched differently."""

    def __init__(self, max_rows: int) -> None:
        if max_rows < 0:
            raise ValueError(f"ScoreMemo: max_rows={max_rows} must be >= 0")
        self.max_rows = max_rows
        self._entries: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._rows = 0

    def get(self, key: bytes) -> np.ndarray | None:
        scores = self._entries.get(key)
        if scores is not None:
            self._entries.move_to_end(key)
        return scores

    def put(self, key: bytes, scores: np.ndarray) -> None:
        if not self.max_rows or len(scores) > self.max_rows or key in self._entries:
            return
        self._entries[key] = scores
        self._rows += len(scores)
        while self._rows > self.max_rows:
            _, dropped = self._entries.popitem(last=False)
            self._rows -= len(dropped)

    def rows(self) -> int:
        return self._rows
