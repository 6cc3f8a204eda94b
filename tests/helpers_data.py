"""Image-file helpers for tests: solid images and a hostile dataset of good-but-awkward and bad files."""

import io

import numpy as np
import torch
from PIL import Image


def save(path, image, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def solid(path, size, colour=(200, 30, 30)):
    return save(path, Image.new("RGB", size, colour))


def to_unit(rgb):
    """8-bit colour -> the [-1, 1] value the loader should produce."""
    return torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) / 127.5 - 1


def build_hostile(folder):
    """Good-but-awkward files and bad files; returns (expected good names, expected skipped names)."""
    solid(folder / "good.png", (96, 64))
    (folder / "good.txt").write_text("a good red image\n", encoding="utf-8")

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buffer, "PNG")
    (folder / "corrupt.png").write_bytes(buffer.getvalue()[:300])
    (folder / "zero.png").write_bytes(b"")

    save(folder / "cmyk.jpg", Image.new("CMYK", (64, 48), (30, 150, 220, 40)), quality=98)
    deep = Image.frombytes("I;16", (48, 64), (np.full((64, 48), 200 * 257, np.uint16)).astype("<u2").tobytes())
    save(folder / "deep.png", deep)

    stored = np.zeros((32, 64, 3), np.uint8)  # 64 wide, 32 high: left red, right blue
    stored[:, :32] = (255, 0, 0)
    stored[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    save(folder / "rotated.jpg", Image.fromarray(stored), quality=95, exif=exif)

    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[:, :32] = (0, 160, 0, 255)  # right half fully transparent
    save(folder / "rgba.png", Image.fromarray(rgba, "RGBA"))

    solid(folder / "tiny.png", (1, 1), (9, 99, 199))

    solid(folder / "badcap.png", (64, 64))
    (folder / "badcap.txt").write_bytes(b"\xff\xfe bad")

    (folder / "notes.md").write_text("not an image")
    solid(folder / "._hidden.png", (8, 8))
    return ({"good.png", "cmyk.jpg", "deep.png", "rotated.jpg", "rgba.png", "tiny.png"},
            {"corrupt.png", "zero.png", "badcap.txt"})
