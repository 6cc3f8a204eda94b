"""The training plan: what a run will do, worked out before any model weights load (`--dry-run` prints it).

Data: subsets scanned, skipped files listed, bucket table. Steps: batches per epoch, optimizer steps per
epoch (batches / (processes x accumulation)), total steps. Network: adapted modules and trainable parameters
per group, from the UNet / text-encoder configs instantiated on the meta device.

Batches are planned at the global batch size (per-device batch x P processes), and process r trains the r-th
slice of each global batch; so P processes at batch B see exactly the samples one process sees at batch P·B.
The batch stream is continuous over epochs: optimizer step g consumes global batches [g·A, (g+1)·A) for A
accumulation steps. So the position in training is the global step alone, which is what resume stores.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from sdtrain.config.schema import BUILTIN_MODELS
from sdtrain.data.buckets import Bucketing
from sdtrain.data.captions import CaptionOptions
from sdtrain.data.dataset import ScannedDataset, SubsetSpec, locate_step, scan_dataset, steps_per_epoch
from sdtrain.train.validation import describe_validation, validation_split



def subset_specs(cfg) -> list[SubsetSpec]:
    """Data-pipeline subset specs from the `[[data.subsets]]` tables."""
    specs = []
    for subset in cfg.data.subsets:
        captions = CaptionOptions(
            shuffle_tags=subset.shuffle_tags,
            keep_tokens=subset.keep_tokens,
            keep_tokens_separator=subset.keep_tokens_separator,
            tag_separator=subset.tag_separator,
            caption_dropout=subset.caption_dropout,
            tag_dropout=subset.tag_dropout,
            class_caption=subset.class_caption,
            prefix=subset.caption_prefix,
            suffix=subset.caption_suffix,
            wildcards=subset.wildcards,
        )
        specs.append(SubsetSpec(path=subset.path, repeats=subset.repeats, is_reg=subset.is_reg,
                                caption_extension=subset.caption_extension or cfg.data.caption_extension,
                                captions=captions, flip=subset.flip, random_crop=subset.random_crop,
                                mask_path=subset.mask_path, alpha_mask=subset.alpha_mask))
    return specs


def resolution_of(cfg, arch: str) -> tuple[int, int]:
    from sdtrain.config import default_resolution

    resolution = cfg.data.resolution
    if resolution in (None, "auto"):
        resolution = default_resolution(arch if arch in ("sd15", "sd2", "sdxl") else "sd15")
    return int(resolution[0]), int(resolution[1])


def bucketing_for(cfg, arch: str) -> Bucketing:
    return Bucketing(resolution=resolution_of(cfg, arch), min_side=cfg.data.min_bucket_side,
                     max_side=cfg.data.max_bucket_side, step=cfg.data.bucket_step, no_upscale=cfg.data.no_upscale)


def detect_arch(cfg) -> str:
    """The model family from config, folder or single-file header, without loading weights."""
    from sdtrain.models.loading import folder_arch

    if cfg.model.arch not in (None, "auto"):
        return cfg.model.arch
    path = str(cfg.model.path)
    if path in BUILTIN_MODELS:
        return BUILTIN_MODELS[path]
    local = Path(path)
    if local.is_dir():
        return folder_arch(local)
    if local.is_file() and local.suffix == ".safetensors":
        from sdtrain.models.single_file import detect_single_file_arch

        return detect_single_file_arch(local)
    if cfg.model.config_dir:
        return folder_arch(Path(cfg.model.config_dir))
    return "sdxl" if "xl" in path.lower() else "sd15"


# Text encoders of the released models (CLIP ViT-L/14; OpenCLIP ViT-H/14 as diffusers loads it; OpenCLIP ViT-bigG/14).
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               projection_dim=768, hidden_act="quick_gelu")
_OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                   projection_dim=512, hidden_act="gelu")
_OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                      projection_dim=1280, hidden_act="gelu")
_REFERENCE_TEXT_ENCODERS = {"sd15": [_CLIP_L], "sd2": [_OPENCLIP_H], "sdxl": [_CLIP_L, _OPENCLIP_BIGG]}


def reference_configs(arch: str):
    """(UNet config, [CLIPTextConfig]) of the released architecture of a model family."""
    from transformers import CLIPTextConfig

    from sdtrain.models.ldm_layout import REFERENCE_UNET_CONFIGS

    encoders = [CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **c) for c in _REFERENCE_TEXT_ENCODERS[arch]]
    return dict(REFERENCE_UNET_CONFIGS[arch]), encoders


def model_configs(cfg, arch: str):
    """(unet config, [text encoder configs], source) without weights: the builtin model's, a local diffusers
    folder's (the model or model.config_dir), else the released architecture of the family."""
    path = str(cfg.model.path)
    if path in BUILTIN_MODELS:
        from sdtrain.models.tiny import tiny_configs

        return (*tiny_configs(BUILTIN_MODELS[path]), "builtin")
    folder = Path(path) if Path(path).is_dir() else (Path(cfg.model.config_dir) if cfg.model.config_dir else None)
    if folder is None or not (folder / "unet" / "config.json").is_file():
        return (*reference_configs(arch), "reference")
    from transformers import CLIPTextConfig

    unet = json.loads((folder / "unet" / "config.json").read_text())
    encoders = [CLIPTextConfig.from_pretrained(folder / name) for name in ("text_encoder", "text_encoder_2")
                if (folder / name / "config.json").is_file()]
    return unet, encoders, "local"


