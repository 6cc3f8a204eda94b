"""Validation loss: held-out images evaluated at fixed timesteps with fixed noise.

The validation images are a held-out `validation.fraction` of the training images (chosen by `validation.seed`
among the non-regularisation images, never trained on) or the images of `validation.path`. Each image is
evaluated unflipped, with its own caption as written, at `validation.timesteps` timesteps evenly spaced over
`train.min_timestep..max_timestep` (the centres of equal parts), each with noise drawn from a generator seeded
by (validation.seed, image, timestep). The noise, timesteps, latents and conditioning therefore never change
during a run, between runs or across a resume: the curve moves only with the adapter weights.

The loss of one (image, timestep) pair is the training loss kind (`train.loss`, `train.huber_c`) with the
image's loss mask, without timestep weighting (min-SNR), so runs with different weightings compare. The value
is the mean over all pairs; with several processes each evaluates a fixed share of the pairs and the sums are
added up. Evaluation runs the models in eval mode under no_grad and touches no random state of training.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import torch

from sdtrain.errors import ConfigError
from sdtrain.train.logs import ResumedCsv


def hold_out(dataset, fraction: float, seed: int):
    """(the dataset without the held-out images, the held-out records): round(fraction x images), at least one,
    drawn by `seed` from the non-regularisation images."""
    candidates = [i for i, r in enumerate(dataset.records) if not r.is_reg]
    count = max(1, round(fraction * len(candidates)))
    if count >= len(candidates):
        raise ConfigError(f"validation.fraction = {fraction:g} would hold out all {len(candidates)} training "
                          "image(s); lower it, or give held-out images in validation.path")
    chosen = set(random.Random(seed).sample(candidates, count))
    kept = [r for i, r in enumerate(dataset.records) if i not in chosen]
    held = [r for i, r in enumerate(dataset.records) if i in chosen]
    return dataclasses.replace(dataset, records=kept), held


def validation_split(cfg, dataset):
    """(training dataset, validation records) for the config's `[validation]`; no validation: (dataset, [])."""
    from sdtrain.data.dataset import SubsetSpec, scan_dataset

    fraction, path, seed = cfg.validation.fraction, cfg.validation.path, cfg.validation.seed
    if fraction:
        return hold_out(dataset, fraction, seed)
    if path is not None:
        spec = SubsetSpec(path=path, caption_extension=cfg.data.caption_extension)
        return dataset, scan_dataset([spec], dataset.bucketing).records
    return dataset, []


def describe_validation(cfg, records) -> str:
    v = cfg.validation
    source = f"held out {v.fraction:g} of the training images" if v.fraction else f"from {v.path}"
    images = f"{len(records)} image{'s' if len(records) != 1 else ''}"
    return (f"validation: {images} ({source}, seed {v.seed}) x {v.timesteps} fixed timesteps, every "
            f"{v.every_n_steps} steps and after the last; validation_log.csv")


def validation_timesteps(count: int, low: int, high: int) -> list[int]:
    """`count` timesteps evenly spread over [low, high): the centres of `count` equal parts."""
    return [low + int((j + 0.5) * (high - low) / count) for j in range(count)]


