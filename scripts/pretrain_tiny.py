"""Pretrain the tiny built-in SD1.5- and SDXL-architecture models on the shapes world (scripts/shapes_dataset.py)
and publish them as `builtin:tiny-sd15` / `builtin:tiny-sdxl` (package data in sdtrain/models/data/, with a
manifest of hashes).

    nice -n 10 python3 scripts/pretrain_tiny.py [--work output/pretrain_tiny] [--seed 0] [--threads 1]

Phases, each resumable: run the same command again after an interruption and it continues from the newest
checkpoint in --work (every --save-every steps), computing what an uninterrupted run would have computed (for the
same --threads). `--archs sd15 --no-publish` and `--archs sdxl --no-publish` can run side by side once the VAE
and the latent pool exist; a last run without them then publishes. Progress lines give the loss, s/step and ETA.

1. `vae`, `vae-objects`: one AutoencoderKL of the tiny architecture (shared by both models), trained as a
   deterministic autoencoder on freshly drawn whole scenes (L1 + L2 reconstruction), first on every pixel alike,
   then with the objects' pixels weighted up. Each model gets it rescaled so that posterior means times the
   family's released scaling factor have unit RMS (the scale moves between quant_conv and post_quant_conv; what
   it decodes is unchanged).
2. `latents`: a pool of --pool pretraining scenes encoded once (posterior means, as sdtrain's latent cache).
3. `<arch>-text`: the text encoder(s) learn what captions say (`train_text`), so that the UNet can read them.
4. `sd15`, `sdxl`: the UNet and the text encoder(s) (at a tenth of the UNet's learning rate) trained together on
   the pool from the random initialisation of `builtin:tiny-*-random`: epsilon loss weighted as the
   v-prediction loss (`loss_weights`), 10 % of captions dropped (SD1.5 encodes "", SDXL uses zero embeddings, as
   its pipeline does for an empty negative prompt), AdamW without weight decay, cosine schedule, EMA weights.
   Text conditioning goes through `sdtrain.train.conditioning`, the code the trainer uses. Every --sample-every
   steps: the EMA weights' denoising loss on held-out captions and a sample grid in --work/samples/.
5. `publish`: EMA weights to fp16 safetensors in sdtrain/models/data/ (token-embedding rows of words the shapes
   world never uses are not stored: they keep the random initialisation, see `sdtrain.models.tiny`), the
   manifest (sha256 of each file and of the loaded weights, settings, CPU and wall times), and held-out sample
   grids of the published weights (loaded the way `builtin:` names load) in docs/figures/.

Every batch, noise draw, timestep and caption dropout is a function of (--seed, phase, step).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

import shapes_dataset as shapes  # noqa: E402

ARCHS = ("sd15", "sdxl")
DATA_DIR = REPO / "sdtrain" / "models" / "data"
FIGURES = REPO / "docs" / "figures"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=REPO / "output" / "pretrain_tiny", help="checkpoints, samples, logs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (results are bit-identical for a given count)")
    p.add_argument("--archs", default="sd15,sdxl")
    p.add_argument("--vae-steps", type=int, default=5000)
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-small", type=int, default=32, help="side of the small whole scenes of the VAE phase")
    p.add_argument("--vae-object-steps", type=int, default=2000, help="second VAE stage, objects weighted up")
    p.add_argument("--object-weight", type=float, default=4.0)
    p.add_argument("--pool", type=int, default=6000, help="pretraining scenes encoded for the UNet phases")
    p.add_argument("--text-steps", type=int, default=300, help="text phase steps per model")
    p.add_argument("--text-batch", type=int, default=64)
    p.add_argument("--text-lr", type=float, default=1e-3)
    p.add_argument("--text-lr-scale", type=float, default=0.1, help="text encoders' lr / UNet lr in the UNet phase")
    p.add_argument("--steps", type=int, default=8000, help="UNet + text encoder steps per model")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.998, help="EMA decay of the published weights")
    p.add_argument("--weighting", choices=("v", "min-snr"), default="v",
                   help="loss weight per timestep: 1/alpha_bar (the v-prediction loss, as EDM) or min-SNR-5")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps")
    p.add_argument("--sample-every", type=int, default=500, help="held-out samples and loss every N steps")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--no-publish", action="store_true", help="stop after training (no package data written)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- helpers

def say(text: str) -> None:
    print(time.strftime("%H:%M:%S"), text, flush=True)


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Step / total, running loss, s/step, elapsed and ETA lines for a phase."""

    def __init__(self, phase: str, total: int, start: int, every: int):
        self.phase, self.total, self.start, self.every = phase, total, start, every
        self.t0, self.losses = time.time(), []

    def step(self, step: int, loss: float, extra: str = "") -> None:
        self.losses.append(loss)
        done = step + 1
        if done % self.every and done != self.total:
            return
        elapsed = time.time() - self.t0
        rate = elapsed / max(1, done - self.start)
        mean = sum(self.losses) / len(self.losses)
        self.losses = []
        say(f"{self.phase} {done}/{self.total} loss {mean:.4f} {rate:.2f} s/step elapsed {fmt_time(elapsed)} "
            f"ETA {fmt_time(rate * (self.total - done))}{extra}")


