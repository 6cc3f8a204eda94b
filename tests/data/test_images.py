"""Image decoding: each awkward format becomes the 8-bit RGB pixels a naive formula predicts."""

import io

import numpy as np
import pytest
from PIL import Image

from sdtrain.data.images import IMAGE_EXTENSIONS, UnreadableImage, is_image_file, load_image


def pixels(image):
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def test_extensions_cover_the_issue_formats():
    assert set(IMAGE_EXTENSIONS) == {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
    assert is_image_file("a/B.PNG") and is_image_file("x.webp") and is_image_file("x.bmp")
    assert not is_image_file("x.txt") and not is_image_file("._x.png")


@pytest.mark.parametrize("fmt,ext", [("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp"), ("BMP", ".bmp")])
def test_plain_rgb_formats_round_trip(tmp_path, fmt, ext):
    array = np.zeros((24, 40, 3), np.uint8)
    array[:, :20] = (200, 30, 30)
    array[:, 20:] = (30, 30, 200)
    path = tmp_path / f"img{ext}"
    Image.fromarray(array).save(path, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    got = pixels(load_image(path))
    assert got.shape == (24, 40, 3)
    tolerance = 0 if fmt in ("PNG", "BMP") else 12
    # compare away from the colour edge (lossy codecs blur it)
    assert np.abs(got[:, :16] - (200, 30, 30)).max() <= tolerance
    assert np.abs(got[:, 24:] - (30, 30, 200)).max() <= tolerance


def test_exif_orientation_6_is_rotated_clockwise(tmp_path):
    # stored 40 wide x 20 high: left half red, right half blue, plus a green top-left block
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    stored[:8, :8] = (0, 255, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, format="JPEG", quality=95, exif=exif)
    got = pixels(load_image(path))
    expected = np.rot90(stored, k=-1).astype(int)  # numpy: k=-1 is clockwise
    assert got.shape == expected.shape == (40, 20, 3)
    # interior of each region (JPEG blurs edges)
    # old left half -> top half; old top-left corner -> top-right corner
    assert np.abs(got[10:18, 2:18] - (255, 0, 0)).max() < 20
    assert np.abs(got[24:38, 2:18] - (0, 0, 255)).max() < 20
    assert np.abs(got[1:6, 13:19] - (0, 255, 0)).max() < 40
    assert np.abs(got - expected).mean() < 6


def test_rgba_transparency_is_composited_on_white(tmp_path):
    array = np.zeros((10, 30, 4), np.uint8)
    array[:, :10] = (255, 0, 0, 255)      # opaque red
    array[:, 10:20] = (0, 0, 0, 0)        # fully transparent -> white
    array[:, 20:] = (0, 0, 255, 128)      # half-transparent blue
    path = tmp_path / "rgba.png"
    Image.fromarray(array, "RGBA").save(path)
    got = pixels(load_image(path))
    alpha = 128 / 255
    half_blue = np.array([(1 - alpha) * 255, (1 - alpha) * 255, alpha * 255 + (1 - alpha) * 255])
    assert (got[:, :10] == (255, 0, 0)).all()
    assert (got[:, 10:20] == 255).all()
    assert np.abs(got[:, 20:] - half_blue).max() <= 1


def test_palette_with_transparency_and_la_on_white(tmp_path):
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([10, 200, 10] + [0, 0, 0] * 255)
    palette.info["transparency"] = 0
    path = tmp_path / "p.png"
    palette.save(path, transparency=0)
    assert (pixels(load_image(path)) == 255).all()

    la = Image.fromarray(np.stack([np.full((6, 6), 40, np.uint8), np.full((6, 6), 0, np.uint8)], -1), "LA")
    path = tmp_path / "la.png"
    la.save(path)
    assert (pixels(load_image(path)) == 255).all()


def test_sixteen_bit_grey_png_scaled_to_8_bit(tmp_path):
    values = np.array([[0, 100, 200, 255]], np.uint16) * 257  # v * 257 is the exact 16-bit twin of v
    image = Image.frombytes("I;16", (4, 1), values.astype("<u2").tobytes())
    path = tmp_path / "deep.png"
    image.save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")  # really stored / decoded as 16-bit
    got = pixels(load_image(path))
    assert (got[0, :, 0] == [0, 100, 200, 255]).all()
    assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()


def test_cmyk_jpeg_converted_with_naive_formula(tmp_path):
    c, m, y, k = 30, 150, 220, 40
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (c, m, y, k)).save(path, format="JPEG", quality=98)
    expected = np.array([(255 - v) * (255 - k) / 255 for v in (c, m, y)])
    assert np.abs(pixels(load_image(path))[4:12, 4:12] - expected).max() <= 6


def test_grey_and_one_by_one(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (1, 1), 77).save(path)
    got = pixels(load_image(path))
    assert got.shape == (1, 1, 3) and (got == 77).all()


def test_bad_files_raise_unreadable_with_reason(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(UnreadableImage, match="empty file"):
        load_image(empty)

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buffer, "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(UnreadableImage, match="truncated|corrupt") as info:
        load_image(truncated)
    assert info.value.path == truncated

    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image at all")
    with pytest.raises(UnreadableImage, match="not a recognised image"):
        load_image(garbage)

    with pytest.raises(UnreadableImage, match="cannot read"):
        load_image(tmp_path / "missing.png")
