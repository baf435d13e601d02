"""The losses of a distillation run (moved to a package; split by family next)."""
from student_trainer.losses.registry import (  # noqa: F401
    DEFAULT_WEIGHTS, ENSEMBLE_AVERAGES, ENSEMBLE_TARGET, INIT_LOGIT_SCALE, LOSSES, MAX_LOGIT_SCALE,
    OPTION_DEFAULTS, PER_TEACHER, AFDLoss, ClipLoss, CRDLoss, DistillLoss, EmbedKDLoss, EnsembleDistributionLoss,
    FDLoss, FeatureProjection, GDLoss, ICLLoss, KLDistillLoss, LossSet, MFDLoss, PerTeacherLoss, SigLipLoss,
    accumulated_backward, build_losses, clip_loss_grads, losses_needing_teacher,
)