def step_generator(seed: int, phase: str, step: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{phase}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def save_checkpoint(path: Path, payload: dict) -> None:
    from sdtrain.files import atomic_write

    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: Path) -> dict | None:
    return torch.load(path, weights_only=False) if path.is_file() else None


def to_pixels(image) -> torch.Tensor:
    import numpy as np

    array = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    return array.permute(2, 0, 1) / 127.5 - 1.0


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


# ---------------------------------------------------------------------------------------------------- VAE

# The VAE is trained as a deterministic autoencoder on its posterior means (what sdtrain encodes), with noise of
# a tenth of the latents' spread added before decoding so the decoder tolerates imperfect latents from sampling,
# and a small penalty that keeps the latents near the origin. (Sampling the posterior from its initial unit
# variance would drown the latents in noise until the log-variance had walked down by thousands of steps.)
VAE_LATENT_NOISE = 0.1
VAE_LATENT_PENALTY = 1e-4

def vae_batch(seed: int, stage: str, step: int, batch: int, small: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels, object masks) of `batch` scenes drawn fresh for this step: whole scenes at `small` x `small`
    pixels three steps in four (a sixteenth of the cost of a 64x128 scene; colours and edges are learnt as well
    there), and at the bucket sizes of the models (64x64, 64x128, 128x64 in turn) every fourth step, so the VAE
    is right at the size it is used at. Whole scenes, not crops: the VAE's GroupNorms remove a flat crop's colour
    altogether. The mask is 1 where a pixel differs from the background colour (the objects and their edges)."""
    if step % 4 == 3:
        bucket = shapes.BUCKETS[(step // 4) % len(shapes.BUCKETS)]
    else:
        bucket = (small, small)
    scenes = [shapes.random_scene(random.Random(f"{stage}:{seed}:{step}:{j}"), bucket) for j in range(batch)]
    pixels = torch.stack([to_pixels(shapes.render(scene)) for scene in scenes])
    backgrounds = torch.tensor([shapes.BACKGROUND_COLOURS[sc.background] for sc in scenes]) / 127.5 - 1.0
    masks = ((pixels - backgrounds[:, :, None, None]).abs().sum(dim=1, keepdim=True) > 0.05).float()
    return pixels, masks


def vae_stages(args) -> list[dict]:
    """Stage "vae" trains every pixel alike; "vae-objects" goes on from it with the objects' pixels weighted
    --object-weight times more, at half the learning rate: objects cover a tenth of an image, so after the
    first stage the backgrounds are right and the objects' colours still drift."""
    return [dict(name="vae", steps=args.vae_steps, lr=args.vae_lr, object_weight=0.0),
            dict(name="vae-objects", steps=args.vae_object_steps, lr=args.vae_lr / 2, object_weight=args.object_weight)]


