"""The losses of a distillation run: CLIP/SigLIP task losses, the CLIP-KD and CLIP-Embed-KD
distillation losses, their registry, several teachers at once, and exact gradient accumulation.

Every loss module takes `(student: dict, teacher: dict)` and returns `{"<name>_loss": tensor}`
(unweighted); `LossSet` holds the modules with nonzero weight and applies the weights. Dict keys:
`image_features`, `text_features` ([B, D], L2-normalised), `logit_scale` (already exponentiated),
`logit_bias` (SigLIP), `labels` ([B], Embed-KD), teacher `class_centroids` ([C, D_t], Embed-KD),
student `masked_image_features` (MFD, see `student_trainer.masking.encode_image_masked`).

Distributed semantics (all batch-coupled losses): when torch.distributed has more than one rank,
each rank keeps its own rows and gathers the other ranks' embeddings as columns, with gradients
through the student gather (open_clip `local_loss=True, gather_with_grad=True`). Each rank's
value is its share of the global loss (their mean is the global loss) and, after DDP averages
the parameter gradients, the update equals the single-process update on the global batch.
GD is the exception that needs every row's probabilities, so it computes the global loss on
every rank from gathered features; the same DDP identity holds. With one process no
collective is issued.

The modules: `contrastive` (clip, siglip), `logit_distill` (kl, crd), `feature` (fd, mfd, afd),
`icl`, `gd`, `embed_kd`; `ensemble` (several teachers); `registry` (`LOSSES`, the default weights
and options, `LossSet`, `build_losses`); `accumulation` (`accumulated_backward`); and what the
losses share, `base` (the base class, the projection head) and `inputs` (reading, gathering and
masking the dicts). Each module's docstring names its fixes over the reference code (the
project's distillation-methods notes).
"""
from student_trainer.losses.accumulation import accumulated_backward
from student_trainer.losses.base import INIT_LOGIT_SCALE, MAX_LOGIT_SCALE, DistillLoss, FeatureProjection
from student_trainer.losses.contrastive import ClipLoss, SigLipLoss
from student_trainer.losses.embed_kd import EmbedKDLoss
from student_trainer.losses.ensemble import (ENSEMBLE_AVERAGES, ENSEMBLE_TARGET, PER_TEACHER,
                                             EnsembleDistributionLoss, PerTeacherLoss)
from student_trainer.losses.feature import AFDLoss, FDLoss, MFDLoss
from student_trainer.losses.gd import GDLoss, clip_loss_grads
from student_trainer.losses.icl import ICLLoss
from student_trainer.losses.logit_distill import CRDLoss, KLDistillLoss
from student_trainer.losses.registry import (DEFAULT_WEIGHTS, LOSSES, OPTION_DEFAULTS, LossSet, build_losses,
                                             losses_needing_teacher)

__all__ = [
    "AFDLoss", "CRDLoss", "ClipLoss", "DEFAULT_WEIGHTS", "DistillLoss", "ENSEMBLE_AVERAGES", "ENSEMBLE_TARGET",
    "EmbedKDLoss", "EnsembleDistributionLoss", "FDLoss", "FeatureProjection", "GDLoss", "ICLLoss",
    "INIT_LOGIT_SCALE", "KLDistillLoss", "LOSSES", "LossSet", "MAX_LOGIT_SCALE", "MFDLoss", "OPTION_DEFAULTS",
    "PER_TEACHER", "PerTeacherLoss", "SigLipLoss", "accumulated_backward", "build_losses", "clip_loss_grads",
    "losses_needing_teacher",
]