def validation_generator(seed: int, image: int, timestep_index: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed((seed * 1_000_003 + image) * 101 + timestep_index)


class ValidationLog(ResumedCsv):
    """`validation_log.csv`: step, validation loss (see `sdtrain.train.logs.ResumedCsv`)."""

    def __init__(self, path: Path, keep_until: int = 0, enabled: bool = True):
        super().__init__(path, "step,validation_loss", keep_until, enabled)

    def write(self, step: int, loss: float) -> None:
        self.append([f"{step},{loss!r}"])


@dataclasses.dataclass
class ValidationSample:
    latent: torch.Tensor  # [4, h, w], scaled
    mask: torch.Tensor | None  # [1, h, w] or None
    caption: str
    time_ids: torch.Tensor  # [6]
    timestep: int
    noise: torch.Tensor  # [4, h, w]


class Validator:
    """The fixed validation samples (encoded once) and their mean loss under the current adapters."""

    def __init__(self, cfg, records, base, device):
        from sdtrain.data.buckets import sdxl_time_ids
        from sdtrain.data.dataset import latent_item, latent_pixels
        from sdtrain.data.masks import latent_mask
        from sdtrain.train.batches import encode_pixels

        v, t = cfg.validation, cfg.train
        self.batch_size = v.batch_size
        timesteps = validation_timesteps(v.timesteps, t.min_timestep, t.max_timestep)
        self.samples: list[ValidationSample] = []
        for index, record in enumerate(records):
            item = latent_item(record, flip=False)
            with torch.no_grad():
                latent = encode_pixels(base.vae, latent_pixels(item)[None].to(device))[0].float().cpu()
            mask = None if item.mask is None else latent_mask(item, latent.shape[-2:])
            time_ids = torch.tensor(sdxl_time_ids(item.original_size, item.crop_top_left, item.bucket),
                                    dtype=torch.float32)
            for j, timestep in enumerate(timesteps):
                noise = torch.randn(latent.shape, generator=validation_generator(v.seed, index, j))
                self.samples.append(ValidationSample(latent, mask, record.caption, time_ids, timestep, noise))

    def batches(self, rank: int, processes: int) -> list[list[ValidationSample]]:
        """This process's share of the samples (every processes-th), in batches of one latent size."""
        mine = self.samples[rank::processes]
        by_shape: dict[tuple, list] = {}
        for sample in mine:
            by_shape.setdefault(tuple(sample.latent.shape), []).append(sample)
        return [group[i:i + self.batch_size] for group in by_shape.values()
                for i in range(0, len(group), self.batch_size)]

    def evaluate(self, trainer) -> float:
        """Mean validation loss over all samples and processes (the same value in every process)."""
        from sdtrain.train.conditioning import encode_prompts, unet_added_cond_kwargs
        from sdtrain.train.loss import diffusion_loss, prediction_type_of, training_target

        cfg, base, accelerator = trainer.cfg, trainer.base, trainer.accelerator
        device = accelerator.device
        unet = accelerator.unwrap_model(trainer.unet)
        modules = [unet, *base.text_encoders]
        modes = [m.training for m in modules]
        scheduler = base.noise_scheduler
        prediction_type = prediction_type_of(scheduler, base.prediction_type)
        total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of losses, count
        try:
            for m in modules:
                m.eval()
            with torch.no_grad():
                for batch in self.batches(accelerator.process_index, accelerator.num_processes):
                    latents = torch.stack([s.latent for s in batch]).to(device)
                    noise = torch.stack([s.noise for s in batch]).to(device)
                    timesteps = torch.tensor([s.timestep for s in batch], device=device, dtype=torch.long)
                    noisy = scheduler.add_noise(latents, noise, timesteps)
                    target = training_target(scheduler, latents, noise, timesteps, prediction_type)
                    with accelerator.autocast():
                        cond = encode_prompts(base.arch, base.tokenizers, base.text_encoders,
                                              [s.caption for s in batch], clip_skip=cfg.model.clip_skip)
                        added = None
                        if base.arch == "sdxl":
                            time_ids = torch.stack([s.time_ids for s in batch]).to(device)
                            added = unet_added_cond_kwargs(cond, time_ids)
                        pred = unet(noisy.to(trainer.weight_dtype), timesteps,
                                    encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=added).sample
                    for i, sample in enumerate(batch):
                        mask = None if sample.mask is None else sample.mask[None].to(device)
                        loss = diffusion_loss(pred[i:i + 1], target[i:i + 1], cfg.train.loss, cfg.train.huber_c,
                                              None, mask, cfg.train.normalize_masked_loss)
                        total[0] += loss.double()
                        total[1] += 1
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        if accelerator.num_processes > 1:
            total = accelerator.reduce(total, reduction="sum")
        return (total[0] / total[1]).item()