def train_vae(args, work: Path):
    from sdtrain.models.tiny import build_tiny_pipeline

    vae = build_tiny_pipeline("sd15", seed=0).vae
    states = []
    for stage in vae_stages(args):
        if stage["steps"]:
            states.append(train_vae_stage(args, work, vae, stage))
    total = {"step": sum(st["step"] for st in states), "cpu": sum(st["cpu"] for st in states),
             "wall": sum(st.get("wall", 0.0) for st in states)}
    return vae.eval(), total


def train_vae_stage(args, work: Path, vae, stage: dict) -> dict:
    """Train `vae` in place through one stage (resuming from its checkpoint); returns the stage's last state."""
    from diffusers.optimization import get_scheduler

    name, steps = stage["name"], stage["steps"]
    ckpt_path = work / f"{name}.ckpt"
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=stage["lr"], weight_decay=0.0)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=50, num_training_steps=steps)
    start, spent, wall = 0, 0.0, 0.0
    state = load_checkpoint(ckpt_path)
    if state is not None:
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start, spent, wall = state["step"], state["cpu"], state.get("wall", 0.0)
        if start >= steps:
            return state
        say(f"{name}: resuming at step {start}")
    progress = Progress(name, steps, start, args.log_every)
    cpu0, wall0 = cpu_seconds(), time.time()
    for step in range(start, steps):
        pixels, masks = vae_batch(args.seed, name, step, args.vae_batch, args.vae_small)
        mean = vae.encode(pixels).latent_dist.mean
        noise = torch.randn(mean.shape, generator=step_generator(args.seed, name, step))
        recon = vae.decode(mean + VAE_LATENT_NOISE * mean.detach().std() * noise).sample
        weights = 1.0 + stage["object_weight"] * masks
        error = (recon - pixels).abs() + (recon - pixels).square()
        rec = (weights * error).mean() / weights.mean()
        loss = rec + VAE_LATENT_PENALTY * mean.square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        progress.step(step, rec.item())
        done = step + 1
        if done % args.save_every == 0 or done == steps:
            state = {"vae": vae.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                     "step": done, "cpu": spent + cpu_seconds() - cpu0, "wall": wall + time.time() - wall0}
            save_checkpoint(ckpt_path, state)
        if done % args.sample_every == 0 or done == steps:
            write_reconstructions(vae, work / "samples" / f"{name}_{done:06d}.png", args.seed)
            vae.train()
    return state


