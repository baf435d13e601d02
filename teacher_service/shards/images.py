"""Encoded image bytes → RGB uint8 pixels, the one decoder every reader uses.

Training, evaluation, precompute, audits and `kd data folder` all decode here, so a sample one of
them accepts is a sample all of them accept, with the same pixels.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

MAX_IMAGE_PIXELS = 1 << 26  # 67 M pixels (an 8192 x 8192 image): larger ones are refused before decoding


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")



class ImageDecodeError(ValueError):
    """An image member that cannot become RGB pixels; ``reason`` is the skip reason readers count."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _open_checked(data: bytes, max_pixels: int):
    """PIL image with its pixels loaded, its size checked from the header before any pixel is decoded."""
    from PIL import UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("undecodable_image", f"not an image PIL can identify ({exc})") from None
    if image.width * image.height > max_pixels or image.width <= 0 or image.height <= 0:
        image.close()
        reason = "image_too_large" if image.width * image.height > max_pixels else "undecodable_image"
        raise ImageDecodeError(reason, f"image of {image.width}x{image.height} pixels (at most {max_pixels})")
    try:
        image.load()
    except OSError as exc:
        raise ImageDecodeError(_failure_reason(exc), str(exc)) from None
    return image


def _failure_reason(exc: BaseException) -> str:
    """``truncated_image`` for data that ends early (PIL says "truncated" in several wordings), else
    ``undecodable_image``."""
    return "truncated_image" if isinstance(exc, EOFError) or "truncated" in str(exc).lower() else "undecodable_image"


def decode_rgb8(data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Encoded image bytes → uint8 HxWx3, or ImageDecodeError naming the reason.

    Exactly webdataset's ``decode("rgb8")`` (PIL ``convert("RGB")``) for every 8-bit mode, so
    training, precompute and audits see the same pixels. 16-bit greyscale keeps its top 8 bits:
    PIL's own conversion clips at 255 and turns nearly every 16-bit image white. Any decoder
    failure on hostile bytes (PIL raises many types) becomes ``undecodable_image``, or
    ``truncated_image`` where the data ends early.
    """
    try:
        with _open_checked(data, max_pixels) as image:
            if image.mode in _SIXTEEN_BIT_MODES:
                grey = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
                return np.repeat(grey[:, :, None], 3, axis=2)
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except ImageDecodeError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL plugins raise SyntaxError, struct.error, ValueError...
        raise ImageDecodeError(_failure_reason(exc), f"{type(exc).__name__}: {exc}") from None

