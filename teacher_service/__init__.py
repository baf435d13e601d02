"""teacher_service: a frozen open_clip teacher served by Ray Serve.

Serve itself is imported lazily (`teacher_service.deployment`), so students that only need the
protocol, preprocessing or an in-process engine do not pay for importing Ray Serve.
"""
from .config import TeacherConfig
from .engine import TeacherEngine
from .model import FrozenTeacher, compute_fingerprint, load_state_dict_file, load_teacher
from .preprocess import PreprocessSpec, fit_context, preprocess_spec, to_model_input
from .protocol import EmbedRequest, EmbedResponse, RequestError, RequestLimits, validate_request

__all__ = [
    "TeacherConfig",
    "TeacherEngine",
    "FrozenTeacher",
    "compute_fingerprint",
    "load_state_dict_file",
    "load_teacher",
    "PreprocessSpec",
    "fit_context",
    "preprocess_spec",
    "to_model_input",
    "EmbedRequest",
    "EmbedResponse",
    "RequestError",
    "RequestLimits",
    "validate_request",
]