@torch.no_grad()
def write_reconstructions(vae, path: Path, seed: int) -> None:
    """Held-out scenes (top row) and their reconstructions (bottom row)."""
    from PIL import Image

    vae.eval()
    scenes = shapes.held_out_scenes() + shapes.demo_held_out_scenes()[:4]
    pixels = torch.stack([to_pixels(shapes.render(s)) for s in scenes])
    recon = vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1)
    sheet = Image.new("RGB", (64 * len(scenes), 128))
    for i, (a, b) in enumerate(zip(pixels, recon)):
        for row, t in enumerate((a, b)):
            array = ((t.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
            sheet.paste(Image.fromarray(array), (64 * i, 64 * row))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


# ---------------------------------------------------------------------------------------------------- latents

def rms(x: torch.Tensor) -> float:
    return x.float().square().mean().sqrt().item()


def rescale_latents(vae, k: float) -> None:
    """Multiply the VAE's latents by k without changing what it decodes: the posterior mean rows of quant_conv
    by k (log-variance + 2 ln k), post_quant_conv's input columns by 1 / k."""
    latent = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[:latent] *= k
        vae.quant_conv.bias[:latent] *= k
        vae.quant_conv.bias[latent:] += 2 * math.log(k)
        vae.post_quant_conv.weight *= 1 / k


def family_vae(vae, arch: str, latent_rms: float):
    """The trained VAE with `arch`'s config (released scaling factor) and latents rescaled so that
    posterior mean x scaling factor has unit RMS on the pretraining pool."""
    from sdtrain.models.tiny import build_tiny_pipeline

    target = build_tiny_pipeline(arch, seed=0).vae
    target.load_state_dict(vae.state_dict())
    rescale_latents(target, 1.0 / (latent_rms * target.config.scaling_factor))
    return target.eval()


def encode_pool(args, work: Path, vae) -> dict:
    """Posterior means (unscaled) of the first --pool pretraining scenes, grouped by bucket, with captions."""
    path = work / "latents.pt"
    pool = load_checkpoint(path)
    if pool is not None and pool["count"] == args.pool and pool["seed"] == args.seed:
        return pool
    say(f"latents: encoding {args.pool} pretraining scenes")
    by_bucket: dict = {}
    started = time.time()
    with torch.no_grad():
        for start in range(0, args.pool, 64):
            chunk = [shapes.pretraining_scene(args.seed, i) for i in range(start, min(args.pool, start + 64))]
            for bucket in shapes.BUCKETS:
                scenes = [sc for sc in chunk if (sc.width, sc.height) == bucket]
                if not scenes:
                    continue
                pixels = torch.stack([to_pixels(shapes.render(sc)) for sc in scenes])
                entry = by_bucket.setdefault(bucket, {"latents": [], "captions": []})
                entry["latents"].append(vae.encode(pixels).latent_dist.mean)
                entry["captions"] += [sc.caption for sc in scenes]
            if (start // 64) % 20 == 19:
                done = start + 64
                say(f"latents {done}/{args.pool} ETA {fmt_time((time.time() - started) / done * (args.pool - done))}")
    buckets = {b: {"latents": torch.cat(e["latents"]), "captions": e["captions"]} for b, e in by_bucket.items()}
    pool = {"count": args.pool, "seed": args.seed, "buckets": buckets,
            "rms": rms(torch.cat([e["latents"].flatten() for e in buckets.values()]))}
    save_checkpoint(path, pool)
    counts = ", ".join(f"{w}x{h}: {len(e['captions'])}" for (w, h), e in buckets.items())
    say(f"latents: {counts}; latent RMS {pool['rms']:.4f}")
    return pool


# ---------------------------------------------------------------------------------------------------- text

def scene_attributes(scene) -> list[int]:
    """Class indices of what a caption says: background; first object's shape, colour, size, position;
    count / relation; second object's shape and colour (last class = none)."""
    backgrounds, colours = list(shapes.BACKGROUND_COLOURS), list(shapes.COLOURS)
    kinds, sizes = list(shapes.SHAPES), list(shapes.SIZES)
    first = scene.objects[0]
    position = next((i for i, p in enumerate(shapes.POSITIONS) if p and f" {p} " in scene.caption), 0)
    if scene.caption.startswith("two "):
        layout = len(shapes.RELATIONS)
    else:
        layout = next((i for i, r in enumerate(shapes.RELATIONS) if f" {r} " in scene.caption), len(shapes.RELATIONS) + 1)
    second = scene.objects[1] if len(scene.objects) > 1 and layout < len(shapes.RELATIONS) else None
    return [backgrounds.index(scene.background), kinds.index(first.kind), colours.index(first.colour),
            sizes.index(first.size), position, layout,
            kinds.index(second.kind) if second else len(kinds), colours.index(second.colour) if second else len(colours)]


ATTRIBUTE_CLASSES = [len(shapes.BACKGROUND_COLOURS), len(shapes.SHAPES), len(shapes.COLOURS), len(shapes.SIZES),
                     len(shapes.POSITIONS), len(shapes.RELATIONS) + 2, len(shapes.SHAPES) + 1, len(shapes.COLOURS) + 1]


def text_features(arch: str, tokenizers, encoders, captions) -> list[torch.Tensor]:
    """What the UNet reads, summarised: the mean over the 77 positions of the cross-attention states
    (`sdtrain.train.conditioning`), and for SDXL also the pooled embedding it adds to the time embedding."""
    from sdtrain.train.conditioning import encode_prompts

    cond = encode_prompts(arch, tokenizers, encoders, captions)
    features = [cond.prompt_embeds.mean(dim=1)]
    if cond.pooled_embeds is not None:
        features.append(cond.pooled_embeds)
    return features


def train_text(args, work: Path, arch: str, tokenizers, encoders) -> dict:
    """Text phase: the text encoders learn to say what a caption describes. Linear heads on `text_features`
    classify `scene_attributes` (cross-entropy); the heads are thrown away afterwards. A randomly initialised
    encoder gives nearly the same states for every caption (most of the 77 positions are padding), and a UNet
    trained with it learns to denoise long before it learns to read them; after this phase every padding
    position carries the caption's content, so the UNet's cross-attention sees it from the first step."""
    ckpt_path = work / f"{arch}-text.ckpt"
    state = load_checkpoint(ckpt_path)
    if state is not None and state["step"] >= args.text_steps:
        for m, sd in zip(encoders, state["modules"]):
            m.load_state_dict(sd)
        return state
    torch.manual_seed(args.seed)
    with torch.no_grad():
        widths = [f.shape[-1] for f in text_features(arch, tokenizers, encoders, ["a red circle"])]
    heads = torch.nn.ModuleList(torch.nn.Linear(w, sum(ATTRIBUTE_CLASSES)) for w in widths)
    params = [p for m in encoders for p in m.parameters()] + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.text_lr, weight_decay=0.0)
    start, spent, wall = 0, 0.0, 0.0
    if state is not None:
        for m, sd in zip(encoders, state["modules"]):
            m.load_state_dict(sd)
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        start, spent, wall = state["step"], state["cpu"], state["wall"]
    for m in encoders:
        m.train()
    progress = Progress(f"{arch}-text", args.text_steps, start, args.log_every)
    cpu0, wall0 = cpu_seconds(), time.time()
    for step in range(start, args.text_steps):
        scenes = [shapes.random_scene(random.Random(f"text:{args.seed}:{arch}:{step}:{j}"), shapes.BUCKETS[j % 3])
                  for j in range(args.text_batch)]
        targets = torch.tensor([scene_attributes(sc) for sc in scenes])
        loss, correct = 0.0, 0.0
        for head, feature in zip(heads, text_features(arch, tokenizers, encoders, [sc.caption for sc in scenes])):
            for k, logits in enumerate(head(feature).split(ATTRIBUTE_CLASSES, dim=1)):
                loss = loss + torch.nn.functional.cross_entropy(logits, targets[:, k])
                correct += (logits.argmax(dim=1) == targets[:, k]).float().mean().item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        accuracy = correct / (len(heads) * len(ATTRIBUTE_CLASSES))
        progress.step(step, loss.item(), f" | attribute accuracy {accuracy:.3f}")
        done = step + 1
        if done % args.save_every == 0 or done == args.text_steps:
            state = {"modules": [m.state_dict() for m in encoders], "heads": heads.state_dict(),
                     "optimizer": optimizer.state_dict(), "step": done, "accuracy": accuracy,
                     "cpu": spent + cpu_seconds() - cpu0, "wall": wall + time.time() - wall0}
            save_checkpoint(ckpt_path, state)
    return state


# ---------------------------------------------------------------------------------------------------- UNet + text

def pool_batch(pool: dict, seed: int, arch: str, step: int, batch: int, dropout: float):
    """(unit-RMS latents, captions, dropped mask, bucket) of one step: one bucket, chosen in proportion to its
    share of the pool, and `batch` of its scenes drawn with replacement; captions dropped with prob. `dropout`."""
    rng = random.Random(f"unet:{seed}:{arch}:{step}")
    buckets = sorted(pool["buckets"])
    bucket = rng.choices(buckets, weights=[len(pool["buckets"][b]["captions"]) for b in buckets])[0]
    entry = pool["buckets"][bucket]
    picks = [rng.randrange(len(entry["captions"])) for _ in range(batch)]
    dropped = [rng.random() < dropout for _ in range(batch)]
    latents = entry["latents"][picks] / pool["rms"]
    captions = ["" if d else entry["captions"][i] for i, d in zip(picks, dropped)]
    return latents, captions, torch.tensor(dropped), bucket


def conditioning(arch: str, pipe_parts, captions, dropped: torch.Tensor, size):
    """Text conditioning as sdtrain computes it; SDXL's dropped captions are zero embeddings (what its pipeline
    uses for an empty negative prompt), SD1.5's are the encoding of ""."""
    from sdtrain.train.conditioning import encode_prompts, sdxl_add_time_ids, unet_added_cond_kwargs

    tokenizers, encoders = pipe_parts
    cond = encode_prompts(arch, tokenizers, encoders, captions)
    if arch != "sdxl":
        return cond.prompt_embeds, None
    keep = (~dropped).float()
    embeds = cond.prompt_embeds * keep[:, None, None]
    cond.pooled_embeds = cond.pooled_embeds * keep[:, None]
    cond.prompt_embeds = embeds
    return embeds, unet_added_cond_kwargs(cond, sdxl_add_time_ids(size, (0, 0), size))


HELD_OUT_PROMPTS = [s.caption for s in shapes.held_out_scenes()] + [
    "two small red circles on a grey background",
    "a large blue square on a white background",
    "a yellow triangle above a purple circle on a black background",
    "a small green circle at the left on a white background",
]


def loss_weights(noise_scheduler, t: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-sample weights of the epsilon MSE. "v": 1 / alpha_bar = 1 + 1/SNR, which makes it the v-prediction
    loss (EDM's weighting, up to the timestep distribution): errors at high noise, where the caption decides
    the picture, count as much as at low noise. (With plain or min-SNR epsilon weighting those errors are
    1/SNR times smaller, and a tiny model learns to denoise long before it learns to read its captions.)"""
    from diffusers.training_utils import compute_snr

    from sdtrain.train.loss import min_snr_weights

    snr = compute_snr(noise_scheduler, t)
    if weighting == "v":
        return 1.0 + 1.0 / snr
    return min_snr_weights(snr, 5.0, "epsilon")


def train_unet(args, work: Path, arch: str, pool: dict, vae):
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from sdtrain.models.tiny import build_tiny_pipeline
    from sdtrain.train.loss import diffusion_loss, training_noise_scheduler

    pipe = build_tiny_pipeline(arch, seed=0)
    pipe.vae = vae
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if arch == "sdxl" else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if arch == "sdxl" else [])
    text_state = train_text(args, work, arch, tokenizers, encoders)
    modules = [pipe.unet, *encoders]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train()
    noise_scheduler = training_noise_scheduler(pipe.scheduler.config)
    groups = [{"params": list(pipe.unet.parameters()), "lr": args.lr},
              {"params": [p for m in encoders for p in m.parameters()], "lr": args.lr * args.text_lr_scale}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=args.warmup, num_training_steps=args.steps)
    ema = EMAModel(params, decay=args.ema)
    ckpt_path = work / f"{arch}.ckpt"
    start, spent, wall, history = 0, 0.0, 0.0, []
    state = load_checkpoint(ckpt_path)
    if state is not None:
        for m, sd in zip(modules, state["modules"]):
            m.load_state_dict(sd)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        ema.load_state_dict(state["ema"])
        start, spent, wall, history = state["step"], state["cpu"], state["wall"], state["history"]
        if start < args.steps:
            say(f"{arch}: resuming at step {start}")
    progress = Progress(arch, args.steps, start, args.log_every)
    cpu0, wall0 = cpu_seconds(), time.time()
    for step in range(start, args.steps):
        latents, captions, dropped, (w, h) = pool_batch(pool, args.seed, arch, step, args.batch, args.caption_dropout)
        generator = step_generator(args.seed, arch, step)
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(captions),), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        embeds, added = conditioning(arch, (tokenizers, encoders), captions, dropped, (h, w))
        pred = pipe.unet(noisy, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
        weights = loss_weights(noise_scheduler, t, args.weighting)
        loss = diffusion_loss(pred, noise, "l2", weights=weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema.step(params)
        done = step + 1
        extra = ""
        if done % args.sample_every == 0 or done == args.steps:
            ema.store(params)
            ema.copy_to(params)
            held = evaluate(arch, pipe, encoders, tokenizers, noise_scheduler, work / "samples" / arch, done)
            ema.restore(params)
            for m in modules:
                m.train()
            history.append({"step": done, **held})
            extra = f" | EMA held-out loss {held['held_out_loss']:.4f}, old captions {held['old_loss']:.4f}"
        progress.step(step, loss.item(), extra)
        if done % args.save_every == 0 or done == args.steps:
            state = {"modules": [m.state_dict() for m in modules], "optimizer": optimizer.state_dict(),
                     "schedule": schedule.state_dict(), "ema": ema.state_dict(), "step": done,
                     "cpu": spent + cpu_seconds() - cpu0, "wall": wall + time.time() - wall0, "history": history}
            save_checkpoint(ckpt_path, state)
    ema.copy_to(params)
    for m in modules:
        m.eval()
    return pipe, {**state, "text": {k: text_state[k] for k in ("step", "accuracy", "cpu", "wall")}}


def evaluate(arch, pipe, encoders, tokenizers, noise_scheduler, out: Path, step: int) -> dict:
    """Held-out denoising losses and a sample grid of `HELD_OUT_PROMPTS` (the weights currently in `pipe`)."""
    for m in (pipe.unet, *encoders):
        m.eval()
    parts = (arch, pipe.unet, pipe.vae, encoders, tokenizers, noise_scheduler)
    result = {"held_out_loss": shapes.denoising_loss(*parts, shapes.held_out_scenes(per_combination=2)),
              "old_loss": shapes.denoising_loss(*parts, shapes.old_caption_scenes(16))}
    render_grid(arch, pipe, encoders, tokenizers, HELD_OUT_PROMPTS, out / f"step_{step:06d}.png")
    return result


SAMPLE_SETTINGS = {"sampler": "euler", "steps": 20, "cfg": 5.0}


def render_grid(arch, pipe, encoders, tokenizers, prompts, path: Path, seeds=(0,), label: bool = True) -> Path:
    """Render prompts with sdtrain's sampler (`sdtrain.train.sampling`) at 64x64, one row per seed, captioned."""
    import tempfile

    from PIL import Image

    from sdtrain.train.sampling import sample_images

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            specs = [{"prompt": p, "width": 64, "height": 64, "seed": seed, "cfg": SAMPLE_SETTINGS["cfg"],
                      "steps": SAMPLE_SETTINGS["steps"]} for p in prompts]
            paths = sample_images(arch, unet=pipe.unet, vae=pipe.vae, text_encoders=encoders, tokenizers=tokenizers,
                                  scheduler_config=pipe.scheduler.config, prompts=specs,
                                  sampler=SAMPLE_SETTINGS["sampler"], out_dir=tmp, step=seed)
            rows.append([Image.open(p).convert("RGB") for p in paths[:len(prompts)]])
    return shapes.contact_sheet(rows, path, prompts if label else None, [f"seed {s}" for s in seeds])


# ---------------------------------------------------------------------------------------------------- publish

LICENCE = ("Apache-2.0, as sdtrain. Trained only on images that scripts/shapes_dataset.py draws (CC0); the CLIP "
           "BPE vocabulary the tokenizers use is OpenAI's, MIT licence (LICENSE-CLIP-BPE.txt).")


def publish(args, work: Path, trained: dict, vae_state: dict, pool: dict, argv: list[str]) -> None:
    """Write the package data (fp16 weight files, manifest) and the held-out sample grids of what was written."""
    from safetensors.torch import load_file

    from sdtrain.files import atomic_save_safetensors, atomic_write_bytes
    from sdtrain.models import tiny

    manifest = tiny.read_manifest() if tiny.MANIFEST.is_file() else {"models": {}}
    manifest.update({
        "licence": LICENCE,
        "command": "python3 scripts/pretrain_tiny.py " + " ".join(argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "work"},
        "versions": versions(),
        "vae": {"steps": vae_state["step"], "cpu_seconds": round(vae_state["cpu"]),
                "wall_seconds": round(vae_state.get("wall", 0.0)), "latent_rms": pool["rms"]},
    })
    for arch, (pipe, state) in trained.items():
        path = tiny.pretrained_file(arch)
        tensors = tiny.pretrained_tensors(pipe, arch)
        metadata = {"sdtrain.model": f"builtin:tiny-{arch}", "sdtrain.licence": LICENCE,
                    "sdtrain.trained_by": "scripts/pretrain_tiny.py"}
        atomic_save_safetensors(tensors, path, metadata=metadata)
        path.chmod(0o644)  # package data: readable by every user (the atomic writer creates files 0600)
        reloaded = tiny.build_tiny_pipeline(arch, seed=0)
        tiny.apply_pretrained_tensors(reloaded, arch, load_file(str(path)))
        rows = {k: int(v.numel()) for k, v in tensors.items() if k.endswith(tiny.ROWS)}
        manifest["models"][f"builtin:tiny-{arch}"] = {
            "arch": arch, "file": path.name, "bytes": path.stat().st_size, "sha256": tiny.file_sha256(path),
            "weights_sha256": tiny.weights_digest(reloaded, arch), "steps": state["step"],
            "cpu_seconds": round(state["cpu"]), "wall_seconds": round(state["wall"]),
            "text_phase": {"steps": state["text"]["step"], "attribute_accuracy": round(state["text"]["accuracy"], 4),
                           "cpu_seconds": round(state["text"]["cpu"]), "wall_seconds": round(state["text"]["wall"])},
            "trained_token_rows": rows, "history": state["history"],
        }
        say(f"publish: {path} ({path.stat().st_size / 1e6:.2f} MB)")
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    atomic_write_bytes(tiny.MANIFEST, text.encode())
    tiny.MANIFEST.chmod(0o644)
    say(f"publish: {tiny.MANIFEST}")
    for arch in trained:
        pipe = tiny.load_pretrained_tiny(arch)  # the published file, checked against the manifest
        encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if arch == "sdxl" else [])
        tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if arch == "sdxl" else [])
        grid = render_grid(arch, pipe, encoders, tokenizers, HELD_OUT_PROMPTS,
                           FIGURES / f"tiny-{arch}-held-out.png", seeds=(0, 1, 2))
        say(f"publish: held-out samples {grid}")


def versions() -> dict:
    import diffusers
    import PIL
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "pillow": PIL.__version__}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    say(f"pretrain_tiny: work folder {work}, seed {args.seed}, {args.threads} thread(s)")
    vae, vae_state = train_vae(args, work)
    pool = encode_pool(args, work, vae)
    trained = {}
    for arch in [a for a in args.archs.split(",") if a]:
        trained[arch] = train_unet(args, work, arch, pool, family_vae(vae, arch, pool["rms"]))
    if trained and not args.no_publish:
        publish(args, work, trained, vae_state, pool, sys.argv[1:] if argv is None else list(argv))
    total = sum(state["cpu"] + state["text"]["cpu"] for _, state in trained.values()) + vae_state["cpu"]
    say(f"done: {total / 60:.1f} CPU minutes in the training phases")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
