"""Image bytes ↔ uint8 RGB arrays: JPEG through simplejpeg (libjpeg-turbo), the rest through Pillow; no MXNet or OpenCV."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image

from faceforge.errors import DataError

FACE_SIZE = 112  # side of the aligned face crops every backbone takes
# Mean and std of pixel/255 per RGB channel that every faceforge backbone (and InsightFace's) is trained on:
# (pixel/255 − 0.5) / 0.5 = pixel / 127.5 − 1 in [-1, 1], which to_unit_range applies.
FACE_NORM = (0.5, 0.5, 0.5)
_PIXEL_SCALE = 127.5
# Formats face datasets use; other Pillow plugins (EPS runs Ghostscript) stay out of reach.
_FORMATS = ("JPEG", "PNG", "BMP")
# Face crops are small: refuse absurd sizes before a corrupt header makes us allocate gigabytes.
_MAX_PIXELS = 4096 * 4096


def _decode_jpeg_fast(data: bytes) -> np.ndarray | None:
    """simplejpeg decodes about 3x faster than Pillow with identical pixels; None hands the bytes to Pillow
    (not a JPEG, CMYK, or damaged: Pillow then gives the authoritative error)."""
    if not data.startswith(b"\xff\xd8"):
        return None
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        if height * width > _MAX_PIXELS:
            return None
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError:
        return None


def to_unit_range(pixels: Any) -> Any:
    """Pixel values 0..255 (a numpy array or a torch tensor, any layout) as floats in [-1, 1], the scaling every
    backbone takes (FACE_NORM); the one place the loader, evaluation and export scale pixels."""
    if isinstance(pixels, np.ndarray):
        return pixels.astype(np.float32) / np.float32(_PIXEL_SCALE) - np.float32(1.0)
    return (pixels.float() / _PIXEL_SCALE).sub_(1.0)  # a new tensor: the subtraction can be in place


def decode_image(data: bytes, where: str) -> np.ndarray:
    """Decode JPEG/PNG/BMP bytes to a writable uint8 H×W×3 RGB array; `where` names the record in errors."""
    fast = _decode_jpeg_fast(data)
    if fast is not None:
        return fast
    try:
        with Image.open(io.BytesIO(data), formats=_FORMATS) as image:
            if image.width * image.height > _MAX_PIXELS:
                raise ValueError(f"{image.width}x{image.height} image is implausibly large")
            return np.array(image.convert("RGB"))
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"{where}: cannot decode image ({reason})") from None


def resize_face(image: np.ndarray, size: int = FACE_SIZE) -> np.ndarray:
    """A uint8 H×W×3 image bilinearly resized to size×size (aspect ratio not kept), as InsightFace does for
    crops that are not 112×112; returned unchanged when it already is."""
    if image.shape[:2] == (size, size):
        return image
    return np.array(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    """Encode a uint8 H×W×3 RGB array as JPEG bytes."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected a uint8 H×W×3 array, got {rgb.dtype} {rgb.shape}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
