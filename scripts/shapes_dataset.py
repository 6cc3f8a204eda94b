"""A procedurally generated, captioned world of coloured shapes: the pretraining data of the tiny built-in models,
the demo dataset (a shape they have never seen) and the held-out sets both are measured on.

    python scripts/shapes_dataset.py demo [--out datasets/demo]          # write the demo dataset (stars)
    python scripts/shapes_dataset.py sample --out DIR [--count 64] [--seed 0]   # pretraining images to look at

Every image is a pure function of (seed, index): `pretraining_example(seed, i)` gives the same picture and
caption on any machine (Python's string-seeded `random.Random` and Pillow drawing, no numpy or torch
randomness). Scenes are drawn at 4x and box-filtered down, so edges are anti-aliased.

The pretraining distribution has circles, squares and triangles in eight colours on nine backgrounds, in three
sizes and five positions, single objects, pairs of the same object ("two small red circles") and two different
objects in a relation ("a red triangle above a blue circle"), with compositional captions:

    a small red triangle at the left on a grey background
    two blue circles on a white background
    a yellow square above a small purple triangle on a black background

Images come in the aspect-ratio buckets the tiny models train in (64x64, 64x128, 128x64 pixels).
Held out of pretraining: the single-object combinations in `HELD_OUT` (shape, colour and background are each
seen, never together), and every `NEW_SHAPES` shape. The demo dataset teaches the "star"; its held-out set has
star colours and backgrounds that the demo images do not show.
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (245, 220, 40), "green": (40, 170, 70),
    "blue": (40, 80, 220), "purple": (140, 60, 190), "white": (245, 245, 245), "black": (20, 20, 20),
}
BACKGROUND_COLOURS = {"grey": (128, 128, 128), **COLOURS}
SHAPES = ("circle", "square", "triangle")  # what pretraining shows
NEW_SHAPES = ("star",)  # never in pretraining: the demo's new concept
SIZES = {"small": 0.3, "": 0.48, "large": 0.72}  # object side / the image's short side; "" = no size word
POSITIONS = ("", "at the left", "at the right", "at the top", "at the bottom")  # "" = centred
RELATIONS = ("above", "below", "to the left of", "to the right of")
BUCKETS = ((64, 64), (64, 128), (128, 64))  # (width, height)
BUCKET_WEIGHTS = (2, 1, 1)
SUPERSAMPLE = 4

# Single-object combinations (colour, shape, background) that pretraining never shows: the base model's held-out
# captions. Each shape, colour and background occurs in pretraining, in other combinations.
HELD_OUT = (
    ("green", "triangle", "grey"), ("red", "square", "white"), ("blue", "circle", "yellow"),
    ("yellow", "triangle", "blue"), ("purple", "circle", "black"), ("white", "square", "green"),
    ("orange", "circle", "purple"), ("black", "triangle", "orange"),
)

# The demo: stars in these colours and backgrounds are taught ...
DEMO_COLOURS = ("red", "blue", "yellow", "white", "purple")
DEMO_BACKGROUNDS = ("grey", "black", "white", "blue", "green")
# ... and these held-out star captions (colours the demo never shows, some on backgrounds it never shows) measure it.
DEMO_HELD_OUT = (("green", "grey"), ("orange", "black"), ("black", "white"), ("green", "purple"),
                 ("orange", "blue"), ("black", "yellow"))


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str  # a SIZES key
    cx: float  # centre, as fractions of the image width / height
    cy: float


@dataclass
class Scene:
    width: int
    height: int
    background: str
    objects: list[Shape] = field(default_factory=list)
    caption: str = ""


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(shape: Shape) -> str:
    words = [shape.size, shape.colour, shape.kind]
    text = " ".join(w for w in words if w)
    return f"{article(text)} {text}"


def background_phrase(background: str) -> str:
    return f"on {article(background)} {background} background"


def single_caption(shape: Shape, position: str, background: str) -> str:
    return " ".join(p for p in (noun_phrase(shape), position, background_phrase(background)) if p)


def side(scene: Scene, shape: Shape) -> float:
    return SIZES[shape.size] * min(scene.width, scene.height)


# ---------------------------------------------------------------------------------------------------- drawing

def star_points(cx: float, cy: float, radius: float, points: int = 5, inner: float = 0.45):
    """A `points`-pointed star, one point up."""
    out = []
    for k in range(2 * points):
        r = radius if k % 2 == 0 else radius * inner
        angle = -math.pi / 2 + k * math.pi / points
        out.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return out


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, s: float, fill) -> None:
    """`kind` of side (bounding-box size) `s` centred at (cx, cy), in pixels."""
    h = s / 2
    if kind == "circle":
        draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif kind == "square":
        q = h * 0.9  # a square looks larger than a circle of the same box
        draw.rectangle((cx - q, cy - q, cx + q, cy + q), fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - h), (cx + h, cy + h * 0.8), (cx - h, cy + h * 0.8)], fill=fill)
    elif kind == "star":
        draw.polygon(star_points(cx, cy + h * 0.08, h * 1.05), fill=fill)
    else:
        raise ValueError(f"unknown shape {kind!r}; known: {SHAPES + NEW_SHAPES}")


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image of (scene.width, scene.height), anti-aliased by supersampling."""
    k = SUPERSAMPLE
    big = Image.new("RGB", (scene.width * k, scene.height * k), BACKGROUND_COLOURS[scene.background])
    draw = ImageDraw.Draw(big)
    for shape in scene.objects:
        draw_shape(draw, shape.kind, shape.cx * scene.width * k, shape.cy * scene.height * k,
                   side(scene, shape) * k, COLOURS[shape.colour])
    return big.resize((scene.width, scene.height), Image.Resampling.BOX)