@dataclass
class TrainingPlan:
    arch: str
    dataset: ScannedDataset
    batch_size: int
    processes: int
    accumulation: int
    batches_per_epoch: int
    total_steps: int
    epochs: float
    seed: int = 0
    network_report: str | None = None
    trainable_params: int | None = None
    block_lines: list[str] = field(default_factory=list)  # what each [[network.blocks]] entry matched
    warnings: list[str] = field(default_factory=list)
    validation: list = field(default_factory=list)  # held-out ImageRecords (sdtrain.train.validation)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.processes

    @property
    def effective_batch(self) -> int:
        return self.global_batch_size * self.accumulation

    @property
    def batches_per_step(self) -> int:
        return self.accumulation

    @property
    def steps_per_epoch(self) -> float:
        return self.batches_per_epoch / self.batches_per_step

    def global_batch_index(self, global_step: int, accumulation_index: int = 0) -> int:
        return global_step * self.accumulation + accumulation_index

    def position(self, global_step: int, accumulation_index: int = 0) -> tuple[int, int]:
        """(epoch, batch index) of the global batch trained at this step and accumulation index."""
        return locate_step(self.dataset.records, self.global_batch_size, self.seed,
                           self.global_batch_index(global_step, accumulation_index))


def total_steps_for(cfg, batches_per_epoch: int, batches_per_step: int) -> int:
    by_epochs = math.ceil(cfg.train.epochs * batches_per_epoch / batches_per_step) if cfg.train.epochs else None
    limits = [s for s in (cfg.train.max_steps, by_epochs) if s]
    return min(limits)


def make_plan(cfg, processes: int = 1, with_network: bool = True) -> TrainingPlan:
    """Scan the data and work out steps and the network, without loading model weights."""
    arch = detect_arch(cfg)
    dataset, validation = validation_split(cfg, scan_dataset(subset_specs(cfg), bucketing_for(cfg, arch)))
    per_epoch = steps_per_epoch(dataset.records, cfg.train.batch_size * processes, cfg.train.seed)
    batches_per_step = cfg.train.gradient_accumulation_steps
    total = total_steps_for(cfg, per_epoch, batches_per_step)
    plan = TrainingPlan(arch=arch, dataset=dataset, batch_size=cfg.train.batch_size, processes=processes,
                        accumulation=cfg.train.gradient_accumulation_steps, batches_per_epoch=per_epoch,
                        total_steps=total, epochs=total * batches_per_step / per_epoch, seed=cfg.train.seed,
                        validation=validation)
    if with_network:
        from sdtrain.adapters.inject import NetworkSpec, count_trainable_params, plan_injection, plan_report

        unet_config, encoder_configs, source = model_configs(cfg, arch)
        spec = NetworkSpec.from_config(cfg.network)
        injection = plan_injection(unet_config, encoder_configs, arch, spec)
        plan.network_report = plan_report(injection, spec)
        plan.trainable_params = count_trainable_params(injection, spec)
        plan.warnings.extend(injection.warnings)
        from sdtrain.train.blocks import describe_blocks

        opt = cfg.optimizer
        plan.block_lines = describe_blocks(injection, spec, {"unet": opt.unet_lr, "te1": opt.text_encoder_lr,
                                                             "te2": opt.text_encoder_2_lr})
        if source == "reference":
            plan.warnings.append(f"adapted modules counted on the released {arch} architecture (no local config "
                                 f"for {cfg.model.path}); set model.config_dir to a local diffusers folder if the "
                                 "model differs")
    return plan


