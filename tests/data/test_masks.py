"""Loss masks follow their image: EXIF orientation, bucket resize, crop and flip, then area-averaged to latent
size; they are cached with the latent and a changed mask is a new cache entry.

The reference is the image pipeline itself: an image whose pixels *are* its mask (grey = mask value) goes
through `latent_pixels`, and the mask must match it wherever the picture is flat (edges differ only by the
resampling filter: Lanczos for images, bilinear for masks)."""

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrain.data.buckets import Bucketing
from sdtrain.data.cache import LatentCache
from sdtrain.data.dataset import SubsetSpec, latent_item, latent_pixels, scan_dataset
from sdtrain.data.masks import latent_mask, to_latent_size

ONE_BUCKET = Bucketing(64, enabled=False)  # every image resized to cover 64x64 and centre-cropped


def pattern(width: int, height: int) -> np.ndarray:
    """An asymmetric 0/255 mask pattern (upright): white block top-left, white stripe on the right."""
    mask = np.zeros((height, width), np.uint8)
    mask[: height // 2, : width // 3] = 255
    mask[:, width - width // 4:] = 255
    return mask


def rotated_for_exif6(upright: np.ndarray) -> np.ndarray:
    """The stored pixels of an image that EXIF orientation 6 ("rotate 90° clockwise to display") shows upright."""
    return np.rot90(upright, k=1).copy()  # stored = upright rotated 90° counter-clockwise


def exif6():
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif


def image_as_mask(item) -> torch.Tensor:
    """The image pipeline's own (1, h, w) latent-size picture of a grey image (0..1)."""
    pixels = latent_pixels(item)[:1]  # [-1, 1]
    return to_latent_size((pixels + 1) / 2, (item.bucket[1] // 8, item.bucket[0] // 8))


def flat_region(reference: torch.Tensor) -> torch.Tensor:
    return (reference < 0.02) | (reference > 0.98)


@pytest.mark.parametrize("flip", [False, True])
def test_mask_file_follows_exif_resize_crop_and_flip(tmp_path, flip):
    upright = pattern(48, 96)  # portrait: resized to 64x128 and cropped 32 px top and bottom
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    grey = rotated_for_exif6(upright)
    Image.fromarray(np.stack([grey] * 3, -1)).save(images / "photo.png", exif=exif6())
    Image.fromarray(upright).save(masks / "photo.png")  # painted on the upright picture, no EXIF
    (images / "photo.txt").write_text("a photo")
    dataset = scan_dataset([SubsetSpec(images, mask_path=masks)], ONE_BUCKET)
    record = dataset.records[0]
    assert record.original_size == (48, 96) and record.mask is not None
    item = latent_item(record, flip=flip)
    mask, reference = latent_mask(item, (8, 8)), image_as_mask(item)
    assert mask.shape == (1, 8, 8)
    flat = flat_region(reference)
    assert flat.sum() >= 30
    torch.testing.assert_close(mask[flat], reference[flat].round(), rtol=0, atol=0.02)
    assert not torch.allclose(mask, mask.flip(-1))  # asymmetric: a missed flip would show


def test_alpha_mask_follows_exif_and_the_transparent_part_is_ignored(tmp_path):
    upright = pattern(64, 64)
    stored = rotated_for_exif6(upright)
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 3] = stored  # black pixels; opaque where the pattern is white
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(rgba, "RGBA").save(folder / "cutout.png", exif=exif6())
    Image.new("RGB", (64, 64), (10, 20, 30)).save(folder / "plain.png")
    dataset = scan_dataset([SubsetSpec(folder, alpha_mask=True)], ONE_BUCKET)
    by_name = {r.path.name: r for r in dataset.records}
    assert by_name["plain.png"].mask is None  # no alpha: trained everywhere
    assert "1 image of subset 0 has no alpha channel: trained on the whole image" in dataset.summary()
    item = latent_item(by_name["cutout.png"], flip=True)
    mask = latent_mask(item, (8, 8))
    # transparency is composited on white, so the decoded image is white where the mask is 0
    reference = 1 - image_as_mask(item)
    flat = flat_region(reference)
    torch.testing.assert_close(mask[flat], reference[flat].round(), rtol=0, atol=0.02)
    expected = torch.from_numpy(upright[:, ::-1].copy()).float().div(255)[None]  # no resize/crop: 64x64 bucket
    torch.testing.assert_close(mask, to_latent_size(expected, (8, 8)), rtol=0, atol=1e-6)


def test_mask_problems_are_reported(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    for name in ("good", "wide", "none"):
        (images).mkdir(exist_ok=True)
        Image.new("RGB", (64, 64), (50, 50, 50)).save(images / f"{name}.png")
    masks.mkdir()
    Image.new("L", (32, 32), 255).save(masks / "good.PNG")  # another size, same aspect: scaled
    Image.new("L", (64, 32), 255).save(masks / "wide.png")  # another aspect ratio
    dataset = scan_dataset([SubsetSpec(images, mask_path=masks)], ONE_BUCKET)
    by_name = {r.path.name: r for r in dataset.records}
    assert set(by_name) == {"good.png", "none.png"}
    assert by_name["good.png"].mask.path.name == "good.PNG" and by_name["none.png"].mask is None
    assert [s.path.name for s in dataset.skipped] == ["wide.png"]
    assert "another aspect ratio" in dataset.skipped[0].reason
    summary = dataset.summary()
    assert "loss masks from" in summary and "1 of 2 images" in summary
    assert "no mask file with the same name" in summary
    torch.testing.assert_close(latent_mask(latent_item(by_name["good.png"], False), (8, 8)), torch.ones(1, 8, 8))


def test_masks_are_cached_with_their_latents(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    Image.new("RGB", (64, 64), (50, 50, 50)).save(images / "a.png")
    Image.fromarray(pattern(64, 64)).save(masks / "a.png")
    encoded = []

    def encode(chunk):
        encoded.extend(chunk)
        return torch.stack([latent_pixels(item)[:, ::8, ::8].repeat(2, 1, 1)[:4] for item in chunk])

    cache = LatentCache(tmp_path / "cache", "vae")

    def cached_mask():
        record = scan_dataset([SubsetSpec(images, mask_path=masks)], ONE_BUCKET).records[0]
        item = latent_item(record, flip=False)
        cache.ensure([item], encode)
        latents, mask = cache.load_with_mask(item)
        assert latents.shape == (4, 8, 8)
        torch.testing.assert_close(mask, latent_mask(item, (8, 8)), rtol=0, atol=0)
        return mask

    first = cached_mask()
    assert len(encoded) == 1 and first.mean() not in (0.0, 1.0)
    cached_mask()
    assert len(encoded) == 1  # reused
    fingerprint = scan_dataset([SubsetSpec(images, mask_path=masks)], ONE_BUCKET).fingerprint()
    Image.new("L", (64, 64), 0).save(masks / "a.png")  # the mask changed: a new entry, a new dataset fingerprint
    assert cached_mask().sum() == 0 and len(encoded) == 2
    assert scan_dataset([SubsetSpec(images, mask_path=masks)], ONE_BUCKET).fingerprint() != fingerprint
