"""Aspect-ratio buckets, resize-to-cover + crop, and SDXL size/crop conditioning.

Bucket table (`make_buckets`): for every width w from min_side to max_side in steps of `step`, the tallest
height h (a multiple of `step`, at most max_side) with w * h <= resolution area; kept when h >= min_side,
together with its transpose, plus the square bucket. Same table as kohya's `make_bucket_resolutions`.

Assignment (`bucket_for`): the bucket whose aspect ratio is closest to the image's, measured as
|log(w/h) - log(bw/bh)| so a portrait image and its landscape twin get transposed buckets (kohya compares
plain ratios; the two agree except near ties). With `no_upscale`, the image (scaled down to the resolution
area if it is larger) is floored to multiples of `step` on each side and clamped to [step, max_side]: the
bucket is never wider or taller than the image, except an image under `step` pixels on a side, which is
upscaled to `step` (the smallest bucket there is).

Resize and crop (`plan_crop`, `resize_and_crop`): scale the image uniformly so it covers the bucket
(scale = max(bw / w, bh / h)), then crop the bucket out of it (centred, or at a random offset).

SDXL conditioning (`sdxl_time_ids`): original_size = the decoded image's (h, w) before any resize;
crops_coords_top_left = (top, left) of the crop in the resized image's pixels (after a horizontal flip, in the
flipped image); target_size = the bucket's (h, w). This is how the SDXL paper and diffusers'
train_text_to_image_sdxl.py define them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import cached_property

from PIL import Image

from sdtrain.errors import ConfigError

Size = tuple[int, int]  # (width, height)


def _resolution_wh(resolution) -> Size:
    if isinstance(resolution, int):
        return resolution, resolution
    width, height = resolution
    return int(width), int(height)


def make_buckets(resolution, min_side: int, max_side: int, step: int = 64) -> list[Size]:
    """Sorted (width, height) buckets with area <= resolution area and sides multiples of `step`."""
    width, height = _resolution_wh(resolution)
    if step <= 0:
        raise ConfigError(f"bucket step={step} must be a positive number of pixels, e.g. 64")
    for name, value in (("min_side", min_side), ("max_side", max_side)):
        if value <= 0 or value % step:
            raise ConfigError(f"bucket {name}={value} must be a positive multiple of {step}, e.g. {step * 4}")
    if min_side > max_side:
        raise ConfigError(f"bucket min_side={min_side} is larger than max_side={max_side}; swap or change them")
    max_area = width * height
    square = min(max_side, math.isqrt(max_area) // step * step)
    if square < min_side:
        raise ConfigError(
            f"resolution {width}x{height} is too small for bucket min_side={min_side}; "
            f"lower min_side or raise the resolution"
        )
    buckets = {(square, square)}
    for w in range(min_side, max_side + 1, step):
        h = min(max_side, max_area // w // step * step)
        if h >= min_side:
            buckets.add((w, h))
            buckets.add((h, w))
    return sorted(buckets)


def _aspect_error(width: int, height: int, bucket: Size) -> float:
    return abs(math.log(width / height) - math.log(bucket[0] / bucket[1]))


def closest_bucket(width: int, height: int, buckets: list[Size]) -> Size:
    """The bucket with the closest aspect ratio (ties: the larger area, then the wider)."""
    return min(buckets, key=lambda b: (_aspect_error(width, height, b), -b[0] * b[1], -b[0]))


def no_upscale_bucket(width: int, height: int, max_area: int, max_side: int, step: int = 64) -> Size:
    """Largest bucket not bigger than the image (after scaling it down to max_area); sides in [step, max_side]."""
    scale = min(1.0, math.sqrt(max_area / (width * height)))
    bucket_w = int(width * scale + 1e-9) // step * step
    bucket_h = int(height * scale + 1e-9) // step * step
    return (min(max(bucket_w, step), max_side), min(max(bucket_h, step), max_side))


def bucket_for(width: int, height: int, buckets: list[Size], no_upscale: bool = False,
               max_area: int | None = None, max_side: int | None = None, step: int = 64) -> Size:
    """Bucket of a `width` x `height` image (see module docstring).

    With no_upscale the bucket is computed from the image itself; max_area and max_side default to the
    largest area and side in `buckets`.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not no_upscale:
        return closest_bucket(width, height, buckets)
    if max_area is None:
        max_area = max(w * h for w, h in buckets)
    if max_side is None:
        max_side = max(max(b) for b in buckets)
    return no_upscale_bucket(width, height, max_area, max_side, step)