# ---------------------------------------------------------------------------------------------------- scenes

def _centre(rng: random.Random, position: str, frac_w: float, frac_h: float) -> tuple[float, float]:
    """Centre (fractions) of an object spanning frac_w x frac_h of the image, at `position`, with a little jitter."""
    jitter = lambda: rng.uniform(-0.04, 0.04)  # noqa: E731
    left, right = frac_w / 2 + 0.04, 1 - frac_w / 2 - 0.04
    top, bottom = frac_h / 2 + 0.04, 1 - frac_h / 2 - 0.04
    cx, cy = 0.5 + jitter(), 0.5 + jitter()
    if position == "at the left":
        cx = min(left + abs(jitter()), 0.5 - frac_w / 4)
    elif position == "at the right":
        cx = max(right - abs(jitter()), 0.5 + frac_w / 4)
    elif position == "at the top":
        cy = min(top + abs(jitter()), 0.5 - frac_h / 4)
    elif position == "at the bottom":
        cy = max(bottom - abs(jitter()), 0.5 + frac_h / 4)
    return cx, cy


def _fractions(width: int, height: int, size: str) -> tuple[float, float]:
    s = SIZES[size] * min(width, height)
    return s / width, s / height


def is_held_out(colour: str, kind: str, background: str) -> bool:
    return (colour, kind, background) in HELD_OUT


def single_scene(rng: random.Random, bucket, kind: str, colour: str, background: str, size: str | None = None,
                 position: str | None = None) -> Scene:
    width, height = bucket
    size = rng.choice(list(SIZES)) if size is None else size
    position = rng.choice(POSITIONS) if position is None else position
    if size == "large":
        position = ""  # a large object fills the image: it has no room to be at a side
    fw, fh = _fractions(width, height, size)
    cx, cy = _centre(rng, position, fw, fh)
    shape = Shape(kind, colour, size, cx, cy)
    return Scene(width, height, background, [shape], single_caption(shape, position, background))


def _pick_colour(rng: random.Random, background: str, avoid=()) -> str:
    return rng.choice([c for c in COLOURS if c != background and c not in avoid])


def _pair_scene(rng: random.Random, bucket, background: str, shapes) -> Scene:
    """Two objects: "two <size> <colour> <shape>s" side by side, or two different ones in a relation."""
    width, height = bucket
    size_a = rng.choice(["small", ""])
    vertical = height > width or (height == width and rng.random() < 0.5)
    if rng.random() < 0.35:  # a count
        kind, colour = rng.choice(shapes), _pick_colour(rng, background)
        fw, fh = _fractions(width, height, size_a)
        objects = []
        for k in (0, 1):
            along = 0.27 + 0.46 * k + rng.uniform(-0.03, 0.03)
            across = 0.5 + rng.uniform(-0.06, 0.06)
            cx, cy = (across, along) if vertical else (along, across)
            objects.append(Shape(kind, colour, size_a, cx, cy))
        words = " ".join(w for w in (size_a, colour, kind + "s") if w)
        return Scene(width, height, background, objects, f"two {words} {background_phrase(background)}")
    kind_a, kind_b = rng.choice(shapes), rng.choice(shapes)
    colour_a = _pick_colour(rng, background)
    colour_b = _pick_colour(rng, background, avoid=(colour_a,))
    size_b = rng.choice(["small", ""])
    relation = rng.choice(RELATIONS[:2] if vertical else RELATIONS[2:])
    first = 0.27 + rng.uniform(-0.03, 0.03)
    second = 0.73 + rng.uniform(-0.03, 0.03)
    a_pos, b_pos = (first, second) if relation in ("above", "to the left of") else (second, first)
    place = (lambda along: (0.5 + rng.uniform(-0.06, 0.06), along)) if vertical else \
        (lambda along: (along, 0.5 + rng.uniform(-0.06, 0.06)))
    a = Shape(kind_a, colour_a, size_a, *place(a_pos))
    b = Shape(kind_b, colour_b, size_b, *place(b_pos))
    caption = f"{noun_phrase(a)} {relation} {noun_phrase(b)} {background_phrase(background)}"
    return Scene(width, height, background, [a, b], caption)


