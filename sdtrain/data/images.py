"""Image decoding: any accepted file becomes an 8-bit RGB `PIL.Image` the right way up.

Rules (applied in this order):
- EXIF orientation is applied (the image is transposed the way a viewer shows it).
- Transparency (RGBA, LA, PA, palette or grey with a transparent colour) is composited on white.
- 16-bit and 32-bit integer grey ("I;16*", "I") is scaled 0..65535 -> 0..255 (value / 257, rounded);
  float grey ("F") is clipped to 0..255.
- Everything else (L, 1, P, CMYK, YCbCr, LAB, HSV) goes through Pillow's own conversion to RGB
  (CMYK: R = (255 - C) * (255 - K) / 255).

A file that cannot be decoded raises `UnreadableImage(path, reason)`; callers list it and move on.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class UnreadableImage(Exception):
    """An image file that cannot be used; `reason` says why in words a user can act on."""

    def __init__(self, path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def is_image_file(path) -> bool:
    """True for a non-hidden file whose extension (any case) is in IMAGE_EXTENSIONS."""
    path = Path(path)
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def read_image_bytes(path) -> bytes:
    """The file's bytes; UnreadableImage when it cannot be read or is empty."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UnreadableImage(path, f"cannot read file ({exc.strerror or exc})") from exc
    if not data:
        raise UnreadableImage(path, "empty file (0 bytes)")
    return data


def content_hash(data: bytes) -> str:
    """sha256 hex digest of an image file's bytes (the identity used by the latent cache)."""
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, path="<bytes>") -> Image.Image:
    """Decode image bytes to an upright 8-bit RGB image (see module docstring)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except UnreadableImage:
        raise
    except Image.DecompressionBombError as exc:
        raise UnreadableImage(path, f"image too large for Pillow's safety limit ({exc})") from exc
    except Image.UnidentifiedImageError as exc:
        raise UnreadableImage(path, "not a recognised image (unknown format or corrupt header)") from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... on bad data
        message = str(exc) or type(exc).__name__
        raise UnreadableImage(path, f"corrupt or truncated image data ({message})") from exc


def load_image(path) -> Image.Image:
    """Read and decode one image file to upright 8-bit RGB; raises UnreadableImage."""
    return decode_image(read_image_bytes(path), path)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, compositing transparency on white."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(image).astype(np.float64)
        grey = np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
