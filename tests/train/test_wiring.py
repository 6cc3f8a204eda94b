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

from helpers_training import make_dataset, write_config
from sdtrain.config import load_config
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
        spy(trainer, "conditioning", lambda b, out, captions: b.update(captions=list(captions)))
        spy(trainer, "micro_batch_loss", lambda b, out, *args: b.update(loss=out.detach()))

        def unet_inputs(module, args, kwargs):
            added = kwargs.get("added_cond_kwargs") or {}
            self.batches[-1].update(embeds=kwargs["encoder_hidden_states"].detach(),
                                    pooled=added.get("text_embeds"))

        def unet_output(module, args, kwargs, output):
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


# ---------------------------------------------------------------- every key is read


# Keys the trainer does not read yet, with the reason; the test fails when one of them starts being read.
NOT_READ_YET = {
    "data.num_workers": "batches load in the main process; a torch DataLoader with workers is planned",
}
# Keys whose value reaches the trainer through the keys the resolver derives from them.
DERIVED = {"data.caption_extension": ("data.subsets.N.caption_extension", ".cap")}


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
    overrides = no_augmentation(2) + [
        "data.cache_text_encoder_outputs=true", "sample.every_n_steps=1", prompts, "save.every_n_steps=1",
        "save.every_n_epochs=1", "save.keep_last=1", "save.state_every_n_steps=1", "log.tensorboard=true",
        'save.targets=["comfyui"]']
    reads: set[str] = set()
    cfg = load_config(config, overrides)
    record_reads(cfg, reads)
    train(cfg, dry_run=True)
    Trainer(cfg, quiet=True).run()

    keys = {key for key, _ in iter_keys()}
    unread = keys - reads - set(DERIVED)
    assert unread == set(NOT_READ_YET), f"keys no code reads: {sorted(unread - set(NOT_READ_YET))}; " \
                                        f"read now, drop from NOT_READ_YET: {sorted(set(NOT_READ_YET) - unread)}"
    for source, (target, value) in DERIVED.items():
        assert target in reads
        changed = load_config(config, overrides + [f"{source}={value}"])
        assert changed.data.subsets[0].caption_extension == value  # the resolver carries it into the target
