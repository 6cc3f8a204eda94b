"""Sample images during training with the in-training modules.

A diffusers `StableDiffusionPipeline` / `StableDiffusionXLPipeline` is built around the very UNet, VAE and text
encoders being trained (adapters injected, nothing copied), with the chosen sampler's scheduler made `from_config`
of the model's scheduler config. Prompts are encoded with `conditioning.encode_prompts` (so `clip_skip` matches
training) and passed as embeddings. For SDXL an empty negative prompt gives zero embeddings, as diffusers'
SDXL pipeline does by default (`force_zeros_for_empty_prompt`).

Each prompt gets a CPU `torch.Generator` seeded with its seed (same image on any device, up to numerics). Modules are
put in eval mode and back to their previous modes afterwards, and the torch (CPU and CUDA), numpy and Python
random states are restored, so sampling does not change the training random stream.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from sdtrain.errors import ConfigError

if TYPE_CHECKING:
    import torch

SAMPLERS = {
    "euler_a": "EulerAncestralDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}
DEFAULT_SIZE = {"sd15": 512, "sd2": 768, "sdxl": 1024}


def sampler_scheduler(sampler: str, scheduler_config):
    """The diffusers scheduler for `sampler`, made from the model's scheduler config."""
    import diffusers

    if sampler not in SAMPLERS:
        raise ConfigError(f"sample.sampler = {sampler!r} is not supported; use one of {', '.join(SAMPLERS)}")
    # DDIM (like DDPM) defaults to clipping x0 to [-1, 1], which is wrong for latents; configs passed through a
    # DDPMScheduler carry that default, so it is always turned off.
    overrides = {"clip_sample": False} if sampler == "ddim" else {}
    return getattr(diffusers, SAMPLERS[sampler]).from_config(scheduler_config, **overrides)


@contextmanager
def preserved_rng_state():
    """Restore the torch (CPU, CUDA), numpy and Python random states on exit."""
    import numpy as np
    import torch

    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


@contextmanager
def eval_mode(*modules: torch.nn.Module):
    """Put `modules` in eval mode, then give every submodule back its previous train/eval flag."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, training in flags:
            m.training = training


@contextmanager
def on_device(modules: Sequence[torch.nn.Module], device):
    """Move `modules` to `device` (None: leave them) and back to where each was afterwards."""
    homes = [next(m.parameters()).device for m in modules]
    try:
        if device is not None:
            for m in modules:
                m.to(device)
        yield
    finally:
        if device is not None:
            for m, home in zip(modules, homes):
                m.to(home)


def build_pipeline(arch: str, unet, vae, text_encoders: Sequence, tokenizers: Sequence, scheduler):
    """A diffusers pipeline holding these exact module objects."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
                                         tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet,
                                         scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoders[0], tokenizer=tokenizers[0], unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_grid(images: Sequence):
    """A PIL image tiling `images` in ceil(√n) columns; every cell is as large as the largest image (top-left aligned, black)."""
    from PIL import Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cell_w, cell_h = max(i.width for i in images), max(i.height for i in images)
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h))
    for n, image in enumerate(images):
        grid.paste(image, ((n % cols) * cell_w, (n // cols) * cell_h))
    return grid


def _full_prompt(prompt: dict, arch: str) -> dict:
    size = DEFAULT_SIZE.get(arch, 512)
    return {"negative": "", "width": size, "height": size, "seed": 0, "cfg": 7.0, "steps": 20, **prompt}


def _encode(arch, tokenizers, text_encoders, text, clip_skip, zero: bool):
    import torch

    from sdtrain.train.conditioning import encode_prompts

    cond = encode_prompts(arch, tokenizers, text_encoders, [text], clip_skip=clip_skip)
    if zero:
        cond.prompt_embeds = torch.zeros_like(cond.prompt_embeds)
        cond.pooled_embeds = torch.zeros_like(cond.pooled_embeds)
    return cond


def sample_images(
    arch: str,
    *,
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoders: Sequence[torch.nn.Module],
    tokenizers: Sequence,
    scheduler_config,
    prompts: Sequence[dict],
    sampler: str = "euler_a",
    out_dir: str | Path,
    step: int,
    device: torch.device | str | None = None,
    clip_skip: int = 1,
) -> list[Path]:
    """Render `prompts` (dicts: prompt, negative, width, height, seed, cfg, steps; missing keys get defaults)
    and write `out_dir/step_{step:06d}_{i:02d}.png` plus `out_dir/step_{step:06d}_grid.png`.

    `device`: where to run (modules elsewhere, e.g. a VAE kept on CPU, are moved there and back); None runs
    where the modules are. Returns the individual image paths, then the grid path.
    """
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    modules = [unet, vae, *text_encoders]
    images, paths = [], []
    with preserved_rng_state(), eval_mode(*modules), on_device(modules, device), torch.no_grad():
        pipe = build_pipeline(arch, unet, vae, text_encoders, tokenizers, sampler_scheduler(sampler, scheduler_config))
        for i, prompt in enumerate(prompts):
            p = _full_prompt(prompt, arch)
            cond = _encode(arch, tokenizers, text_encoders, p["prompt"], clip_skip, zero=False)
            uncond = _encode(arch, tokenizers, text_encoders, p["negative"], clip_skip,
                             zero=arch == "sdxl" and not p["negative"])
            kwargs = dict(prompt_embeds=cond.prompt_embeds, negative_prompt_embeds=uncond.prompt_embeds)
            if arch == "sdxl":
                kwargs.update(pooled_prompt_embeds=cond.pooled_embeds, negative_pooled_prompt_embeds=uncond.pooled_embeds)
            image = pipe(**kwargs, width=int(p["width"]), height=int(p["height"]), guidance_scale=float(p["cfg"]),
                         num_inference_steps=int(p["steps"]), generator=torch.Generator("cpu").manual_seed(int(p["seed"])),
                         output_type="pil").images[0]
            path = out_dir / f"step_{step:06d}_{i:02d}.png"
            image.save(path)
            images.append(image)
            paths.append(path)
        del pipe
    if images:
        grid_path = out_dir / f"step_{step:06d}_grid.png"
        image_grid(images).save(grid_path)
        paths.append(grid_path)
    return paths
