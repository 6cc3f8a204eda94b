import random

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrain.errors import ConfigError
from sdtrain.train.sampling import preserved_rng_state, sample_images, sampler_scheduler


def _components(pipe):
    if hasattr(pipe, "text_encoder_2"):
        return dict(arch="sdxl", unet=pipe.unet, vae=pipe.vae, text_encoders=[pipe.text_encoder, pipe.text_encoder_2],
                    tokenizers=[pipe.tokenizer, pipe.tokenizer_2], scheduler_config=pipe.scheduler.config)
    return dict(arch="sd15", unet=pipe.unet, vae=pipe.vae, text_encoders=[pipe.text_encoder],
                tokenizers=[pipe.tokenizer], scheduler_config=pipe.scheduler.config)


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


PROMPTS = [
    dict(prompt="a red cube", negative="blurry", width=64, height=64, seed=1, cfg=5.0, steps=2),
    dict(prompt="a blue ball", negative="", width=128, height=64, seed=2, cfg=1.0, steps=2),
    dict(prompt="a green cone", negative="", width=64, height=64, seed=3, cfg=7.0, steps=2),
]


def test_pngs_and_grid(sd15, tmp_path):
    paths = sample_images(**_components(sd15), prompts=PROMPTS, sampler="euler_a", out_dir=tmp_path / "samples", step=20)
    names = [p.name for p in paths]
    assert names == ["step_000020_00.png", "step_000020_01.png", "step_000020_02.png", "step_000020_grid.png"]
    sizes = []
    for p in paths[:3]:
        with Image.open(p) as im:
            assert im.format == "PNG"
            sizes.append(im.size)
    assert sizes == [(64, 64), (128, 64), (64, 64)]
    # 3 images → 2 columns × 2 rows of 128×64 cells, each image in its cell's top-left corner
    grid = _pixels(paths[3])
    assert grid.shape == (128, 256, 3)
    for n, p in enumerate(paths[:3]):
        img = _pixels(p)
        x, y = (n % 2) * 128, (n // 2) * 64
        assert np.array_equal(grid[y:y + img.shape[0], x:x + img.shape[1]], img)


def test_same_seed_same_image_and_matches_the_diffusers_pipeline(sd15, tmp_path):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    prompt = dict(prompt="a red cube", negative="blurry", width=64, height=64, seed=11, cfg=5.0, steps=2)
    a, b, c, _ = sample_images(**_components(sd15), prompts=[prompt, prompt, {**prompt, "seed": 12}], out_dir=tmp_path,
                               step=1)
    assert np.array_equal(_pixels(a), _pixels(b))
    assert not np.array_equal(_pixels(a), _pixels(c))

    ref = StableDiffusionPipeline(**{**sd15.components,
                                     "scheduler": EulerAncestralDiscreteScheduler.from_config(sd15.scheduler.config)})
    ref.set_progress_bar_config(disable=True)
    expected = ref("a red cube", negative_prompt="blurry", width=64, height=64, guidance_scale=5.0,
                   num_inference_steps=2, generator=torch.Generator().manual_seed(11), output_type="np").images[0]
    expected = (expected * 255).round().astype(np.uint8)
    assert np.abs(_pixels(a).astype(int) - expected.astype(int)).max() <= 1


def test_sdxl_matches_the_diffusers_pipeline(sdxl, tmp_path):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

    prompt = dict(prompt="a lighthouse", negative="", width=64, height=64, seed=5, cfg=6.0, steps=2)
    path = sample_images(**_components(sdxl), prompts=[prompt], sampler="dpmpp_2m", out_dir=tmp_path, step=7)[0]
    ref = StableDiffusionXLPipeline(**{**sdxl.components,
                                       "scheduler": DPMSolverMultistepScheduler.from_config(sdxl.scheduler.config)})
    ref.set_progress_bar_config(disable=True)
    expected = ref("a lighthouse", width=64, height=64, guidance_scale=6.0, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    expected = (expected * 255).round().astype(np.uint8)
    assert np.abs(_pixels(path).astype(int) - expected.astype(int)).max() <= 1


def test_training_rng_and_modes_untouched(sd15, tmp_path):
    comps = _components(sd15)
    unet, te = comps["unet"], comps["text_encoders"][0]
    unet.train()
    te.eval()
    te.encoder.layers[0].train()  # a mixed state must come back as it was
    seen_modes = []
    hook = unet.register_forward_hook(lambda m, i, o: seen_modes.append(m.training))

    def draws():
        return torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)]

    torch.manual_seed(123); np.random.seed(123); random.seed(123)
    expected = draws()
    torch.manual_seed(123); np.random.seed(123); random.seed(123)
    try:
        sample_images(**comps, prompts=PROMPTS[:1], sampler="euler_a", out_dir=tmp_path, step=3)
    finally:
        hook.remove()
    got = draws()
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]
    assert seen_modes and not any(seen_modes)  # sampled in eval mode
    assert unet.training and all(m.training for m in unet.modules())
    assert not te.training and te.encoder.layers[0].training and not te.encoder.layers[1].training


def test_preserved_rng_state_restores_streams():
    torch.manual_seed(0); np.random.seed(0); random.seed(0)
    expected = (torch.rand(2), np.random.rand(2), random.random())
    torch.manual_seed(0); np.random.seed(0); random.seed(0)
    with preserved_rng_state():
        torch.rand(5); np.random.rand(5); random.random()
    got = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_sampler_schedulers_from_model_config(sd15):
    names = {"euler_a": "EulerAncestralDiscreteScheduler", "euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler",
             "dpmpp_2m": "DPMSolverMultistepScheduler"}
    for sampler, cls in names.items():
        sched = sampler_scheduler(sampler, sd15.scheduler.config)
        assert type(sched).__name__ == cls
        assert (sched.config.beta_schedule, sched.config.beta_start, sched.config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    from diffusers import DDPMScheduler

    ddpm_config = DDPMScheduler.from_config(sd15.scheduler.config).config  # carries DDPM's clip_sample=True default
    assert ddpm_config.clip_sample is True
    for config in (sd15.scheduler.config, ddpm_config):
        assert sampler_scheduler("ddim", config).config.clip_sample is False  # latents are never clipped
    with pytest.raises(ConfigError, match="sample.sampler"):
        sampler_scheduler("lms", sd15.scheduler.config)


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_other_samplers_render(sd15, tmp_path, sampler):
    paths = sample_images(**_components(sd15), prompts=PROMPTS[:1], sampler=sampler, out_dir=tmp_path, step=0)
    with Image.open(paths[0]) as im:
        assert im.size == (64, 64)

