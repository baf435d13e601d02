"""Compressed teacher answers: L2-normalised embedding rows as fp16, bf16 or int8.

The pool computes full-precision rows (float16, `model._to_wire`) and encodes each response in the
dtype its caller asked for (`EmbedRequest.answer_dtype`, default the pool's
`serving.answer_dtype`); the cache stores rows in the dtype it was written with. Students decode
to float32, the dtype their losses compute in.

- fp16: IEEE half, 2 bytes an element. The answer every client got before the other dtypes
  existed, and still gets unchanged: a plain float16 array, never wrapped.
- bf16: the top 16 bits of each float32 with round-to-nearest-even, as uint16 (numpy has no
  bfloat16; torch's float32 -> bfloat16 conversion gives identical bits). Same 2 bytes as fp16 with
  3 fewer mantissa bits: relative error <= 2^-8 an element, larger than fp16's 2^-11, for no fewer
  bytes on unit rows (whose elements never need bf16's range). Offered for callers that train in bf16.
- int8: symmetric quantisation with one float32 scale per row, s = max|x| / 127 and
  q = round(x / s): D + 4 bytes a row, error <= s / 2 an element. A scale per row keeps every
  row's answer independent of the rows it shares a response or a cache file with: a row decodes
  the same from any response, append file or compacted file, and compaction copies rows as they
  are. A scale per dimension of a response would not, and costs 4 D bytes a response: more than
  the rows' own scales whenever a response holds fewer than D samples. Measured on a trained Fashion-MNIST teacher's
  rows (benchmarks/results/answer_codec.md) it loses less: mean 1 - cos 1.0e-5 against 1.9e-5,
  KL of the batch's softmax at s = 100 5.2e-4 against 6.8e-4 (max 2.6e-3 against 7.0e-3), the
  same max error and zero-shot top-1; both stay an order above bf16 (1.4e-6, 9.9e-5).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from teacher_service.answer_dtypes import ANSWER_DTYPES, DEFAULT_ANSWER_DTYPE, check_answer_dtype

INT8_LEVELS = 127  # symmetric: -127..127, so x and -x quantise alike
_STORED = {"fp16": np.dtype(np.float16), "bf16": np.dtype(np.uint16), "int8": np.dtype(np.int8)}
SCALE_DTYPE = np.dtype(np.float32)


@dataclass(frozen=True)
class EncodedRows:
    """Rows [n, D] in one answer dtype: `values` float16 (fp16), uint16 (bf16 bit patterns) or int8
    (int8, with `scales` float32 [n], one per row)."""

    dtype: str
    values: np.ndarray
    scales: np.ndarray | None = None

    def __post_init__(self) -> None:
        check_answer_dtype(self.dtype, "EncodedRows.dtype")
        values, scales = self.values, self.scales
        if not isinstance(values, np.ndarray) or values.ndim != 2 or values.dtype != _STORED[self.dtype]:
            got = f"{values.dtype} {values.shape}" if isinstance(values, np.ndarray) else type(values).__name__
            raise ValueError(f"EncodedRows: {self.dtype} rows are {_STORED[self.dtype]} [n, D], got {got}")
        if (self.dtype == "int8") != (scales is not None):
            raise ValueError(f"EncodedRows: {self.dtype} rows {'need' if self.dtype == 'int8' else 'take no'} scales")
        if scales is not None and (scales.dtype != SCALE_DTYPE or scales.shape != (len(values),)):
            raise ValueError(f"EncodedRows: int8 scales are float32 [{len(values)}], got {scales.dtype} {scales.shape}")

    def __len__(self) -> int:
        return len(self.values)

    @staticmethod
    def stored_dtype(dtype: str) -> np.dtype:
        """The numpy dtype of `values` for answer dtype `dtype`."""
        return _STORED[dtype]

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of the encoded rows (values and scales): what the answer costs on the wire or on disk."""
        return int(self.values.nbytes + (0 if self.scales is None else self.scales.nbytes))

    def take(self, rows) -> EncodedRows:
        """The rows at `rows` (indices or a boolean mask), still encoded."""
        return EncodedRows(self.dtype, self.values[rows], None if self.scales is None else self.scales[rows])

    def decode(self) -> np.ndarray:
        """float32 [n, D]."""
        if self.dtype == "fp16":
            return self.values.astype(np.float32)
        if self.dtype == "bf16":
            return bf16_bits_to_float32(self.values)
        return self.values.astype(np.float32) * self.scales[:, None]

    @staticmethod
    def concat(parts: list[EncodedRows]) -> EncodedRows:
        """One EncodedRows of `parts` (one dtype) in order."""
        kinds = {p.dtype for p in parts}
        if len(kinds) != 1:
            raise ValueError(f"EncodedRows.concat: parts in several dtypes {sorted(kinds)}")
        scales = None if parts[0].scales is None else np.concatenate([p.scales for p in parts])
        return EncodedRows(parts[0].dtype, np.concatenate([p.values for p in parts]), scales)