@dataclass(frozen=True)
class Bucketing:
    """Bucket settings. min_side / max_side default to resolution/2 and resolution*2 (rounded to `step`).

    With enabled=False every image goes to the single bucket `resolution` (resize to cover + crop).
    """

    resolution: int | tuple[int, int] = 512
    min_side: int | None = None
    max_side: int | None = None
    step: int = 64
    no_upscale: bool = False
    enabled: bool = True

    @property
    def max_area(self) -> int:
        width, height = _resolution_wh(self.resolution)
        return width * height

    @property
    def side_limits(self) -> tuple[int, int]:
        width, height = _resolution_wh(self.resolution)
        base = math.isqrt(width * height)
        low = self.min_side if self.min_side is not None else max(self.step, base // 2 // self.step * self.step)
        high = self.max_side if self.max_side is not None else base * 2 // self.step * self.step
        return low, high

    @cached_property
    def buckets(self) -> list[Size]:
        if not self.enabled:
            return [_resolution_wh(self.resolution)]
        low, high = self.side_limits
        return make_buckets(self.resolution, low, high, self.step)

    def assign(self, width: int, height: int) -> Size:
        """The bucket of a `width` x `height` image under these settings."""
        if not self.enabled:
            return _resolution_wh(self.resolution)
        return bucket_for(width, height, self.buckets, self.no_upscale,
                          max_area=self.max_area, max_side=self.side_limits[1], step=self.step)


@dataclass(frozen=True)
class CropPlan:
    """Where a bucket is cut from an image: resized size (w, h) and the crop's (top, left) in it."""

    resized_size: Size
    top: int
    left: int
    flip: bool = False


def plan_crop(original_size: Size, bucket: Size, random_crop: bool = False,
              rng: random.Random | None = None, flip: bool = False) -> CropPlan:
    """Resize-to-cover size and crop offset for an image of `original_size` (w, h) into `bucket`.

    The offset is centred unless `random_crop` (then drawn from `rng`). With `flip` the returned offset is
    the one in the horizontally flipped resized image (left' = resized_w - bucket_w - left).
    """
    width, height = original_size
    bucket_w, bucket_h = bucket
    scale = max(bucket_w / width, bucket_h / height)
    resized_w = max(bucket_w, round(width * scale))
    resized_h = max(bucket_h, round(height * scale))
    spare_w, spare_h = resized_w - bucket_w, resized_h - bucket_h
    if random_crop:
        if rng is None:
            raise ValueError("random_crop needs an rng")
        left, top = rng.randint(0, spare_w), rng.randint(0, spare_h)
    else:
        left, top = spare_w // 2, spare_h // 2
    if flip:
        left = spare_w - left
    return CropPlan((resized_w, resized_h), top, left, flip)


def apply_crop(image: Image.Image, plan: CropPlan, bucket: Size,
               resample: Image.Resampling = Image.Resampling.LANCZOS) -> Image.Image:
    """Resize `image` to plan.resized_size (Lanczos; loss masks bilinear), flip if planned, and cut the bucket out."""
    if image.size != plan.resized_size:
        reducing_gap = 3.0 if plan.resized_size[0] < image.size[0] else None
        image = image.resize(plan.resized_size, resample, reducing_gap=reducing_gap)
    if plan.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image.crop((plan.left, plan.top, plan.left + bucket[0], plan.top + bucket[1]))


def resize_and_crop(image: Image.Image, bucket: Size, random_crop: bool = False,
                    rng: random.Random | None = None, flip: bool = False) -> tuple[Image.Image, tuple[int, int]]:
    """(bucket-sized image, (crop_top, crop_left)) — see `plan_crop` for the offset's frame."""
    plan = plan_crop(image.size, bucket, random_crop, rng, flip)
    return apply_crop(image, plan, bucket), (plan.top, plan.left)


def sdxl_time_ids(original_size: Size, crop_top_left: tuple[int, int], bucket: Size) -> tuple[int, ...]:
    """SDXL add_time_ids: (orig_h, orig_w, crop_top, crop_left, target_h, target_w).

    `original_size` and `bucket` are (width, height); `crop_top_left` is (top, left).
    """
    (orig_w, orig_h), (top, left), (target_w, target_h) = original_size, crop_top_left, bucket
    return (int(orig_h), int(orig_w), int(top), int(left), int(target_h), int(target_w))
