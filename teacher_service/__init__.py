"""teacher_service: a frozen open_clip teacher served by Ray Serve, and everything students share with it.

Subpackages, one concern each: `contract` (what students and the teacher agree on: request and
response, preprocessing, replayable views), `shards` (the one WebDataset reader), `serve` (the
Serve replica pool), `grpc` (the front door for callers outside Ray), `cache` (the Parquet
embedding cache, precompute, audits). `app` deploys and finds a pool with its gRPC ingress.

Names are re-exported lazily (PEP 562): a gRPC client needs only the codec, so importing the
package must not pull in torch and open_clip.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TeacherConfig": "config",
    "ServingConfig": "config",
    "GrpcOptions": "config",
    "FrozenTeacher": "model",
    "compute_fingerprint": "model",
    "load_state_dict_file": "model",
    "load_teacher": "model",
    "TeacherEngine": "serve.engine",
    "PreprocessSpec": "contract.preprocess",
    "fit_context": "contract.preprocess",
    "preprocess_spec": "contract.preprocess",
    "to_model_input": "contract.preprocess",
    "EmbedRequest": "contract.protocol",
    "EmbedResponse": "contract.protocol",
    "RequestError": "contract.protocol",
    "RequestLimits": "contract.protocol",
    "validate_request": "contract.protocol",
    "deploy": "app",
    "get_teacher_handle": "app",
    "TeacherUnavailableError": "app",
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
