"""The dtypes teacher answers come in, in one import-free place: the configs validate against it,
`contract.answer_codec` encodes and decodes them, the wire and the cache name them (a leaf module, so
the light configs need not import the codec's package)."""
from __future__ import annotations

ANSWER_DTYPES = ("fp16", "bf16", "int8")
DEFAULT_ANSWER_DTYPE = "fp16"  # what a pool answers in unless told otherwise, and what old caches hold


def check_answer_dtype(value, name: str = "answer_dtype", *, allow_none: bool = False) -> None:
    """ValueError naming `name`, the bad value and the choices unless `value` is an answer dtype."""
    if value is None and allow_none:
        return
    if value not in ANSWER_DTYPES:
        also = " or None (the pool's default)" if allow_none else ""
        raise ValueError(f"{name}: expected one of {ANSWER_DTYPES}{also}, got {value!r}")
