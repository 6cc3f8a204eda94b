"""Loss masks: where in an image the diffusion loss counts.

A subset takes its masks from a folder (`mask_path`: one greyscale image per training image, same file name
stem, any accepted image extension) or from each image's alpha channel (`alpha_mask`). White / opaque = 1
(trained), black / transparent = 0 (ignored), grey weighs in between.

A mask file is decoded like an image (`images.decode_image`: EXIF orientation applied, 16-bit and CMYK files
converted, transparency composited on white) and read as greyscale, so it is matched to the image as both look
in a viewer. It must have the image's aspect ratio; a mask of another resolution is scaled to the image's size.
An alpha mask is the image file's own alpha channel, turned by the image's EXIF orientation with the pixels.

The mask then follows its image exactly: the same resize-to-cover and crop plan (`buckets.plan_crop`, bilinear
instead of Lanczos so a 0/1 edge does not ring), the same flip, and is averaged down to latent size
(`F.interpolate(mode="area")`, as kohya's `apply_masked_loss` does). The latent cache stores it next to the
latent; its key names the mask.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from sdtrain.data.buckets import Size, apply_crop, plan_crop
from sdtrain.data.images import (
    IMAGE_EXTENSIONS, UnreadableImage, content_hash, decode_image, read_image_bytes,
)
from sdtrain.errors import DataError

MASK_FORMAT = "mask-v1"  # bump when the mask rules above change (it is part of the latent cache key)
ASPECT_TOLERANCE = 0.01  # relative difference of width/height ratios a mask may have from its image


@dataclass(frozen=True)
class MaskRef:
    """Where an image's mask comes from: kind "file" (a mask file) or "alpha" (the image's alpha channel, `path`
    and `content_hash` are the image's)."""

    kind: str
    path: Path
    content_hash: str

    def cache_tag(self) -> str:
        return f"{MASK_FORMAT}:{self.kind}:{self.content_hash}"


def find_mask_file(folder: Path, image: Path) -> Path | None:
    """The mask of `image` in `folder`: a file with the image's stem and an accepted image extension (any case)."""
    found = sorted(p for p in folder.glob(f"{_glob_escape(image.stem)}.*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    return found[0] if found else None


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def has_alpha(data: bytes) -> bool:
    """Whether image bytes carry transparency (alpha channel or a transparent palette / grey colour)."""
    with Image.open(io.BytesIO(data)) as image:
        return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info


def decode_mask_file(data: bytes, path) -> Image.Image:
    """A mask file as an upright greyscale ("L") image; raises UnreadableImage."""
    return decode_image(data, path).convert("L")


def decode_alpha(data: bytes, path) -> Image.Image:
    """The alpha channel of image bytes, turned by the image's EXIF orientation, as an "L" image."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return ImageOps.exif_transpose(image).convert("RGBA").getchannel("A")
    except Exception as exc:
        raise UnreadableImage(path, f"cannot read its alpha channel ({exc or type(exc).__name__})") from exc


def fit_problem(mask_size: Size, image_size: Size) -> str:
    """Why a mask of `mask_size` cannot be used for an image of `image_size` (both (w, h)), or ""."""
    mask_ratio, image_ratio = mask_size[0] / mask_size[1], image_size[0] / image_size[1]
    if abs(mask_ratio / image_ratio - 1) > ASPECT_TOLERANCE:
        return (f"is {mask_size[0]}x{mask_size[1]}, its image {image_size[0]}x{image_size[1]} (after EXIF "
                "orientation) has another aspect ratio; save the mask at the image's size")
    return ""


def scan_mask_file(path: Path, image_size: Size) -> tuple[MaskRef | None, str]:
    """(MaskRef, "") for a usable mask file, else (None, why not)."""
    try:
        data = read_image_bytes(path)
        mask = decode_mask_file(data, path)
    except UnreadableImage as exc:
        return None, exc.reason
    problem = fit_problem(mask.size, image_size)
    return (None, problem) if problem else (MaskRef("file", path, content_hash(data)), "")


def load_mask_image(ref: MaskRef, image_size: Size) -> Image.Image:
    """The mask as an "L" image of the image's (upright) size; DataError when its file changed since the scan."""
    try:
        data = read_image_bytes(ref.path)
    except UnreadableImage as exc:
        raise DataError(f"mask {ref.path} became unreadable after the dataset was scanned ({exc.reason}); restore "
                        "it and restart") from exc
    if content_hash(data) != ref.content_hash:
        raise DataError(f"{ref.path} changed after the dataset was scanned; restart training to rescan it")
    mask = decode_alpha(data, ref.path) if ref.kind == "alpha" else decode_mask_file(data, ref.path)
    if mask.size != tuple(image_size):
        mask = mask.resize(tuple(image_size), Image.Resampling.BILINEAR)
    return mask


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """"L" image -> float32 (1, H, W) in [0, 1]."""
    return torch.from_numpy(np.asarray(mask, dtype=np.uint8).copy()).float().div_(255.0)[None]


def crop_mask(mask: Image.Image, image_size: Size, bucket: Size, flip: bool) -> Image.Image:
    """The mask cut to `bucket` by the image's (centred) crop plan, flipped with it."""
    plan = plan_crop(tuple(image_size), tuple(bucket), flip=flip)
    return apply_crop(mask, plan, tuple(bucket), resample=Image.Resampling.BILINEAR)


def to_latent_size(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, H, W) pixel mask -> (1, h, w) by area averaging."""
    return torch.nn.functional.interpolate(mask[None], size=tuple(size), mode="area")[0]


def latent_mask(item, size: tuple[int, int]) -> torch.Tensor:
    """The (1, h, w) latent-size mask of a latent-cache item (`item.mask` set)."""
    mask = load_mask_image(item.mask, item.original_size)
    cropped = crop_mask(mask, item.original_size, item.bucket, item.flip)
    return to_latent_size(mask_to_tensor(cropped), size)


def batch_masks(masks: list[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor | None:
    """(b, 1, h, w) masks of a batch, ones where a sample has none; None when no sample has one."""
    if all(m is None for m in masks):
        return None
    ones = like.new_ones((1, *like.shape[-2:]))
    return torch.stack([ones if m is None else m.to(like) for m in masks])
