"""teacher_service: a frozen open_clip teacher served by Ray Serve.

Names are re-exported lazily (PEP 562): the gRPC ingress imports `teacher_service.proto` and a
gRPC client needs only the codec, so importing the package must not pull in torch and open_clip.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TeacherConfig": "config",
    "TeacherEngine": "engine",
    "FrozenTeacher": "model",
    "compute_fingerprint": "model",
    "load_state_dict_file": "model",
    "load_teacher": "model",
    "PreprocessSpec": "preprocess",
    "fit_context": "preprocess",
    "preprocess_spec": "preprocess",
    "to_model_input": "preprocess",
    "EmbedRequest": "protocol",
    "EmbedResponse": "protocol",
    "RequestError": "protocol",
    "RequestLimits": "protocol",
    "validate_request": "protocol",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'teacher_service' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
