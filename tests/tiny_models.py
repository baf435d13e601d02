"""Tiny open_clip architectures shared by the tests (random init, fast on a 2-core CPU)."""
from __future__ import annotations


def tiny_teacher_overrides(embed_dim: int = 48) -> dict:
    """open_clip `create_model` overrides for a ViT-B-32-shaped teacher at 32 px; a fresh dict each call.

    embed_dim 48 differs from the `digits-student` preset's 64, so D_s != D_t paths (projections) run.
    """
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
