"""The frozen open_clip teacher: loading, freezing, fingerprinting and encoding.

The fingerprint names the function the teacher computes (weights + preprocessing + context
length + architecture), so caches keyed by it are invalidated exactly when the teacher changes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from teacher_service.config import TeacherConfig
from teacher_service.contract.preprocess import PreprocessSpec, fit_context, preprocess_spec, to_model_input
from teacher_service.model_check import no_random_init_warning

log = logging.getLogger(__name__)

_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_WRAPPER_KEYS = ("state_dict", "model")
_KEY_PREFIXES = ("module.", "_orig_mod.")


class FrozenTeacher:
    """An open_clip model in eval mode with no trainable parameters, plus what clients need."""

    def __init__(self, model: torch.nn.Module, name: str, device: torch.device, precision: str = "fp32",
                 overrides: dict | None = None):
        self.model = model
        self.name = name
        self.device = torch.device(device)
        self.precision = precision
        self.spec: PreprocessSpec = preprocess_spec(model)
        tok_cfg = open_clip.get_model_tokenize_cfg(model)
        self.context_length: int = int(tok_cfg.get("context_length", 77))
        self.vocab_size: int | None = tok_cfg.get("vocab_size")
        self.logit_scale: float = float(model.logit_scale.detach().exp().reshape(-1)[0])
        bias = getattr(model, "logit_bias", None)
        self.logit_bias: float | None = None if bias is None else float(bias.detach().reshape(-1)[0])
        self.fingerprint: str = compute_fingerprint(model, self.spec, self.context_length, name,
                                                    precision=precision, overrides=overrides)
        probe = np.zeros((1, self.context_length), dtype=np.int64)
        probe[0, 0] = 1
        self.embed_dim: int = int(self.encode_tensors(tokens=torch.from_numpy(probe))["text_features"].shape[1])

    def _autocast(self):
        if self.device.type == "cuda" and self.precision in _AUTOCAST_DTYPES:
            return torch.autocast(device_type="cuda", dtype=_AUTOCAST_DTYPES[self.precision])
        return contextlib.nullcontext()

    def encode_tensors(self, pixels: torch.Tensor | None = None,
                       tokens: torch.Tensor | None = None) -> dict[str, np.ndarray]:
        """Encode already preprocessed pixels [B, 3, h, w] and/or fitted tokens [B, context_length].

        Features are normalised in float32 and only then cast to float16, so the wire format loses
        nothing beyond the final rounding.
        """
        out: dict[str, np.ndarray] = {}
        with torch.inference_mode(), self._autocast():
            if pixels is not None:
                feats = self.model.encode_image(pixels.to(self.device, non_blocking=True))
                out["image_features"] = _to_wire(feats)
            if tokens is not None:
                feats = self.model.encode_text(tokens.to(self.device, non_blocking=True))
                out["text_features"] = _to_wire(feats)
        return out

    def encode(self, images: np.ndarray | None = None, tokens: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """uint8 images [B, H, W, 3] and/or int64 tokens [B, L] → L2-normalised float16 features."""
        if images is None and tokens is None:
            raise ValueError("encode: pass images and/or tokens")
        pixels = None if images is None else to_model_input(images, self.spec, device=self.device)
        toks = None if tokens is None else torch.as_tensor(fit_context(np.asarray(tokens), self.context_length))
        return self.encode_tensors(pixels, toks)

    def info(self) -> dict[str, Any]:
        """What a client needs to check compatibility and build its own losses."""
        return {
            "fingerprint": self.fingerprint,
            "model": self.name,
            "embed_dim": self.embed_dim,
            "image_size": list(self.spec.image_size),
            "preprocess": self.spec.to_dict(),
            "context_length": self.context_length,
            "vocab_size": self.vocab_size,
            "logit_scale": self.logit_scale,
            "logit_bias": self.logit_bias,
            "precision": self.precision,
            "device": str(self.device),
        }


def _to_wire(feats: torch.Tensor) -> np.ndarray:
    return F.normalize(feats.float(), dim=-1).to(torch.float16).cpu().numpy()


def resolve_device(device: str) -> torch.device:
    """'auto' → cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint as a flat {name: tensor} dict, whatever wrapper it was saved in.

    Accepts raw state dicts, {"state_dict": ...} / {"model": ...} wrappers (open_clip training
    checkpoints) and DDP / torch.compile key prefixes ("module.", "_orig_mod.").
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            obj: Any = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"checkpoint {path!r} could not be read: {type(e).__name__}: {e}") from e
    while isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in _WRAPPER_KEYS):
        obj = next(obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict))
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"checkpoint {path!r} holds no state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"checkpoint {path!r} is not a state dict: non-tensor entries {bad[:5]}")
    return {_strip_prefixes(k): v for k, v in obj.items()}


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _KEY_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def load_checkpoint_strict(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Strict load that explains a wrong-architecture checkpoint instead of dumping every key."""
    path = os.fspath(path)
    state = load_state_dict_file(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"checkpoint {path!r} does not match the model architecture: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}, "
            f"{len(shapes)} shape mismatches {shapes[:5]}"
        )
    model.load_state_dict(state, strict=True)


def load_teacher(cfg: TeacherConfig) -> FrozenTeacher:
    """Create, load and freeze the teacher described by `cfg`.

    pretrained None → random init seeded by `cfg.seed` (identical in every replica); an existing
    file → strict load of that checkpoint; anything else → an open_clip pretrained tag.
    """
    if cfg.cpu_affinity:
        from teacher_service.affinity import pin_process

        pin_process(cfg.cpu_affinity)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    device = resolve_device(cfg.device)
    local = cfg.pretrained is not None and os.path.isfile(os.path.expanduser(cfg.pretrained))
    tag = None if (cfg.pretrained is None or local) else cfg.pretrained
    with torch.random.fork_rng(devices=[]), (no_random_init_warning() if local else contextlib.nullcontext()):
        torch.manual_seed(cfg.seed)
        model = open_clip.create_model(cfg.model, pretrained=tag, output_dict=True, **cfg.overrides)
    if local:
        load_checkpoint_strict(model, os.path.expanduser(cfg.pretrained))
        log.info("teacher %s: weights loaded from %s", cfg.model, cfg.pretrained)
    model.eval().requires_grad_(False).to(device)
    precision = cfg.precision
    if device.type != "cuda" and precision != "fp32":
        log.warning("precision %s needs CUDA autocast; computing in fp32 on %s", precision, device)
        precision = "fp32"
    return FrozenTeacher(model, cfg.model, device, precision=precision, overrides=cfg.overrides)


def compute_fingerprint(model: torch.nn.Module, spec: PreprocessSpec, context_length: int, model_name: str,
                        precision: str = "fp32", overrides: dict | None = None) -> str:
    """16 hex chars of sha256 over the weights (sorted names, dtype, shape, bytes) and everything
    else that changes the output: preprocessing, context length, architecture name/overrides, and
    reduced-precision compute (fp32 adds nothing, so fp32 fingerprints stay stable)."""
    h = hashlib.sha256()
    meta = {"model": model_name, "overrides": overrides or {}, "preprocess": spec.to_dict(),
            "context_length": int(context_length)}
    if precision != "fp32":
        meta["precision"] = precision
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        data = t.cpu().contiguous().reshape(-1)
        h.update(data.view(torch.uint8).numpy().data if data.numel() else b"")
    return h.hexdigest()[:16]
