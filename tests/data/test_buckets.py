"""Aspect-ratio buckets, resize + crop geometry and SDXL conditioning."""

import random

import numpy as np
import pytest
from PIL import Image

from sdtrain.data.buckets import (
    Bucketing, bucket_for, make_buckets, plan_crop, resize_and_crop, sdxl_time_ids,
)
from sdtrain.errors import ConfigError

# kohya sd-scripts' bucket table for resolution 512, min 256, max 1024, step 64 (written out by hand:
# for w = 256..1024, h = min(1024, floor(512*512 / w / 64) * 64), kept when h >= 256, plus transposes)
KOHYA_512 = [
    (256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (576, 448), (640, 384), (704, 320),
    (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]
KOHYA_512_ALL = sorted(set(KOHYA_512) | {(h, w) for w, h in KOHYA_512})

# the aspect-ratio buckets of the SDXL paper's training (a subset of the 1024 table with sides 512..2048)
SDXL_PAPER = [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
              (1536, 640), (640, 1536)]


def test_bucket_table_matches_kohya_512():
    assert make_buckets(512, 256, 1024, 64) == KOHYA_512_ALL


def test_bucket_table_1024_contains_sdxl_buckets_and_obeys_limits():
    buckets = Bucketing(1024).buckets
    assert Bucketing(1024).side_limits == (512, 2048)
    assert set(SDXL_PAPER) <= set(buckets)
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert 512 <= w <= 2048 and 512 <= h <= 2048
        assert w * h <= 1024 * 1024
        # no bucket could grow by one step on its short side and stay within the area
        assert min(w, h) + 64 > 2048 or (w + 64) * h > 1024 * 1024 or w * (h + 64) > 1024 * 1024


@pytest.mark.parametrize("size,expected", [
    ((512, 512), (512, 512)),
    ((3000, 3000), (512, 512)),
    ((768, 512), (640, 384)),      # 1.5 -> 1.667 (the 1.286 bucket is further)
    ((1920, 1080), (640, 384)),
    ((1080, 1920), (384, 640)),
    ((1000, 250), (1024, 256)),    # exactly 4:1
    ((600, 500), (576, 448)),      # 1.2 -> 1.286
    ((50, 40), (576, 448)),        # small images are upscaled to a full bucket by default
    ((10, 4000), (256, 1024)),     # extreme ratios clamp to the most extreme bucket
])
def test_bucket_for_closest_aspect(size, expected):
    assert bucket_for(*size, KOHYA_512_ALL) == expected
    transposed = bucket_for(size[1], size[0], KOHYA_512_ALL)
    assert transposed == (expected[1], expected[0])


@pytest.mark.parametrize("size,expected", [
    ((300, 200), (256, 192)),      # smaller than the area: floor each side to 64
    ((4000, 3000), (576, 384)),    # scaled to 512^2 area: 591.2 x 443.4 -> floors
    ((1, 1), (64, 64)),            # below one step: the 64 x 64 minimum
    ((640, 100), (640, 64)),
])
def test_no_upscale_buckets(size, expected):
    bucketing = Bucketing(512, no_upscale=True)
    assert bucketing.assign(*size) == expected


def test_no_upscale_never_exceeds_image_and_sides_are_multiples_of_64():
    bucketing = Bucketing(512, no_upscale=True)
    rng = np.random.default_rng(0)
    for w, h in rng.integers(64, 3000, size=(300, 2)):
        bw, bh = bucketing.assign(int(w), int(h))
        assert bw % 64 == 0 and bh % 64 == 0 and bw >= 64 and bh >= 64
        assert bw <= w and bh <= h
        assert bw * bh <= 512 * 512 and max(bw, bh) <= 1024
        # and the crop really is a downscale: resize-to-cover scale <= 1
        plan = plan_crop((int(w), int(h)), (bw, bh))
        assert plan.resized_size[0] <= w and plan.resized_size[1] <= h


def test_disabled_bucketing_uses_one_bucket():
    assert Bucketing((768, 512), enabled=False).assign(100, 900) == (768, 512)


def test_bad_bucket_settings_are_config_errors():
    with pytest.raises(ConfigError, match="multiple of 64"):
        make_buckets(512, 250, 1024)
    with pytest.raises(ConfigError, match="larger than max_side"):
        make_buckets(512, 1024, 512)
    with pytest.raises(ConfigError, match="too small"):
        make_buckets(128, 256, 1024)


def coordinate_image(width, height):
    """R = x * 255 / (width - 1), G = y * 255 / (height - 1): pixels say where they came from."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).round().astype(np.uint8))


def test_centre_crop_geometry_from_source_coordinates():
    image = coordinate_image(300, 200)
    out, (top, left) = resize_and_crop(image, (128, 128))
    # cover scale = max(128/300, 128/200) = 0.64 -> 192 x 128; centred: left = (192 - 128) / 2 = 32
    assert out.size == (128, 128) and (top, left) == (0, 32)
    red = np.asarray(out)[64, :, 0].astype(float)
    source_x = (np.arange(128) + left + 0.5) / 0.64 - 0.5
    assert np.abs(red - source_x * 255 / 299)[4:-4].max() < 4
    green = np.asarray(out)[:, 64, 1].astype(float)
    source_y = (np.arange(128) + 0.5) / 0.64 - 0.5
    assert np.abs(green - source_y * 255 / 199)[4:-4].max() < 4


def test_flip_mirrors_the_crop_and_reports_left_in_flipped_frame():
    image = coordinate_image(300, 200)
    plain, (top, left) = resize_and_crop(image, (128, 128), random_crop=True, rng=random.Random(1))
    flipped, (f_top, f_left) = resize_and_crop(image, (128, 128), random_crop=True, rng=random.Random(1), flip=True)
    assert left != 32  # an off-centre crop, so the flipped offset differs
    assert np.array_equal(np.asarray(flipped), np.asarray(plain)[:, ::-1])
    assert f_top == top and f_left == 192 - 128 - left
    # in the flipped resized image, column f_left holds what was column (191 - f_left) before flipping
    resized = image.resize((192, 128), Image.Resampling.LANCZOS).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert np.array_equal(np.asarray(flipped), np.asarray(resized)[f_top:f_top + 128, f_left:f_left + 128])


def test_random_crop_offsets_cover_the_range_deterministically():
    offsets = [plan_crop((300, 200), (128, 128), True, random.Random(s)).left for s in range(200)]
    assert min(offsets) == 0 and max(offsets) == 64
    assert offsets == [plan_crop((300, 200), (128, 128), True, random.Random(s)).left for s in range(200)]
    with pytest.raises(ValueError):
        plan_crop((300, 200), (128, 128), True, None)


def test_upscale_of_one_pixel_image():
    out, crop = resize_and_crop(Image.new("RGB", (1, 1), (9, 99, 199)), (64, 128))
    assert out.size == (64, 128) and crop == (0, 32)  # cover: 128 x 128, centred left = 32
    assert (np.asarray(out) == (9, 99, 199)).all()


def test_sdxl_time_ids_order():
    # original 300x200 (w x h), crop top=0 left=32, bucket 128x128 -> (orig_h, orig_w, top, left, h, w)
    assert sdxl_time_ids((300, 200), (0, 32), (128, 128)) == (200, 300, 0, 32, 128, 128)
    assert sdxl_time_ids((1920, 1080), (5, 7), (640, 384)) == (1080, 1920, 5, 7, 384, 640)