def random_scene(rng: random.Random, bucket, shapes=SHAPES) -> Scene:
    """One scene of the pretraining distribution (no `HELD_OUT` combination in it)."""
    while True:
        background = rng.choice(list(BACKGROUND_COLOURS))
        if rng.random() < 0.6:
            kind, colour = rng.choice(shapes), _pick_colour(rng, background)
            scene = single_scene(rng, bucket, kind, colour, background)
        else:
            scene = _pair_scene(rng, bucket, background, shapes)
        if not any(is_held_out(o.colour, o.kind, scene.background) for o in scene.objects):
            return scene


def pick_bucket(rng: random.Random):
    return rng.choices(BUCKETS, weights=BUCKET_WEIGHTS)[0]


def pretraining_scene(seed: int, index: int) -> Scene:
    """The `index`-th scene of the pretraining stream of `seed`."""
    rng = random.Random(f"shapes:{seed}:{index}")
    return random_scene(rng, pick_bucket(rng))


def pretraining_example(seed: int, index: int) -> tuple[Image.Image, str]:
    scene = pretraining_scene(seed, index)
    return render(scene), scene.caption


# ---------------------------------------------------------------------------------------------------- held-out sets

def held_out_scenes(per_combination: int = 1, seed: int = 0) -> list[Scene]:
    """Single objects in the `HELD_OUT` combinations (medium size, centred when per_combination == 1)."""
    scenes = []
    for n, (colour, kind, background) in enumerate(HELD_OUT):
        for k in range(per_combination):
            rng = random.Random(f"held-out:{seed}:{n}:{k}")
            bucket = BUCKETS[0] if k == 0 else pick_bucket(rng)
            size, position = ("", "") if k == 0 else (None, None)
            scenes.append(single_scene(rng, bucket, kind, colour, background, size, position))
    return scenes


def old_caption_scenes(count: int = 32, seed: int = 1) -> list[Scene]:
    """Fresh scenes of the pretraining distribution (a stream the pretraining run does not use): what a
    fine-tune should not forget."""
    return [random_scene(rng, pick_bucket(rng)) for rng in (random.Random(f"old:{seed}:{i}") for i in range(count))]


