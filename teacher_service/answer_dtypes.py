"""The dtypes teacher answers come in, in one import-free place: the configs validate against it,
`contract.answer_codec` encodes and decodes them, the wire and the cache name them (a leaf module, so
the light configs need not import the codec's package)."""
from __future__ import annotations

ANSWER_DTYPES = ("fp16", "bf16", "int8")
DEFAULT_ANSWER_DTYPE = "fp16"  # what a pool answers in unless told otherwise, and what old caches hold
