import types

import pytest
import torch

from sdtrain.models.tiny import build_tiny_pipeline
from sdtrain.train.conditioning import encode_prompts, sdxl_add_time_ids, tokenize, unet_added_cond_kwargs

PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse at dusk, dramatic sky"]
LONG = " ".join(["a very long prompt about many red and blue things"] * 12)


def _sd15_reference(pipe, prompts, diffusers_clip_skip=None):
    te = pipe.text_encoder
    # diffusers' SD pipeline reads `text_encoder.text_model.final_layer_norm`, which transformers 5 flattened away;
    # give it a plain (non-module) alias for the comparison.
    object.__setattr__(te, "text_model", types.SimpleNamespace(final_layer_norm=te.final_layer_norm))
    try:
        return pipe.encode_prompt(prompts, "cpu", 1, False, clip_skip=diffusers_clip_skip)[0]
    finally:
        object.__delattr__(te, "text_model")


def _sdxl_encode(pipe, prompts, clip_skip=1):
    return encode_prompts("sdxl", [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                          prompts, clip_skip=clip_skip)


@torch.no_grad()
def test_sd15_matches_diffusers_encode_prompt(sd15):
    cond = encode_prompts("sd15", [sd15.tokenizer], [sd15.text_encoder], PROMPTS)
    assert cond.prompt_embeds.shape == (2, 77, 32) and cond.pooled_embeds is None
    torch.testing.assert_close(cond.prompt_embeds, _sd15_reference(sd15, PROMPTS), rtol=0, atol=0)


@torch.no_grad()
def test_sd15_clip_skip_2_matches_diffusers(sd15):
    # our clip_skip=2 (A1111 "clip skip 2") is diffusers' clip_skip=1
    cond = encode_prompts("sd15", [sd15.tokenizer], [sd15.text_encoder], PROMPTS, clip_skip=2)
    torch.testing.assert_close(cond.prompt_embeds, _sd15_reference(sd15, PROMPTS, 1), rtol=0, atol=0)
    assert not torch.allclose(cond.prompt_embeds, _sd15_reference(sd15, PROMPTS))


@torch.no_grad()
def test_long_prompt_truncated_like_diffusers(sd15):
    assert tokenize(sd15.tokenizer, [LONG]).shape == (1, 77)
    cond = encode_prompts("sd15", [sd15.tokenizer], [sd15.text_encoder], [LONG])
    torch.testing.assert_close(cond.prompt_embeds, _sd15_reference(sd15, [LONG]), rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sdxl_matches_diffusers_encode_prompt(sdxl, clip_skip):
    cond = _sdxl_encode(sdxl, PROMPTS, clip_skip)
    embeds, _, pooled, _ = sdxl.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False,
                                              clip_skip=None if clip_skip == 1 else clip_skip - 1)
    assert cond.prompt_embeds.shape == (2, 77, 32 + 64) and cond.pooled_embeds.shape == (2, 64)
    torch.testing.assert_close(cond.prompt_embeds, embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled_embeds, pooled, rtol=0, atol=0)


def test_adapters_in_text_encoders_get_gradients_and_still_match(sdxl):
    from peft import LoraConfig, inject_adapter_in_model

    pipe = build_tiny_pipeline("sdxl", seed=1)
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj", "fc1"], use_dora=True, init_lora_weights=False)
    encoders = [inject_adapter_in_model(config, pipe.text_encoder), inject_adapter_in_model(config, pipe.text_encoder_2)]
    for te in encoders:
        for name, p in te.named_parameters():
            p.requires_grad_("lora_" in name)

    cond = _sdxl_encode(pipe, PROMPTS[:1])
    (cond.prompt_embeds.square().mean() + cond.pooled_embeds.square().mean()).backward()
    # SDXL reads the penultimate layer, so only CLIP-G's last layer (through the pooled output) gets gradients
    for te, layers in ((encoders[0], ("layers.0.", "layers.1.")), (encoders[1], ("layers.0.", "layers.1.", "layers.2."))):
        grads = [p.grad for n, p in te.named_parameters() if "lora_A" in n and any(f in n for f in layers)]
        assert len(grads) == 3 * len(layers) and all(g is not None and g.abs().sum() > 0 for g in grads)
    unused = [p.grad for n, p in encoders[0].named_parameters() if "lora_A" in n and "layers.2." in n]
    assert all(g is None or g.abs().sum() == 0 for g in unused)

    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS[:1], device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(cond.prompt_embeds.detach(), embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled_embeds.detach(), pooled, rtol=0, atol=0)


def test_time_ids_match_the_sdxl_pipeline(sdxl):
    expected = sdxl._get_add_time_ids((768, 512), (16, 8), (1024, 1024), dtype=torch.float32,
                                      text_encoder_projection_dim=64)
    torch.testing.assert_close(sdxl_add_time_ids((768, 512), (16, 8), (1024, 1024)), expected)
    batch = sdxl_add_time_ids([(768, 512), (512, 512)], torch.tensor([[16, 8], [0, 0]]), (1024, 1024))
    torch.testing.assert_close(batch, torch.tensor([[768.0, 512, 16, 8, 1024, 1024], [512, 512, 0, 0, 1024, 1024]]))


@torch.no_grad()
def test_added_cond_kwargs_drive_the_sdxl_unet(sdxl, sd15):
    cond = _sdxl_encode(sdxl, PROMPTS)
    kwargs = unet_added_cond_kwargs(cond, sdxl_add_time_ids((64, 64), (0, 0), (64, 64)))
    assert set(kwargs) == {"text_embeds", "time_ids"} and kwargs["time_ids"].shape == (2, 6)
    latents = torch.randn(2, 4, 8, 8)
    out = sdxl.unet(latents, torch.tensor([10, 500]), cond.prompt_embeds, added_cond_kwargs=kwargs).sample
    assert out.shape == latents.shape
    other = unet_added_cond_kwargs(cond, sdxl_add_time_ids((1024, 1024), (0, 0), (64, 64)))
    assert not torch.allclose(out, sdxl.unet(latents, torch.tensor([10, 500]), cond.prompt_embeds,
                                             added_cond_kwargs=other).sample)
    assert unet_added_cond_kwargs(encode_prompts("sd15", [sd15.tokenizer], [sd15.text_encoder], PROMPTS)) is None
