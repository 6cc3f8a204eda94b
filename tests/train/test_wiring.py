"""Every training option reaches the code that uses it: each test observes the value where it is consumed (the
tensors the UNet, the noise scheduler, the text encoders and the optimizer receive, the loss the step returns),
never by reading the config back. `scripts/check_mutations.py` breaks the trainer in small ways and shows that
these tests fail for each.

The last test walks the schema: every key must be read by the trainer during a dry run and a short run."""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers_training import closed_form, make_dataset, write_config, write_half_masks
from sdtrain.config import load_config
from sdtrain.data.dataset import latent_item
from sdtrain.train.loop import Trainer, TrainerCallback, train


class Probe(TrainerCallback):
    """Records, per micro-batch: the keys, the captions given to the text conditioning, the latents / noise /
    timesteps given to the noise scheduler, the UNet's inputs and prediction and the loss of the micro-batch."""

    def __init__(self):
        self.batches = []

    def on_batch(self, trainer, epoch, keys):
        self.batches.append({"keys": keys})

    def attach(self, trainer):
        """Spy on the consumers of a set-up trainer."""
        base = trainer.base

        def spy(owner, name, record):
            original = getattr(owner, name)

            def wrapper(*args, **kwargs):
                out = original(*args, **kwargs)
                record(self.batches[-1], out, *args, **kwargs)
                return out

            setattr(owner, name, wrapper)

        spy(base.noise_scheduler, "add_noise",
            lambda b, out, latents, noise, timesteps: b.update(latents=latents, noise=noise, timesteps=timesteps))
        spy(trainer, "conditioning", lambda b, out, captions, *cached: b.update(captions=list(captions)))
        spy(trainer, "micro_batch_loss", lambda b, out, *args: b.update(loss=out.detach()))

        def unet_inputs(module, args, kwargs):
            if not module.training:  # sampling
                return
            added = kwargs.get("added_cond_kwargs") or {}
            self.batches[-1].update(sample=args[0].detach(), embeds=kwargs["encoder_hidden_states"].detach(),
                                    pooled=added.get("text_embeds"))

        def unet_output(module, args, kwargs, output):
            if not module.training:
                return
            self.batches[-1].update(pred=output.sample.detach().float())

        base.unet.register_forward_pre_hook(unet_inputs, with_kwargs=True)
        base.unet.register_forward_hook(unet_output, with_kwargs=True)
        return self


def probed_run(config, overrides=(), setup=None):
    """Run `config` with a Probe attached; `setup(trainer, probe)` runs after set-up, before the steps."""
    probe = Probe()
    trainer = Trainer(load_config(config, list(overrides)), quiet=True, callbacks=[probe])
    trainer.setup()
    probe.attach(trainer)
    if setup:
        setup(trainer, probe)
    trainer.run()
    return trainer, probe


def no_augmentation(steps: int) -> list[str]:
    return [f"train.max_steps={steps}", "save.state_every_n_steps=0", "data.subsets.0.shuffle_tags=false",
            "data.subsets.0.caption_dropout=0.0", "data.subsets.0.flip=false"]


# ---------------------------------------------------------------- the diffusion loss


