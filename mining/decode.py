"""Image decoding: bytes -> upright (H, W, 3) uint8 RGB, or a clear :class:`DecodeError`.

Handles the odd-but-valid formats a fleet produces (16-bit PNG, grayscale, RGBA,
palette, CMYK JPEG) and applies the EXIF orientation *before* selection, so every
box refers to the upright frame. Refuses decompression bombs above a pixel limit
before decoding the pixels. On a GPU, JPEGs are decoded on the device in batches with
``torchvision.io.decode_jpeg(list, device="cuda")`` and oriented there (torchvision applies
EXIF orientation on CPU only), falling back to Pillow for anything nvJPEG should not or
cannot decode (see :mod:`mining.frames`).
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# We do our own, explicit pixel-limit check (Pillow's warns at 89 MP and raises at 2x that).
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 120_000_000  # 120 MP: well above an 8 MP fleet frame, far below a bomb


class DecodeError(ValueError):
    """An image that cannot be mined. ``reason`` is a short human-readable cause."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) in pixels from the header only (no pixel decode).

    Raises:
        DecodeError: empty or unidentifiable bytes.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except UnidentifiedImageError:
        raise DecodeError(f"not an image (unrecognised format, {len(data)} bytes, starts {data[:8]!r})") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im)
        if arr.dtype == np.uint16 or mode.startswith("I;16"):
            arr8 = (arr.astype(np.uint32) >> 8).astype(np.uint8)
        else:  # 32-bit int: scale by the actual max (covers 16-bit data stored as mode "I")
            hi = max(int(arr.max()), 1)
            arr8 = (arr.astype(np.float64) * (255.0 / (65535 if hi > 255 else 255))).clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        arr8 = (255 * (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-12)).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode == "RGB":
        return im
    return im.convert("RGB")  # L, P, CMYK (Pillow undoes Adobe's inverted CMYK), YCbCr, 1, ...


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes with Pillow.

    Args:
        data: encoded image (JPEG, PNG, WebP, TIFF, BMP, ...).
        max_pixels: refuse images with more pixels than this (decompression-bomb guard).
    Returns:
        (H, W, 3) uint8 RGB, EXIF orientation applied (H, W of the upright frame).
    Raises:
        DecodeError: zero bytes, not an image, truncated/corrupt data, too many pixels.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DecodeError(f"not an image (unrecognised format, {len(data)} bytes, starts {data[:8]!r})") from None
    except Exception as e:  # noqa: BLE001 - header parse errors of any plugin
        raise DecodeError(f"unreadable image header: {type(e).__name__}: {e}") from None
    w, h = im.size
    if w < 1 or h < 1:
        raise DecodeError(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise DecodeError(f"decompression bomb refused: {w}x{h} = {w * h} pixels > limit {max_pixels}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
            im = ImageOps.exif_transpose(im)
            rgb = _to_rgb(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DecodeError(f"truncated or corrupt image data: {e}") from None
    arr = np.array(rgb, dtype=np.uint8)  # a writable copy (torch.from_numpy needs one)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DecodeError(f"unexpected decoded shape {arr.shape}")
    return np.ascontiguousarray(arr)