def demo_scenes() -> list[Scene]:
    """The demo dataset: stars in `DEMO_COLOURS` on `DEMO_BACKGROUNDS`, in several sizes, positions and buckets."""
    rng = random.Random("demo:stars")
    scenes = []
    for n in range(16):
        colour = DEMO_COLOURS[n % len(DEMO_COLOURS)]
        background = [b for b in DEMO_BACKGROUNDS if b != colour][n % (len(DEMO_BACKGROUNDS) - 1)]
        bucket = BUCKETS[(0, 0, 1, 2)[n % 4]]
        size = ("", "small", "", "large")[n % 4]
        position = "" if n % 3 else POSITIONS[1 + (n // 3) % 4]
        scenes.append(single_scene(rng, bucket, "star", colour, background, size, position))
    return scenes


def demo_held_out_scenes(per_combination: int = 1) -> list[Scene]:
    """Star captions the demo does not teach (other colours and backgrounds): the new concept's held-out set."""
    scenes = []
    for n, (colour, background) in enumerate(DEMO_HELD_OUT):
        for k in range(per_combination):
            rng = random.Random(f"demo-held-out:{n}:{k}")
            bucket = BUCKETS[0] if k == 0 else pick_bucket(rng)
            size, position = ("", "") if k == 0 else (None, None)
            scenes.append(single_scene(rng, bucket, "star", colour, background, size, position))
    return scenes


# ---------------------------------------------------------------------------------------------------- measuring

LOSS_TIMESTEPS = (50, 200, 400, 600, 800, 950)


def scene_pixels(scene: Scene):
    """The scene as a (3, H, W) float tensor in [-1, 1], as sdtrain feeds images to the VAE."""
    import numpy as np
    import torch

    array = torch.from_numpy(np.asarray(render(scene), dtype=np.float32).copy())
    return array.permute(2, 0, 1) / 127.5 - 1.0


def denoising_loss(arch: str, unet, vae, text_encoders, tokenizers, noise_scheduler, scenes: list[Scene], *,
                   timesteps=LOSS_TIMESTEPS, seed: int = 0) -> float:
    """Mean epsilon-prediction MSE over `scenes` x `timesteps`, with noise fixed by (seed, scene, timestep):
    the same number for the same weights, so models and adapters can be compared on one held-out set.

    Latents are the VAE posterior means times its scaling factor and the text goes through
    `sdtrain.train.conditioning`, as in sdtrain's training step; SDXL's time ids are (h, w, 0, 0, h, w).
    """
    import torch

    from sdtrain.train.batches import encode_pixels
    from sdtrain.train.conditioning import encode_prompts, sdxl_add_time_ids, unet_added_cond_kwargs

    total, count = 0.0, 0
    with torch.no_grad():
        for n, scene in enumerate(scenes):
            latents = encode_pixels(vae, scene_pixels(scene)[None])
            cond = encode_prompts(arch, tokenizers, text_encoders, [scene.caption])
            size = (scene.height, scene.width)
            added = unet_added_cond_kwargs(cond, sdxl_add_time_ids(size, (0, 0), size)) if arch == "sdxl" else None
            t = torch.tensor(list(timesteps))
            generator = torch.Generator().manual_seed(seed * 1_000_003 + n)
            noise = torch.randn((len(t),) + latents.shape[1:], generator=generator)
            noisy = noise_scheduler.add_noise(latents.expand(len(t), -1, -1, -1), noise, t)
            embeds = cond.prompt_embeds.expand(len(t), -1, -1)
            if added is not None:
                added = {k: v.expand(len(t), -1) for k, v in added.items()}
            pred = unet(noisy, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
            total += (pred.float() - noise).square().mean(dim=(1, 2, 3)).sum().item()
            count += len(t)
    return total / count


def contact_sheet(rows, path: Path, column_labels=None, row_labels=None, scale: int = 2) -> Path:
    """Rows of equally sized PIL images, scaled up `scale` times (nearest), with wrapped captions under the
    columns and a label left of each row; saved as PNG."""
    from PIL import ImageDraw

    w, h = rows[0][0].width * scale, rows[0][0].height * scale
    left = 8 + 6 * max((len(t) for t in row_labels), default=0) if row_labels else 0
    text_h = 40 if column_labels else 0
    sheet = Image.new("RGB", (left + len(rows[0]) * (w + 4), len(rows) * (h + 4) + text_h), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        if row_labels:
            draw.text((4, r * (h + 4) + h // 2 - 5), row_labels[r], fill="black")
        for c, image in enumerate(row):
            sheet.paste(image.resize((w, h), Image.Resampling.NEAREST), (left + c * (w + 4), r * (h + 4)))
    for c, text in enumerate(column_labels or ()):
        lines = [""]
        for word in text.split():
            if lines[-1] and len(lines[-1]) + 1 + len(word) > w // 6:
                lines.append("")
            lines[-1] = (lines[-1] + " " + word).strip()
        draw.multiline_text((left + c * (w + 4) + 1, len(rows) * (h + 4)), "\n".join(lines), fill="black", spacing=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


# ---------------------------------------------------------------------------------------------------- files

LICENSE = """# Demo dataset licence

The images and captions in this folder were generated by `scripts/shapes_dataset.py` (shapes drawn with
Pillow from a fixed seed); no photographs or third-party material are included.

To the extent possible under law, the sdtrain authors have waived all copyright and related or neighbouring
rights to this dataset: CC0 1.0 Universal public domain dedication
(https://creativecommons.org/publicdomain/zero/1.0/).
"""

DEMO_FOLDER = "4_star"  # kohya repeat folder: 4 repeats per epoch


def write_scenes(scenes: list[Scene], folder: Path, stem: str = "") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for n, scene in enumerate(scenes):
        image_path = folder / f"{stem}{n:03d}.png"
        render(scene).save(image_path, format="PNG", optimize=True)
        image_path.with_suffix(".txt").write_text(scene.caption + "\n", encoding="utf-8")
        written += [image_path, image_path.with_suffix(".txt")]
    return written


def write_demo_dataset(out: Path) -> list[Path]:
    written = write_scenes(demo_scenes(), out / DEMO_FOLDER, stem="star_")
    (out / "LICENSE.md").write_text(LICENSE, encoding="utf-8")
    return written + [out / "LICENSE.md"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    demo = sub.add_parser("demo", help="write the demo dataset (stars)")
    demo.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "datasets" / "demo")
    sample = sub.add_parser("sample", help="write images of the pretraining distribution")
    sample.add_argument("--out", type=Path, required=True)
    sample.add_argument("--count", type=int, default=64)
    sample.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.what == "demo":
        files = write_demo_dataset(args.out)
    else:
        files = write_scenes([pretraining_scene(args.seed, i) for i in range(args.count)], args.out)
    total = sum(f.stat().st_size for f in files)
    print(f"wrote {len(files)} files ({total / 1024:.1f} KiB) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