def expected_loss(batch, scheduler, loss: str, huber_c: float, gamma: float, prediction_type: str):
    """The loss of one micro-batch from the tensors the trainer handed to the scheduler and got from the UNet,
    written out here from the formulas (not with sdtrain's loss functions)."""
    acp = scheduler.alphas_cumprod.double()[batch["timesteps"].cpu()].view(-1, 1, 1, 1)
    x0, eps = batch["latents"].double(), batch["noise"].double()
    target = eps if prediction_type == "epsilon" else acp.sqrt() * eps - (1 - acp).sqrt() * x0
    diff = batch["pred"].double() - target
    elementwise = {"l2": diff ** 2, "l1": diff.abs(),
                   "huber": 2 * huber_c * ((diff ** 2 + huber_c ** 2).sqrt() - huber_c)}[loss]
    per_sample = elementwise.flatten(1).mean(1)
    if gamma:
        snr = (acp / (1 - acp)).flatten()
        per_sample = per_sample * snr.clamp(max=gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    return per_sample.mean().item()


def test_loss_options_reach_the_step(tmp_path):
    """Huber with its c, min-SNR γ, v-prediction, noise offset and the timestep range, all in one run; then the
    defaults (l2, no weighting, ε) in another."""
    options = ["train.loss=huber", "train.huber_c=0.3", "train.min_snr_gamma=1", "model.prediction_type=v_prediction",
               "train.noise_offset=5", "train.min_timestep=300", "train.max_timestep=302", "train.batch_size=2"]
    trainer, probe = probed_run(write_config(tmp_path, "options"), no_augmentation(3) + options)
    scheduler = trainer.base.noise_scheduler
    for batch in probe.batches:
        assert set(batch["timesteps"].tolist()) <= {300, 301}
        assert batch["loss"].item() == pytest.approx(expected_loss(batch, scheduler, "huber", 0.3, 1.0, "v_prediction"),
                                                     rel=1e-5)
    # noise offset: each (sample, channel) is shifted by 5·N(0, 1), so channel means are far from 0
    channel_means = torch.cat([b["noise"].mean(dim=(2, 3)).flatten() for b in probe.batches])
    assert channel_means.abs().mean() > 1.0

    trainer, probe = probed_run(write_config(tmp_path, "defaults"), no_augmentation(2) + ["train.batch_size=2"])
    for batch in probe.batches:
        assert batch["loss"].item() == pytest.approx(expected_loss(batch, trainer.base.noise_scheduler, "l2", 0, 0,
                                                                   "epsilon"), rel=1e-5)
        assert batch["noise"].mean(dim=(2, 3)).abs().max() < 1.0
        assert batch["timesteps"].max() >= 100  # drawn over [0, 1000)


# ---------------------------------------------------------------- noise, timesteps and loss weights


def zero_terminal_alpha_bar():
    """SD's scaled-linear ᾱ rescaled to zero terminal SNR (Lin et al. 2024, Algorithm 1), in float64 here."""
    import numpy as np

    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    root = np.sqrt(np.cumprod(1 - betas))
    return torch.from_numpy(((root - root[-1]) * root[0] / (root[0] - root[-1])) ** 2)


def test_zero_terminal_snr_and_the_timestep_draw_reach_the_step(tmp_path):
    """v-prediction on the zero-terminal-SNR schedule with logit-normal timesteps shifted towards noise: the UNet
    gets √ᾱ·x₀ + √(1 − ᾱ)·ε with the rescaled ᾱ, at timesteps σ(N(0, 0.3)) shifted by 20 (about 930 to 970)."""
    options = ["model.prediction_type=v_prediction", "train.zero_terminal_snr=true", "train.timestep_sampling=logit_normal",
               "train.logit_mean=0", "train.logit_std=0.3", "train.timestep_shift=20", "train.batch_size=2"]
    trainer, probe = probed_run(write_config(tmp_path, "ztsnr"), no_augmentation(3) + options)
    acp = zero_terminal_alpha_bar()
    assert trainer.base.noise_scheduler.alphas_cumprod[-1].item() == 0.0
    timesteps = torch.cat([b["timesteps"] for b in probe.batches])
    assert 900 <= timesteps.min() and timesteps.max() <= 985, timesteps  # uniform: 0-999; unshifted: about 500
    for batch in probe.batches:
        a = acp[batch["timesteps"]].view(-1, 1, 1, 1)
        expected = a.sqrt() * batch["latents"].double() + (1 - a).sqrt() * batch["noise"].double()
        torch.testing.assert_close(batch["sample"].double(), expected, rtol=0, atol=1e-5)
        v = a.sqrt() * batch["noise"].double() - (1 - a).sqrt() * batch["latents"].double()
        assert batch["loss"].item() == pytest.approx((batch["pred"].double() - v).square().mean().item(), rel=1e-5)


def test_multires_noise_and_input_perturbation_reach_the_step(tmp_path, monkeypatch):
    """The noise drawn per sample is multires noise (unit std, neighbours alike); the noisy latents are made with
    it plus 0.5·ξ, and the ε target is the drawn noise without ξ."""
    import sdtrain.train.loss as loss_module

    drawn = []
    original = loss_module.sample_noise

    def sample_noise(*args, **kwargs):
        drawn.append(original(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(loss_module, "sample_noise", sample_noise)
    options = ["train.multires_noise_iterations=4", "train.multires_noise_discount=0.9", "train.ip_noise_gamma=0.5",
               "train.batch_size=2"]
    _, probe = probed_run(write_config(tmp_path, "multires"), no_augmentation(3) + options)
    assert len(drawn) == 6
    correlations = []
    for index, batch in enumerate(probe.batches):
        clean = torch.cat(drawn[2 * index:2 * index + 2])
        for sample in clean:
            assert sample.std().item() == pytest.approx(1.0, abs=1e-5)  # divided by its std
            correlations.append(torch.corrcoef(torch.stack([sample[..., :-1].flatten(),
                                                            sample[..., 1:].flatten()]))[0, 1].item())
        assert (batch["noise"] - clean).std().item() == pytest.approx(0.5, rel=0.2)
        loss = (batch["pred"].double() - clean.double()).square().mean().item()
        assert batch["loss"].item() == pytest.approx(loss, rel=1e-5)
    assert sum(correlations) / len(correlations) > 0.2  # plain noise: about 0


def test_loss_weight_options_reach_the_step(tmp_path):
    """Debiased estimation, v-prediction scaled like noise prediction and prior_loss_weight on a regularisation
    subset: each sample's loss is weighted by 1/(SNR+1) · SNR/(SNR+1) (SNR capped at 1000) · 0.25 if reg."""
    reg = write_subset(tmp_path / "reg", "a plain photo", colour=(90, 90, 90))
    extra = f'[[data.subsets]]\npath = "{reg}"\nis_reg = true\n'
    options = ["model.prediction_type=v_prediction", "train.debiased_estimation_loss=true",
               "train.scale_v_pred_loss_like_noise_pred=true", "train.prior_loss_weight=0.25", "train.batch_size=2"]
    trainer, probe = probed_run(write_config(tmp_path, "weights", extra=extra), no_augmentation(4) + options)
    records, scheduler = trainer.plan.dataset.records, trainer.base.noise_scheduler
    regs = 0
    for batch in probe.batches:
        acp = scheduler.alphas_cumprod.double()[batch["timesteps"].cpu()].view(-1, 1, 1, 1)
        x0, eps = batch["latents"].double(), batch["noise"].double()
        per_sample = (batch["pred"].double() - (acp.sqrt() * eps - (1 - acp).sqrt() * x0)).square().flatten(1).mean(1)
        snr = (acp / (1 - acp)).flatten().clamp(max=1000)
        is_reg = torch.tensor([records[key.record].is_reg for key in batch["keys"]])
        regs += int(is_reg.sum())
        weights = 1 / (snr + 1) * snr / (snr + 1) * torch.where(is_reg, 0.25, 1.0).double()
        assert batch["loss"].item() == pytest.approx((per_sample * weights).mean().item(), rel=1e-5)
    assert regs >= 2


def test_alpha_masks_reach_the_plan(tmp_path):
    """data.subsets.N.alpha_mask: the images' alpha channels become their loss masks (opaque = 1)."""
    from sdtrain.data.masks import latent_mask
    from sdtrain.train.plan import describe_plan, make_plan

    folder = tmp_path / "cutouts"
    folder.mkdir()
    rgba = Image.new("RGBA", (64, 64), (200, 0, 0, 0))
    rgba.paste((200, 0, 0, 255), (0, 0, 16, 64))
    rgba.save(folder / "cutout.png")
    config = write_config(tmp_path, "alpha")
    cfg = load_config(config, [f"data.subsets.0.path={folder}", "data.subsets.0.alpha_mask=true"])
    plan = make_plan(cfg)
    assert "loss masks: 1 of 1 images; each image's loss is averaged over its mask" in describe_plan(plan, cfg)
    [record] = plan.dataset.records
    expected = torch.zeros(1, 8, 8)
    expected[..., :2] = 1
    torch.testing.assert_close(latent_mask(latent_item(record, flip=False), (8, 8)), expected)


@pytest.mark.parametrize("cached", [False, True])
def test_loss_masks_reach_the_loss(tmp_path, cached):
    """With a mask folder, the loss is the masked loss of the UNet's prediction (normalised per sample or, with
    train.normalize_masked_loss = false, kohya's mean of loss x mask), and the ignored left half of every
    latent gets exactly zero gradient; the same through the latent cache and encoded live."""
    config = write_config(tmp_path, "masked")
    masks = write_half_masks(tmp_path / "masks", [f"img{i}" for i in range(4)])
    normalize = not cached
    overrides = no_augmentation(2) + [f"data.subsets.0.mask_path={masks}", "train.batch_size=2",
                                      f"data.cache_latents={str(cached).lower()}",
                                      f"train.normalize_masked_loss={str(normalize).lower()}"]
    grads = []

    def capture_gradient(trainer, probe):
        def hook(module, args, output):
            output.sample.register_hook(lambda g: grads.append(g.detach().clone()))

        trainer.base.unet.register_forward_hook(hook)

    trainer, probe = probed_run(config, overrides, capture_gradient)
    weight = 128 / 255
    for batch, grad in zip(probe.batches, grads):
        pred, noise = batch["pred"].double(), batch["noise"].double()  # epsilon: the target is the noise
        right = (pred - noise)[..., 4:].square()
        per_sample = right.flatten(1).mean(1) if normalize else weight * right.flatten(1).sum(1) / pred[0].numel()
        assert batch["loss"].item() == pytest.approx(per_sample.mean().item(), rel=1e-5)
        assert torch.count_nonzero(grad[..., :4]) == 0
        assert torch.count_nonzero(grad[..., 4:]) == grad[..., 4:].numel()
    assert len(grads) == len(probe.batches) == 2
    if cached:
        entries = list((tmp_path / "cache" / "latents").rglob("*.safetensors"))
        assert entries and all("mask" in load_file(e) for e in entries)


def test_validation_options_reach_the_evaluation(tmp_path):
    """validation.path / timesteps / seed / every_n_steps: the UNet sees the held-out images at the fixed
    timesteps; the logged value is their mean loss, recomputed here with the final weights; training draws the
    same steps as a run without validation."""
    from sdtrain.train.batches import encode_pixels
    from sdtrain.train.conditioning import encode_prompts, unet_added_cond_kwargs
    from sdtrain.data.buckets import sdxl_time_ids
    from sdtrain.data.dataset import latent_pixels
    from sdtrain.train.validation import validation_generator

    held = make_dataset(tmp_path / "held", count=2)
    options = no_augmentation(3) + ["train.min_timestep=100", "train.max_timestep=300"]
    plain, _ = probed_run(write_config(tmp_path, "plain"), options)
    seen = []

    def spy_validation(trainer, probe):
        original = trainer.validator.evaluate

        def evaluate(t):
            handle = trainer.base.unet.register_forward_pre_hook(
                lambda module, args: seen.append(args[1].tolist()))
            try:
                return original(t)
            finally:
                handle.remove()

        trainer.validator.evaluate = evaluate

    trainer, _ = probed_run(write_config(tmp_path, "validated"),
                            options + [f"validation.path={held}", "validation.timesteps=2", "validation.seed=11",
                                       "validation.every_n_steps=2", "validation.batch_size=4"], spy_validation)
    assert trainer.result.losses == plain.result.losses  # validation touches no training randomness
    assert [step for step, _ in trainer.result.validation] == [2, 3]
    assert [sorted(t) for t in seen] == [[150, 150, 250, 250]] * 2  # one batch of 2 images x 2 timesteps
    base, losses = trainer.base, []
    with torch.no_grad():
        for index, record in enumerate(trainer.plan.validation):
            item = latent_item(record, flip=False)
            latent = encode_pixels(base.vae, latent_pixels(item)[None])
            cond = encode_prompts("sdxl", base.tokenizers, base.text_encoders, [record.caption])
            time_ids = torch.tensor([sdxl_time_ids(item.original_size, item.crop_top_left, item.bucket)],
                                    dtype=torch.float32)
            for j, timestep in enumerate((150, 250)):
                noise = torch.randn(latent.shape[1:], generator=validation_generator(11, index, j))[None]
                acp = base.noise_scheduler.alphas_cumprod[timestep]
                noisy = acp.sqrt() * latent + (1 - acp).sqrt() * noise
                pred = base.unet(noisy, torch.tensor([timestep]), encoder_hidden_states=cond.prompt_embeds,
                                 added_cond_kwargs=unet_added_cond_kwargs(cond, time_ids)).sample
                losses.append((pred - noise).double().square().mean().item())
    assert trainer.result.validation[-1][1] == pytest.approx(sum(losses) / len(losses), rel=1e-4)


def test_ema_options_reach_the_average_and_the_samples(tmp_path, monkeypatch):
    """ema.decay / every_n_steps / start_step: the trainer's EMA of the real adapters equals the closed form over
    the trained weights; ema.use_for_samples: the sampler sees the EMA weights, training continues with its own;
    the EMA adapter file holds the EMA weights."""
    import sdtrain.train.sampling as sampling

    trained, sampled = {}, {}

    class Record(TrainerCallback):
        def on_step_end(self, trainer, step, loss):
            trained[step] = [p.detach().clone() for p in trainer.trainable_params]

    def fake_sample_images(arch, **kwargs):
        sampled[kwargs["step"]] = [p.detach().clone() for p in current.trainable_params]
        return []

    monkeypatch.setattr(sampling, "sample_images", fake_sample_images)
    overrides = no_augmentation(7) + SGD + ["optimizer.lr=5.0", "ema.enabled=true", "ema.decay=0.2",
                                            "ema.every_n_steps=2", "ema.start_step=1", "ema.use_for_samples=true",
                                            "sample.every_n_steps=1", 'sample.prompts=["a square"]']
    current = Trainer(load_config(write_config(tmp_path, "ema"), overrides), quiet=True, callbacks=[Record()])
    current.run()
    updates = [3, 5, 7]  # d = 2/11, then the decay 0.2 (below 3/12)
    for step in range(1, 8):
        due = [u for u in updates if u <= step]
        for i, param in enumerate(sampled[step]):
            expected = closed_form({s: trained[s][i] for s in due}, due, 0.2) if due else trained[step][i]
            torch.testing.assert_close(param, expected, rtol=1e-6, atol=1e-7)
    moved = [i for i, p in enumerate(trained[7]) if not torch.equal(p, trained[6][i])]
    assert moved and any(not torch.equal(sampled[7][i], trained[7][i]) for i in moved)
    with current.ema.applied():
        ema_state = {k: v.clone() for k, v in current.adapters.trainable_state_dict().items()}
    saved = load_file(str(tmp_path / "ema" / "run-ema.safetensors"))
    ups = [k for k in ema_state if k.endswith("lora_up.weight")]
    assert ups and all(torch.equal(saved[k], ema_state[k]) for k in ups)


def test_sample_schedule_and_sample_grids_reach_the_tracker(tmp_path, monkeypatch):
    """sample.at_start / every_n_epochs / every_n_steps decide the sampling steps (0, the epoch ends, every N);
    each sampling sends one grid of the images to TensorBoard at its step."""
    import sdtrain.train.sampling as sampling
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps, validation = [], []

    def fake_sample_images(arch, *, out_dir, step, prompts, **kwargs):
        (steps if out_dir.name == "samples" else validation).append((step, out_dir.name, len(prompts)))
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for index, colour in enumerate([(250, 0, 0), (0, 0, 250)]):
            paths.append(out_dir / f"{step}-{index}.png")
            Image.new("RGB", (16 + 8 * index, 16), colour).save(paths[-1])
        return paths

    monkeypatch.setattr(sampling, "sample_images", fake_sample_images)
    overrides = no_augmentation(8) + ["sample.at_start=true", "sample.every_n_epochs=1", "sample.every_n_steps=3",
                                      'sample.prompts=["a square"]', "log.tensorboard=true",
                                      f"validation.path={make_dataset(tmp_path / 'held', count=1)}",
                                      "validation.every_n_steps=5", "validation.timesteps=1",
                                      'validation.prompts=["one", "two"]']
    trainer, _ = probed_run(write_config(tmp_path, "grids"), overrides)
    assert trainer.plan.steps_per_epoch == 4
    assert validation == [(5, "validation", 2), (8, "validation", 2)]  # validation.prompts at each validation
    steps = [step for step, _, count in steps if count == 1]
    assert steps == [0, 3, 4, 6, 8]
    events = EventAccumulator(str(tmp_path / "grids" / "logs" / "sdtrain"), size_guidance={"images": 0})
    events.Reload()
    images = events.Images("samples")
    assert [i.step for i in images] == steps
    assert [i.step for i in events.Images("validation")] == [5, 8]
    assert {(i.width, i.height) for i in images} == {(16 + 24, 16)}  # the two images side by side


# ---------------------------------------------------------------- text conditioning


def reference_embeds(base, captions, clip_skip):
    """SDXL's conditioning written out: both encoders' hidden states `clip_skip` layers before the penultimate."""
    states = []
    for tokenizer, encoder in zip(base.tokenizers, base.text_encoders):
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            states.append(encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)])
    return torch.cat(states, dim=-1)


def count_calls(modules):
    calls = []
    for module in modules:
        module.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_clip_skip_and_the_text_encoder_cache(tmp_path):
    """clip_skip = 2 conditions the UNet on the layer before SDXL's usual one; with the text-encoder cache the
    encoders are not run during the steps and the UNet gets the same conditioning."""
    config = write_config(tmp_path, "clip")
    overrides = no_augmentation(3) + ["model.clip_skip=2"]
    encoder_calls = []
    trainer, live = probed_run(config, overrides,
                               setup=lambda t, p: encoder_calls.append(count_calls(t.base.text_encoders)))
    assert len(encoder_calls[0]) == 2 * 3  # both encoders, every step
    for batch in live.batches:
        expected = reference_embeds(trainer.base, batch["captions"], clip_skip=2)
        torch.testing.assert_close(batch["embeds"], expected, rtol=0, atol=0)
        assert not torch.allclose(batch["embeds"], reference_embeds(trainer.base, batch["captions"], clip_skip=1))

    encoder_calls.clear()
    trainer, cached = probed_run(config, overrides + ["data.cache_text_encoder_outputs=true",
                                                      f"train.output_dir={tmp_path / 'cached'}"],
                                 setup=lambda t, p: encoder_calls.append(count_calls(t.base.text_encoders)))
    assert encoder_calls[0] == []  # the steps read the cache
    assert list((tmp_path / "cache" / "text").rglob("*.safetensors"))
    for live_batch, cached_batch in zip(live.batches, cached.batches):
        assert cached_batch["captions"] == live_batch["captions"]
        # the cache encodes captions in batches: the same numbers up to float round-off
        torch.testing.assert_close(cached_batch["embeds"], live_batch["embeds"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cached_batch["pooled"], live_batch["pooled"], rtol=1e-5, atol=1e-6)
        assert cached_batch["loss"].item() == pytest.approx(live_batch["loss"].item(), rel=1e-5)


def write_subset(folder, caption: str | None, name="img", extension=".txt", colour=(200, 40, 40), size=(64, 64)):
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    image.paste((20, 20, 220), (0, 0, size[0] // 4, size[1]))  # asymmetric, so a flip changes the latent
    image.save(folder / f"{name}.png")
    if caption is not None:
        (folder / f"{name}{extension}").write_text(caption)
    return folder


def test_long_captions_prefix_suffix_and_wildcards_reach_the_text_encoder(tmp_path):
    """max_token_length = 225: captions of ~120 tokens condition the UNet on 227 states whose tail (beyond CLIP's
    77) depends on the caption's tail, through the text-encoder cache, and so do the sample prompts; the subset's
    prefix and suffix frame each caption and every use picks a line and a {a|b} alternative."""
    tail = ", ".join(f"detail{i}" for i in range(30))  # 115 tokens with "a red square, "
    lines = "{red|blue} square, " + tail + "\n{green|white} square, " + tail
    folder = write_subset(tmp_path / "wild", lines)
    config = write_config(tmp_path, "long")
    long_prompt = "a red square, " + tail
    overrides = no_augmentation(8) + [
        f"data.subsets.0.path={folder}", "data.subsets.0.wildcards=true", "data.subsets.0.caption_prefix=sks,",
        "data.subsets.0.caption_suffix=, best", "model.max_token_length=225", "data.cache_text_encoder_outputs=true",
        "sample.every_n_steps=8", f'sample.prompts=["{long_prompt} --w 64 --h 64 --s 1"]']
    sampled = []

    def watch_samples(trainer, probe):
        trainer.base.unet.register_forward_pre_hook(
            lambda module, args, kwargs: sampled.append(kwargs["encoder_hidden_states"].shape[1])
            if not module.training else None, with_kwargs=True)

    trainer, probe = probed_run(config, overrides, setup=watch_samples)
    captions = [c for b in probe.batches for c in b["captions"]]
    assert all(c.startswith("sks, ") and c.endswith(tail + " , best") for c in captions)
    chosen = {c.split(" square")[0] for c in captions}
    assert chosen <= {"sks, red", "sks, blue", "sks, green", "sks, white"} and len(chosen) >= 3, chosen
    by_caption = {}
    for batch in probe.batches:
        assert batch["embeds"].shape[1] == 227
        by_caption[batch["captions"][0]] = batch["embeds"][0]
    direct = trainer.encode_text(list(by_caption))
    for index, embeds in enumerate(by_caption.values()):
        torch.testing.assert_close(embeds, direct.prompt_embeds[index].to(embeds), rtol=1e-5, atol=1e-5)
    # the text beyond the first 75 tokens reaches states 77 and later
    first, second = (trainer.encode_text([long_prompt + extra]).prompt_embeds for extra in (", one", ", two, three"))
    torch.testing.assert_close(first[:, :60], second[:, :60])
    assert not torch.allclose(first[:, 77:], second[:, 77:])
    assert sampled and set(sampled) == {227}


def test_caption_options_and_flip_reach_the_text_encoder(tmp_path):
    dropped = write_subset(tmp_path / "dropped", "a caption that is always dropped")
    shuffled = write_subset(tmp_path / "shuffled", "first / second / third / fourth")
    kept = write_subset(tmp_path / "kept", "keep me ||| x, y, z ||| tail", extension=".cap")
    (kept / "img.txt").write_text("the .txt caption, not the one configured")
    uncaptioned = write_subset(tmp_path / "uncaptioned", None)
    extra = f"""
[[data.subsets]]
path = "{shuffled}"
repeats = 4
shuffle_tags = true
keep_tokens = 1
tag_separator = " / "
flip = true
[[data.subsets]]
path = "{kept}"
caption_extension = ".cap"
keep_tokens_separator = "|||"
tag_dropout = 1.0
[[data.subsets]]
path = "{uncaptioned}"
class_caption = "sks dog"
"""
    config = write_config(tmp_path, "captions", extra=extra)
    overrides = ["train.max_steps=14", "save.state_every_n_steps=0", f"data.subsets.0.path={dropped}",
                 "data.subsets.0.caption_dropout=1.0", "data.subsets.0.flip=false"]
    trainer, probe = probed_run(config, overrides)
    records = trainer.plan.dataset.records
    by_subset: dict[int, list] = {}
    for batch in probe.batches:
        for key, caption, latent in zip(batch["keys"], batch["captions"], batch["latents"]):
            by_subset.setdefault(records[key.record].subset_index, []).append((caption, latent))
    assert {c for c, _ in by_subset[0]} == {""}
    orders = {c for c, _ in by_subset[1]}
    assert all(c.startswith("first, ") and sorted(c.split(", ")[1:]) == ["fourth", "second", "third"] for c in orders)
    assert len(orders) > 1  # shuffled
    assert {c for c, _ in by_subset[2]} == {"keep me, tail"}
    assert {c for c, _ in by_subset[3]} == {"sks dog"}
    distinct = {tuple(latent.flatten().tolist()) for _, latent in by_subset[1]}
    assert len(distinct) == 2  # flipped and not
    assert len({tuple(latent.flatten().tolist()) for _, latent in by_subset[3]}) == 1


# ---------------------------------------------------------------- the optimizer step


class StepSpy:
    """torch optimizer step hooks: the gradients and values of every parameter before each step, and after."""

    def __init__(self, optimizer):
        self.before, self.after = [], []
        optimizer.register_step_pre_hook(lambda *a: self.before.append(self.snapshot(optimizer)))
        optimizer.register_step_post_hook(lambda *a: self.after.append(self.snapshot(optimizer)))

    @staticmethod
    def snapshot(optimizer):
        return [(group["lr"], [(p.detach().clone(), None if p.grad is None else p.grad.detach().clone())
                               for p in group["params"]]) for group in optimizer.param_groups]


SGD = ["optimizer.type=SGD", "optimizer.weight_decay=0", "train.max_grad_norm=0"]


def test_each_group_steps_at_its_own_learning_rate(tmp_path):
    rates = {"unet": 0.5, "te1": 0.25, "te2": 0.125}
    overrides = no_augmentation(1) + SGD + ["network.train_text_encoder=true", f"optimizer.unet_lr={rates['unet']}",
                                            f"optimizer.text_encoder_lr={rates['te1']}",
                                            f"optimizer.text_encoder_2_lr={rates['te2']}"]
    spies = []
    trainer, _ = probed_run(write_config(tmp_path, "rates"), overrides,
                            setup=lambda t, p: spies.append(StepSpy(t.optimizer.optimizer)))
    spy = spies[0]
    names = [group["name"] for group in trainer.optimizer.param_groups]
    assert sorted(names) == sorted(rates)
    moved = 0
    for name, (lr, before), (_, after) in zip(names, spy.before[0], spy.after[0]):
        assert lr == rates[name]
        for (value, grad), (new, _) in zip(before, after):
            if grad is not None:
                torch.testing.assert_close(new, value - rates[name] * grad, rtol=0, atol=1e-7)
                moved += bool(grad.abs().sum() > 0)
    assert moved > 10


def test_accumulation_averages_micro_batches_into_one_step(tmp_path):
    """Accumulation 3: one optimizer step per 3 micro-batches, with the mean of their gradients."""
    grads = []

    def record_gradients(trainer, probe):
        params = trainer.trainable_params
        original = trainer.micro_batch_loss

        def with_gradient(*args):
            loss = original(*args)
            grads.append(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))
            return loss

        trainer.micro_batch_loss = with_gradient
        probe.spy = StepSpy(trainer.optimizer.optimizer)

    trainer, probe = probed_run(write_config(tmp_path, "accumulate"),
                                no_augmentation(2) + SGD + ["train.gradient_accumulation_steps=3"], record_gradients)
    assert len(grads) == 6 and len(probe.spy.before) == 2
    for step in range(2):
        got = [grad for _, params in probe.spy.before[step] for _, grad in params]
        for index, grad in enumerate(got):
            parts = [g[index] for g in grads[3 * step:3 * step + 3]]
            if all(p is None for p in parts):
                continue
            expected = sum(torch.zeros_like(grad) if p is None else p for p in parts) / 3
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert trainer.result.losses[0] == pytest.approx(sum(b["loss"].item() for b in probe.batches[:3]) / 3)


def test_gradients_are_clipped_to_max_grad_norm(tmp_path):
    spies = []
    probed_run(write_config(tmp_path, "clip"), no_augmentation(2) + ["optimizer.type=SGD", "train.max_grad_norm=1e-4"],
               setup=lambda t, p: spies.append(StepSpy(t.optimizer.optimizer)))
    for snapshot in spies[0].before:
        grads = [grad for _, params in snapshot for _, grad in params if grad is not None]
        assert torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item() == pytest.approx(1e-4, rel=1e-3)


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_mixed_precision_runs_the_unet_under_autocast(tmp_path, precision, dtype):
    seen = []
    trainer, _ = probed_run(write_config(tmp_path, precision), no_augmentation(1) + [f"train.mixed_precision={precision}"],
                            setup=lambda t, p: t.base.unet.time_embedding.linear_1.register_forward_hook(
                                lambda module, args, out: seen.append(out.dtype)))
    assert seen == [dtype]
    assert math.isfinite(trainer.result.losses[0])
    assert {p.dtype for p in trainer.adapters.parameters()} == {torch.float32}  # adapters train in fp32


# ---------------------------------------------------------------- model loading


def test_revision_and_variant_reach_the_hub_download(tmp_path, monkeypatch):
    """A hub model is fetched at `model.revision`, and `model.variant` picks the variant's weight files."""
    import huggingface_hub

    from sdtrain.models.tiny import build_tiny_pipeline

    folder = tmp_path / "snapshot"
    build_tiny_pipeline("sd15", seed=0).save_pretrained(folder)
    build_tiny_pipeline("sd15", seed=1).save_pretrained(folder, variant="fp16")
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    config = write_config(tmp_path, "hub", arch="sd15")
    loaded = {}
    for variant in ("fp16", None):
        overrides = ["model.path=someone/tiny-sd15", "model.arch=sd15", "model.revision=0123abc"]
        trainer = Trainer(load_config(config, overrides + ([f"model.variant={variant}"] if variant else [])),
                          quiet=True)
        loaded[variant] = trainer._setup_base().unet.conv_in.weight
        repo, kwargs = calls[-1]
        assert repo == "someone/tiny-sd15" and kwargs["revision"] == "0123abc"
        assert any(".fp16" in pattern for pattern in kwargs["allow_patterns"]) == (variant == "fp16")
    torch.testing.assert_close(loaded["fp16"], build_tiny_pipeline("sd15", seed=1).unet.conv_in.weight)
    torch.testing.assert_close(loaded[None], build_tiny_pipeline("sd15", seed=0).unet.conv_in.weight)


# ---------------------------------------------------------------- adapter dropout and per-block settings


def first_step_grads(config, overrides):
    """(trainer, initial adapter tensors, the gradients of the first optimizer step) of a run."""
    spies, initial = [], {}

    def setup(trainer, probe):
        spies.append(StepSpy(trainer.optimizer.optimizer))
        initial.update({k: v.clone() for k, v in trainer.adapters.trainable_state_dict().items()})

    trainer, _ = probed_run(config, overrides, setup=setup)
    names = {id(p): n for n, p in trainer.adapters.named_parameters()}
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    grads = [grad for _, group in spies[0].before[0] for _, grad in group]
    return trainer, initial, {names[id(p)]: grad for p, grad in zip(params, grads)}


def test_adapter_dropout_reaches_the_layers_in_training_steps_only(tmp_path):
    """Dropout keys at 0 give the run without them bit for bit; module dropout 1 leaves every adapter untrained;
    network + rank dropout change the gradients of the steps, but not a forward outside a step (samples)."""
    config = write_config(tmp_path, "dropout")
    overrides = no_augmentation(2) + SGD
    plain, initial, plain_grads = first_step_grads(config, overrides)
    zeros, _, _ = first_step_grads(config, overrides + ["network.dropout=0", "network.rank_dropout=0",
                                                        "network.module_dropout=0"])
    assert zeros.dropout is None and all(m.dropout is None for m in zeros.adapters.modules.values())
    trained = plain.adapters.trainable_state_dict()
    assert_same = {k: torch.equal(v, zeros.adapters.trainable_state_dict()[k]) for k, v in trained.items()}
    assert all(assert_same.values())
    assert any(not torch.equal(v, initial[k]) for k, v in trained.items())

    skipped, skipped_initial, _ = first_step_grads(config, overrides + ["network.module_dropout=1"])
    assert all(torch.equal(v, skipped_initial[k]) for k, v in skipped.adapters.trainable_state_dict().items())

    dropped, _, dropped_grads = first_step_grads(config, overrides + ["network.dropout=0.3",
                                                                      "network.rank_dropout=0.5"])
    assert all(isinstance(m.dropout.p_rank, float) and m.dropout.p_rank == 0.5 for m in dropped.adapters.modules.values())
    # B = 0 at step 1, so the forward is the base model's and only lora_up's gradient s·gᵀ·h sees the masks
    differ = [not torch.equal(grad, dropped_grads[name]) for name, grad in plain_grads.items()
              if name.endswith("lora_up.weight")]
    assert len(differ) == len(dropped.adapters.modules) and all(differ)

    assert not dropped.dropout.armed  # between steps (saves, samples, the final verify) nothing drops
    name, module = next(iter(dropped.adapters.modules.items()))
    x = torch.randn(2, 5, module.base.in_features)
    with torch.no_grad():
        outside = module(x)
        layer_dropout, module.dropout = module.dropout, None
        reference = module(x)
        module.dropout = layer_dropout
        with dropped.dropout_armed(0, 0, 2):
            inside = module(x)
    assert torch.equal(outside, reference) and not torch.equal(inside, reference)


def test_block_learning_rates_and_ranks_reach_the_optimizer_and_the_file(tmp_path):
    """[[network.blocks]]: the entries' ranks shape the adapters and the saved file, their rates become parameter
    groups of the SGD step (a block at lr 0 keeps its weights), the file keeps network.rank as ss_network_dim."""
    import json

    from safetensors import safe_open

    blocks = ["network.blocks.0.pattern=lora_unet_output_blocks_*", "network.blocks.0.rank=2",
              "network.blocks.0.lr=0", "network.blocks.1.pattern=lora_unet_input_blocks_*",
              "network.blocks.1.lr=0.25"]
    overrides = no_augmentation(1) + SGD + ["optimizer.unet_lr=0.5", 'save.targets=["comfyui"]'] + blocks
    spies = []
    trainer, _ = probed_run(write_config(tmp_path, "blocks"), overrides,
                            setup=lambda t, p: spies.append(StepSpy(t.optimizer.optimizer)))
    rates = {"unet": 0.5, "unet:blocks.0": 0.0, "unet:blocks.1": 0.25}
    groups = trainer.optimizer.param_groups
    assert sorted(g["name"] for g in groups) == sorted(rates)
    for group in groups:
        members = {n for n, m in trainer.adapters.modules.items()
                   if any(p is q for p in m.parameters() for q in group["params"])}
        prefix = {"unet:blocks.0": "lora_unet_output_blocks_", "unet:blocks.1": "lora_unet_input_blocks_"}
        if group["name"] in prefix:
            assert members and all(n.startswith(prefix[group["name"]]) for n in members)
        else:
            assert members and not any(n.startswith(tuple(prefix.values())) for n in members)
    moved = frozen = 0
    for group, (lr, before), (_, after) in zip(groups, spies[0].before[0], spies[0].after[0]):
        assert lr == rates[group["name"]]
        for (value, grad), (new, _) in zip(before, after):
            if grad is not None and grad.abs().sum() > 0:
                torch.testing.assert_close(new, value - lr * grad, rtol=0, atol=1e-7)
                moved += lr > 0
                frozen += lr == 0 and torch.equal(new, value)
    assert moved > 5 and frozen > 5
    ranks = {n: m.rank for n, m in trainer.adapters.modules.items()}
    assert {r for n, r in ranks.items() if n.startswith("lora_unet_output_blocks_")} == {2}
    assert {r for n, r in ranks.items() if not n.startswith("lora_unet_output_blocks_")} == {4}
    with safe_open(str(trainer.result.final_adapter), "pt") as f:
        metadata = f.metadata()
        file_ranks = {k[:-len(".lora_down.weight")]: f.get_tensor(k).shape[0] for k in f.keys()
                      if k.endswith(".lora_down.weight")}
    assert file_ranks == ranks
    assert metadata["ss_network_dim"] == "4"
    assert json.loads(json.loads(metadata["ss_network_args"])["blocks"]) == [
        {"pattern": "lora_unet_output_blocks_*", "rank": 2}]
    assert trainer.result.verify_report.exact() and "comfyui" in trainer.result.verify_report.exact()


# ---------------------------------------------------------------- every key is read


# Keys the trainer does not read yet, with the reason; the test fails when one of them starts being read.
NOT_READ_YET: dict[str, str] = {}  # key -> why no code reads it yet
# Keys whose value reaches the trainer through the keys the resolver derives from them: (the derived key, a
# value for the key, what the derived key then holds).
DERIVED = {"data.caption_extension": ("data.subsets.N.caption_extension", ".cap",
                                      lambda cfg: cfg.data.subsets[0].caption_extension == ".cap"),
           "log.tensorboard": ("log.trackers", "false", lambda cfg: cfg.log.trackers == [])}


def record_reads(cfg, reads: set[str]) -> None:
    """Make every section of `cfg` record which keys code reads (dataclasses' own walks, as in the resolved
    config dump or `dataclasses.replace`, read every key and use none, so they do not count)."""
    def instrument(section, prefix: str):
        cls = type(section)
        names = {f.name for f in dataclasses.fields(cls)}

        def getattribute(self, name):
            if name in names and not sys._getframe(1).f_code.co_filename.endswith(os.sep + "dataclasses.py"):
                reads.add(prefix + name)
            return object.__getattribute__(self, name)

        section.__class__ = type(cls.__name__, (cls,), {"__getattribute__": getattribute})
        for f in dataclasses.fields(cls):
            value = object.__getattribute__(section, f.name)
            if dataclasses.is_dataclass(value):
                instrument(value, f"{prefix}{f.name}.")
            elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
                for item in value:
                    instrument(item, f"{prefix}{f.name}.N.")

    instrument(cfg, "")


def test_every_config_key_is_read(tmp_path, capsys):
    from sdtrain.config.schema import iter_keys

    prompts = 'sample.prompts=["a square --w 64 --h 64 --s 1"]'
    config = write_config(tmp_path, "keys")
    masks = write_half_masks(tmp_path / "masks", ["img0"])
    overrides = no_augmentation(2) + [
        f"data.subsets.0.mask_path={masks}", "train.normalize_masked_loss=false",
        "validation.fraction=0.25", "validation.seed=5", "validation.every_n_steps=1", "validation.timesteps=1",
        "validation.batch_size=2", "ema.enabled=true", "ema.decay=0.9", "ema.every_n_steps=1", "ema.start_step=0",
        "ema.use_for_samples=true", "sample.at_start=true", "sample.every_n_epochs=1",
        'validation.prompts=["a square --w 64 --h 64 --s 1"]',
        "data.cache_text_encoder_outputs=true", "sample.every_n_steps=1", prompts, "save.every_n_steps=1",
        "save.every_n_epochs=1", "save.keep_last=1", "save.state_every_n_steps=1", "log.tensorboard=true",
        'save.targets=["comfyui"]', "model.max_token_length=150", "data.subsets.0.caption_prefix=sks,",
        "data.subsets.0.caption_suffix=, end", "data.subsets.0.wildcards=true", "model.prediction_type=v_prediction",
        "train.debiased_estimation_loss=true", "train.scale_v_pred_loss_like_noise_pred=true",
        "train.prior_loss_weight=0.5", "train.multires_noise_iterations=2", "train.multires_noise_discount=0.5",
        "train.ip_noise_gamma=0.1", "train.zero_terminal_snr=true", "train.timestep_sampling=logit_normal",
        "train.logit_mean=0.1", "train.logit_std=1.1", "train.timestep_shift=1.5",
        "network.dropout=0.1", "network.rank_dropout=0.1", "network.module_dropout=0.1",
        "network.blocks.0.pattern=lora_unet_output_blocks_*", "network.blocks.0.rank=2", "network.blocks.0.alpha=1",
        "network.blocks.0.lr=1e-3"]
    reads: set[str] = set()
    cfg = load_config(config, overrides)
    record_reads(cfg, reads)
    train(cfg, dry_run=True)
    Trainer(cfg, quiet=True).run()

    keys = {key for key, _ in iter_keys()}
    unread = keys - reads - set(DERIVED)
    assert unread == set(NOT_READ_YET), f"keys no code reads: {sorted(unread - set(NOT_READ_YET))}; " \
                                        f"read now, drop from NOT_READ_YET: {sorted(set(NOT_READ_YET) - unread)}"
    assert cfg.log.trackers == ["tensorboard"]  # from log.tensorboard = true
    for source, (target, value, carried) in DERIVED.items():
        assert target in reads
        assert carried(load_config(config, overrides + [f"{source}={value}"]))  # the resolver carries it over