def encode_rows(rows: np.ndarray, dtype: str) -> EncodedRows:
    """float32 / float16 rows [n, D] (finite) in `dtype`."""
    check_answer_dtype(dtype)
    rows = np.asarray(rows)
    if rows.ndim != 2 or not np.issubdtype(rows.dtype, np.floating):
        raise ValueError(f"encode_rows: expected float rows [n, D], got {rows.dtype} {rows.shape}")
    if dtype == "fp16":
        return EncodedRows("fp16", np.ascontiguousarray(rows, dtype=np.float16))
    if dtype == "bf16":
        return EncodedRows("bf16", float32_to_bf16_bits(rows))
    return _int8_per_row(rows.astype(np.float32, copy=False))


def _int8_per_row(rows: np.ndarray) -> EncodedRows:
    peak = np.abs(rows).max(axis=1) if rows.shape[1] else np.zeros(len(rows), np.float32)
    scales = (peak / INT8_LEVELS).astype(SCALE_DTYPE)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)  # an all-zero row stays zero
    q = np.clip(np.rint(rows / safe[:, None]), -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
    return EncodedRows("int8", q, scales)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns of `values`, rounded to nearest, ties to even: torch's bits for
    every value but NaN, which becomes the quiet NaN 0x7FC0 (answers never hold NaN: the engine
    refuses them)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    bits = values.view(np.uint32)
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():  # the carry of rounding a NaN could run into the sign bit
        rounded[nan] = 0x7FC0
    return rounded


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """float32 values of uint16 bfloat16 bit patterns (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def answer_rows(rows: np.ndarray | None, dtype: str) -> np.ndarray | EncodedRows | None:
    """What a response carries for `rows` in `dtype`: fp16 as the plain float16 array it always
    was (byte for byte), bf16 and int8 as EncodedRows."""
    if rows is None:
        return None
    if dtype == DEFAULT_ANSWER_DTYPE:
        return np.asarray(rows, dtype=np.float16)
    return encode_rows(rows, dtype)


def decode_rows(value: np.ndarray | EncodedRows | None) -> np.ndarray | None:
    """Features to compute with: a plain array (an fp16 answer, a cache's fp16 rows) as it is,
    EncodedRows decoded to float32."""
    if value is None or isinstance(value, np.ndarray):
        return value
    if isinstance(value, EncodedRows):
        return value.decode()
    raise TypeError(f"decode_rows: expected a numpy array or EncodedRows, got {type(value).__name__}")


def round_trip(rows: np.ndarray, dtype: str) -> np.ndarray:
    """`rows` as a caller asking for `dtype` would receive them (fp16 rows stay float16)."""
    return decode_rows(answer_rows(rows, dtype))


def encode_response(response, dtype: str):
    """A copy of an EmbedResponse with its features in `dtype` (the same object for fp16: the pool's
    rows are float16 already)."""
    check_answer_dtype(dtype)
    if dtype == DEFAULT_ANSWER_DTYPE:
        return response
    return dataclasses.replace(response, image_features=answer_rows(response.image_features, dtype),
                               text_features=answer_rows(response.text_features, dtype))


def bytes_per_row(dtype: str, dim: int) -> int:
    """Encoded bytes of one row of width `dim` (values and its scale)."""
    check_answer_dtype(dtype)
    return dim * _STORED[dtype].itemsize + (SCALE_DTYPE.itemsize if dtype == "int8" else 0)