def describe_plan(plan: TrainingPlan, cfg) -> str:
    lines = [f"model: {cfg.model.path} ({plan.arch})", "", "data:", plan.dataset.summary(), ""]
    lines.append(f"batch: {plan.batch_size} per device x {plan.processes} process(es) x {plan.accumulation} "
                 f"accumulation = {plan.effective_batch} images per optimizer step")
    lines.append(f"steps: {plan.batches_per_epoch} batches of {plan.global_batch_size} per epoch = {plan.steps_per_epoch:g} optimizer steps "
                 f"per epoch; {plan.total_steps} steps in total ({plan.epochs:.2f} epochs)")
    masked = sum(r.mask is not None for r in plan.dataset.records)
    if masked:
        how = ("each image's loss is averaged over its mask" if cfg.train.normalize_masked_loss else
               "loss x mask averaged over the whole image, as kohya (train.normalize_masked_loss = false)")
        lines.append(f"loss masks: {masked} of {len(plan.dataset.records)} images; {how}")
    if plan.validation:
        lines.append(describe_validation(cfg, plan.validation)
                     + (f"; {len(cfg.validation.prompts)} prompts rendered each time" if cfg.validation.prompts else ""))
    if cfg.ema.enabled:
        lines.append(f"EMA of the adapter weights: decay {cfg.ema.decay:g}, updated every {cfg.ema.every_n_steps} "
                     f"steps after step {cfg.ema.start_step}" + (", used for samples" if cfg.ema.use_for_samples else "")
                     + f"; saved as {cfg.train.output_name}-ema.safetensors")
    epochs = cfg.sample.every_n_epochs
    when = [label for label, on in (("before the first step", cfg.sample.at_start),
                                    (f"every {cfg.sample.every_n_steps} steps", cfg.sample.every_n_steps),
                                    ("every epoch" if epochs == 1 else f"every {epochs} epochs", epochs)) if on]
    if when and cfg.sample.prompts:
        lines.append(f"samples: {len(cfg.sample.prompts)} prompts {', '.join(when)}")
    lines.append("logs: loss_log.csv" + (f"; trackers {', '.join(cfg.log.trackers)} in {cfg.log.log_dir}"
                                         if cfg.log.trackers else ""))
    lines.append(f"network: {cfg.network.type} rank {cfg.network.rank} alpha {cfg.network.alpha:g}, "
                 f"preset {cfg.network.preset}, axis {cfg.network.decompose_axis}")
    n = cfg.network
    if n.dropout or n.rank_dropout or n.module_dropout:
        lines.append(f"adapter dropout (training steps only): network {n.dropout:g}, rank {n.rank_dropout:g}, "
                     f"module {n.module_dropout:g}")
    if plan.network_report:
        lines.append(plan.network_report)
    lines.extend(plan.block_lines)
    lines.append(f"loading: {cfg.data.num_workers} data loader worker process(es); UNet "
                 + ("under torch.compile (the first steps compile it)" if cfg.train.compile else "eager"))
    from sdtrain.train.space import output_size

    size = output_size(cfg, plan)
    if size is not None:
        lines.append(f"disk: about {size.total / 2**20:.1f} MiB in {cfg.train.output_dir} ({size.adapters} adapter "
                     f"file(s), {size.states} training state(s) at once)")
    lines.extend(training_lines(cfg))
    lines.extend(f"warning: {w}" for w in plan.warnings)
    return "\n".join(lines)


def training_lines(cfg) -> list[str]:
    """The noise, timestep, loss-weight and text settings of a run, as the plan shows them."""
    from sdtrain.train.loss_weights import prediction_notes

    t = cfg.train
    noise = [f"offset {t.noise_offset:g}"] if t.noise_offset else []
    if t.multires_noise_iterations:
        noise.append(f"multires {t.multires_noise_iterations} levels x discount {t.multires_noise_discount:g}")
    if t.ip_noise_gamma:
        noise.append(f"input perturbation gamma {t.ip_noise_gamma:g}")
    if t.zero_terminal_snr:
        noise.append("zero-terminal SNR schedule")
    draw = ("uniform" if t.timestep_sampling == "uniform"
            else f"logit-normal (mean {t.logit_mean:g}, std {t.logit_std:g})")
    if t.timestep_shift != 1.0:
        draw += f", shift {t.timestep_shift:g}"
    weights = [f"min-SNR gamma {t.min_snr_gamma:g}"] if t.min_snr_gamma else []
    if t.scale_v_pred_loss_like_noise_pred:
        weights.append("v-prediction scaled like noise prediction")
    if t.debiased_estimation_loss:
        weights.append("debiased estimation")
    if t.prior_loss_weight != 1.0:
        weights.append(f"regularisation images x {t.prior_loss_weight:g}")
    lines = [f"noise: {', '.join(noise) or 'plain gaussian'}; timesteps: {draw} in [{t.min_timestep}, "
             f"{t.max_timestep})",
             f"loss: {t.loss}, weights: {', '.join(weights) or 'none'}",
             f"text: up to {cfg.model.max_token_length} tokens per caption and prompt, clip skip {cfg.model.clip_skip}"]
    for index, subset in enumerate(cfg.data.subsets):
        parts = [f'prefix "{subset.caption_prefix}"'] if subset.caption_prefix else []
        if subset.caption_suffix:
            parts.append(f'suffix "{subset.caption_suffix}"')
        if subset.wildcards:
            parts.append("wildcards")
        if parts:
            lines.append(f"  subset {index} captions: {', '.join(parts)}")
    if cfg.model.prediction_type == "epsilon":
        lines.extend(f"warning: {note}" for note in prediction_notes(
            "epsilon", zero_terminal_snr=t.zero_terminal_snr, debiased_estimation=t.debiased_estimation_loss,
            scale_v_pred_loss_like_noise_pred=t.scale_v_pred_loss_like_noise_pred))
    return lines
