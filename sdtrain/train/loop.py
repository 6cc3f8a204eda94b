"""The training loop: config in, trained adapter files out.

Order of work: plan (data scan, steps, network; no weights) → accelerator → base model → adapters →
latent / text-encoder caches → optimizer and LR schedule → (resume) → steps → saves, samples, logs →
final save and the loaders' `verify` summary.

Randomness that decides what a step computes is a pure function of the run's seed and the step's place:
noise and timesteps from a generator seeded by (seed, global batch index), flips and caption augmentation
from (seed, epoch, batch, slot). A resumed run therefore computes exactly the steps an uninterrupted run
would have (see `sdtrain.train.state`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdtrain.errors import UserError
from sdtrain.train.plan import TrainingPlan, describe_plan, make_plan

log = logging.getLogger("sdtrain")


class TrainingDiverged(UserError):
    """The loss or the adapter weights became NaN/inf."""


@dataclass
class TrainResult:
    final_adapter: Path | None
    saved: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # one per optimizer step, from the resumed step on
    samples: list[Path] = field(default_factory=list)
    seen: list = field(default_factory=list)  # (epoch, [record index, ...]) per batch this process trained
    verify_summary: str = ""
    verify_report: object = None
    steps: int = 0


def make_accelerator(cfg):
    """accelerate's Accelerator for this run: CPU (gloo) when there is no GPU, mixed precision from the config."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    on_cpu = not torch.cuda.is_available()
    precision = cfg.train.mixed_precision
    if on_cpu and precision == "fp16":
        log.warning("train.mixed_precision = 'fp16' needs a GPU; training in fp32 on the CPU")
        precision = "no"
    from accelerate.state import AcceleratorState

    # accelerate keeps one AcceleratorState per process; a second run in the same process (a script training
    # LoRA then DoRA, a test) may use another precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    project = ProjectConfiguration(project_dir=str(cfg.train.output_dir), logging_dir=str(cfg.log.log_dir))
    log_with = "tensorboard" if cfg.log.tensorboard else None
    accelerator = Accelerator(mixed_precision=precision, cpu=on_cpu, log_with=log_with, project_config=project)
    check_distributed(accelerator)
    return accelerator


class DistributedSetupError(UserError):
    """Launched as several processes, but they do not form one process group."""


def check_distributed(accelerator, environ=None) -> None:
    """Fail loudly when a launcher started several processes that accelerate does not connect: they would
    each train their own copy with no gradient sync."""
    import os

    environ = os.environ if environ is None else environ
    launched = int(environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and accelerator.num_processes != launched:
        raise DistributedSetupError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but this process trains alone "
            f"(accelerate sees {accelerator.num_processes} process, distributed type "
            f"{accelerator.distributed_type}); the copies would train separately with no gradient sync. "
            "Launch with `accelerate launch --multi_gpu --num_processes N -m sdtrain train CONFIG` on GPUs, or "
            "`torchrun --nproc_per_node N -m sdtrain train CONFIG` (CPU: gloo), and do not set CUDA_VISIBLE_DEVICES "
            "to hide the GPUs from some processes")


def weight_dtype_for(accelerator) -> torch.dtype:
    """dtype of the frozen base weights: half precision with mixed precision on a GPU, else fp32."""
    if accelerator.device.type != "cuda":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def cast_frozen(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast frozen parameters to `dtype`; trainable (adapter) parameters stay fp32."""
    for param in module.parameters():
        if not param.requires_grad and param.is_floating_point():
            param.data = param.data.to(dtype)


class Trainer:
    """One training run. `run()` trains; the pieces are methods so resume and tests can reach them."""

    def __init__(self, cfg, *, resume: str | None = None, init_from: str | None = None, quiet: bool = False):
        self.cfg = cfg
        self.resume = resume
        self.init_from = init_from
        self.quiet = quiet
        self.accelerator = make_accelerator(cfg)
        self.plan: TrainingPlan = make_plan(cfg, processes=self.accelerator.num_processes)
        self.output_dir = Path(cfg.train.output_dir)
        self.global_step = 0
        self.result = TrainResult(final_adapter=None)
        self.last_save: Path | None = None

    # ------------------------------------------------------------------ setup

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, text: str) -> None:
        if self.is_main and not self.quiet:
            print(text, flush=True)

    def setup(self) -> None:
        from sdtrain.adapters.inject import NetworkSpec, inject_adapters
        from sdtrain.config import resolved_config_path, write_resolved_config
        from sdtrain.models.loading import load_base

        cfg, accelerator = self.cfg, self.accelerator
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_resolved_config(cfg, resolved_config_path(cfg))
        self.base = load_base(cfg.model.path, arch=cfg.model.arch, vae=cfg.model.vae, config_dir=cfg.model.config_dir,
                              prediction_type=cfg.model.prediction_type, allow_pickle=cfg.model.allow_pickle)
        base = self.base
        if base.arch != self.plan.arch:  # the plan guessed the family from the name of a hub model
            import dataclasses

            self.say(f"note: {cfg.model.path} is {base.arch}, not {self.plan.arch} as guessed from its name; "
                     "re-planning (set model.arch to skip the guess)")
            self.cfg = cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch=base.arch))
            self.plan = make_plan(cfg, processes=accelerator.num_processes)
        self.arch = base.arch
        self.spec = NetworkSpec.from_config(cfg.network)
        if self.init_from:
            from sdtrain.export.adapter_file import adapters_from_file, load_adapter

            self.adapters, report = adapters_from_file(load_adapter(self.init_from), base.unet, base.text_encoders,
                                                       base.arch, strict=False, detach_norm=self.spec.detach_norm)
            file_spec = self.adapters.spec
            changed = [f"{key} {getattr(self.spec, key)!r} -> {getattr(file_spec, key)!r}"
                       for key in ("type", "rank", "alpha", "decompose_axis", "train_text_encoder")
                       if getattr(self.spec, key) != getattr(file_spec, key)]
            self.spec = file_spec
            self.say(f"initialised from {self.init_from}: {len(report.restored)} modules, fresh optimizer state"
                     + (f"; the file's network replaces the config's ({', '.join(changed)})" if changed else ""))
            if report.unknown_in_network:
                self.say(f"warning: {len(report.unknown_in_network)} modules of {self.init_from} have no layer in "
                         f"this model and were skipped (e.g. {report.unknown_in_network[0]})")
        else:
            self.adapters = inject_adapters(base.unet, base.text_encoders, base.arch, self.spec)
        if self.adapters.report() != self.plan.network_report:  # the model or the file differs from the plan
            self.say(self.adapters.report())
        for warning in self.adapters.warnings:
            self.say(f"warning: {warning}")

        device, dtype = accelerator.device, weight_dtype_for(accelerator)
        self.weight_dtype = dtype
        self.train_te = self.spec.train_text_encoder and any(g != "unet" for g in self.adapters.groups.values())
        for module in [base.unet, *base.text_encoders]:
            cast_frozen(module, dtype)
            module.to(device)
        vae_dtype = torch.float32 if (dtype == torch.float16 or base.vae.config.get("force_upcast", False)) else dtype
        base.vae.requires_grad_(False).to(device)
        if base.vae.dtype != vae_dtype:
            base.vae.to(dtype=vae_dtype)
        if cfg.train.attention == "sdpa":
            from diffusers.models.attention_processor import AttnProcessor2_0

            base.unet.set_attn_processor(AttnProcessor2_0())
        if cfg.train.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
            if self.train_te:
                for encoder in base.text_encoders:
                    encoder.gradient_checkpointing_enable()
        base.unet.train()
        for encoder in base.text_encoders:
            encoder.train(self.train_te)

        self._setup_caches()
        self._setup_optimizer()

    def _setup_caches(self) -> None:
        from sdtrain.data.cache import LatentCache, TextEncoderCache, text_encoder_fingerprint, vae_fingerprint
        from sdtrain.data.dataset import captions_to_cache, latent_items, latent_pixels
        from sdtrain.train.batches import encode_pixels

        cfg, accelerator, base = self.cfg, self.accelerator, self.base
        cache_dir = Path(cfg.data.cache_dir)
        self.latent_cache = None
        self.vae_encodes = 0
        if cfg.data.cache_latents:
            cache = LatentCache(cache_dir / "latents", vae_fingerprint(base.vae))
            items = latent_items(self.plan.dataset)
            mine = items[accelerator.process_index::accelerator.num_processes]  # a fixed split: no races

            def encode(chunk):
                self.vae_encodes += len(chunk)
                return encode_pixels(base.vae, torch.stack([latent_pixels(item) for item in chunk])).cpu()

            encoded = cache.ensure(mine, encode, batch_size=max(1, cfg.train.batch_size))
            accelerator.wait_for_everyone()
            if accelerator.num_processes > 1:
                encoded = int(accelerator.reduce(torch.tensor(encoded, device=accelerator.device), reduction="sum"))
            self.say(f"latent cache: {len(items)} latents, {encoded} encoded now"
                     + (" (all others reused)" if encoded < len(items) else ""))
            self.latent_cache = cache
        self.text_cache = None
        if cfg.data.cache_text_encoder_outputs and not self.train_te:
            cache = TextEncoderCache(cache_dir / "text", text_encoder_fingerprint(*base.text_encoders,
                                                                                 extra=f"clip_skip={cfg.model.clip_skip}"))
            captions = captions_to_cache(self.plan.dataset)
            mine = captions[accelerator.process_index::accelerator.num_processes]
            cache.ensure(mine, self._encode_for_cache)
            accelerator.wait_for_everyone()
            self.text_cache = cache

    def _encode_for_cache(self, captions: list[str]) -> dict[str, torch.Tensor]:
        cond = self.encode_text(captions)
        out = {"prompt_embeds": cond.prompt_embeds.float().cpu()}
        if cond.pooled_embeds is not None:
            out["pooled_embeds"] = cond.pooled_embeds.float().cpu()
        return out

    def _setup_optimizer(self) -> None:
        from sdtrain.train.optim import build_lr_scheduler, build_optimizer

        cfg = self.cfg
        # per-group rates; the config resolver already filled unset ones from optimizer.lr
        lrs = {"unet": cfg.optimizer.unet_lr, "te1": cfg.optimizer.text_encoder_lr,
               "te2": cfg.optimizer.text_encoder_2_lr}
        groups = self.adapters.param_groups(lrs)
        self.trainable_params = [param for group in groups for param in group["params"]]  # clipped every step
        optimizer = build_optimizer(groups, cfg.optimizer.type, cfg.optimizer.lr, cfg.optimizer.weight_decay,
                                    cfg.optimizer.betas, cfg.optimizer.eps, cfg.optimizer.args)
        self.lr_scheduler = build_lr_scheduler(optimizer, cfg.scheduler.type, cfg.scheduler.warmup_steps,
                                               self.plan.total_steps, cfg.scheduler.num_cycles, cfg.scheduler.power)
        models = [self.base.unet] + (list(self.base.text_encoders) if self.train_te else [])
        prepared = self.accelerator.prepare(*models, optimizer)
        self.models = list(prepared[:-1])
        self.optimizer = prepared[-1]
        self.unet = self.models[0]
        from sdtrain.train.state import install_hooks

        install_hooks(self)

    # ------------------------------------------------------------------ one step

    def encode_text(self, captions: list[str]):
        from sdtrain.train.conditioning import encode_prompts

        base = self.base
        with torch.set_grad_enabled(self.train_te and torch.is_grad_enabled()):
            with self.accelerator.autocast():
                return encode_prompts(base.arch, base.tokenizers, base.text_encoders, captions,
                                      clip_skip=self.cfg.model.clip_skip)

    def conditioning(self, captions: list[str]):
        from sdtrain.train.conditioning import Conditioning

        if self.text_cache is None:
            return self.encode_text(captions)
        entries = [self.text_cache.load(c) for c in captions]
        device = self.accelerator.device
        embeds = torch.stack([e["prompt_embeds"] for e in entries]).to(device)
        pooled = torch.stack([e["pooled_embeds"] for e in entries]).to(device) if "pooled_embeds" in entries[0] else None
        return Conditioning(embeds, pooled)

    def sample_generator(self, global_batch: int, slot: int) -> torch.Generator:
        """The generator of one sample's noise and timestep: seeded by its place in the global batch stream,
        so the draw does not depend on the process count, the per-device batch size or on resuming."""
        return torch.Generator("cpu").manual_seed((self.cfg.train.seed * 1_000_003 + global_batch) * 4099 + slot)

    def process_slice(self, keys: list) -> tuple[list, int]:
        """This process's share of a global batch and the slot of its first sample: contiguous slices of
        near-equal size (a bucket's short last batch with fewer samples than processes repeats its samples so
        that no process idles)."""
        processes, rank = self.plan.processes, self.accelerator.process_index
        if processes == 1:
            return keys, 0
        if len(keys) < processes:
            keys = (keys * processes)[:processes]
        base, extra = divmod(len(keys), processes)
        start = rank * base + min(rank, extra)
        return keys[start:start + base + (1 if rank < extra else 0)], start

    def micro_step_loss(self, global_batch: int, keys, slot_offset: int = 0) -> torch.Tensor:
        """Loss of this process's slice of one global batch (not yet divided by the accumulation count)."""
        from sdtrain.train.batches import load_batch
        from sdtrain.train.conditioning import unet_added_cond_kwargs
        from sdtrain.train.loss import (compute_snr, diffusion_loss, min_snr_weights, prediction_type_of,
                                        sample_noise, sample_timesteps, training_target)

        cfg, base, device = self.cfg, self.base, self.accelerator.device
        batch = load_batch(self.plan.dataset, keys, cfg.train.seed, latent_cache=self.latent_cache,
                           vae=base.vae if self.latent_cache is None else None)
        if self.latent_cache is None:
            self.vae_encodes += len(keys)
        latents = batch.latents.to(device)
        scheduler = base.noise_scheduler
        noises, timesteps = [], []
        for i in range(latents.shape[0]):
            generator = self.sample_generator(global_batch, slot_offset + i)
            noises.append(sample_noise(latents[i:i + 1], generator, cfg.train.noise_offset))
            timesteps.append(sample_timesteps(1, generator, cfg.train.min_timestep, cfg.train.max_timestep,
                                              scheduler.config.num_train_timesteps, device=device))
        noise, timesteps = torch.cat(noises), torch.cat(timesteps)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction_type = prediction_type_of(scheduler, base.prediction_type)
        target = training_target(scheduler, latents, noise, timesteps, prediction_type)
        cond = self.conditioning(batch.captions)
        added = unet_added_cond_kwargs(cond, batch.time_ids.to(device)) if base.arch == "sdxl" else None
        with self.accelerator.autocast():
            pred = self.unet(noisy.to(self.weight_dtype), timesteps, encoder_hidden_states=cond.prompt_embeds,
                             added_cond_kwargs=added).sample
        weights = None
        if cfg.train.min_snr_gamma:
            weights = min_snr_weights(compute_snr(scheduler, timesteps), cfg.train.min_snr_gamma, prediction_type)
        return diffusion_loss(pred, target, cfg.train.loss, cfg.train.huber_c, weights)

    def optimizer_step(self, step: int) -> float:
        """One optimizer step over `accumulation` global batches; returns the mean loss over processes."""
        plan, accelerator = self.plan, self.accelerator
        total = 0.0
        for a in range(plan.accumulation):
            global_batch = plan.global_batch_index(step, a)
            epoch, index = plan.position(step, a)
            keys, slot_offset = self.process_slice(self.epoch_batches(epoch)[index])
            self.result.seen.append((epoch, [key.record for key in keys]))
            last = a == plan.accumulation - 1
            context = accelerator.no_sync(self.unet) if not last and plan.processes > 1 else contextlib.nullcontext()
            with context:
                loss = self.micro_step_loss(global_batch, keys, slot_offset)
                self.check_finite(loss, step)
                accelerator.backward(loss / plan.accumulation)
            total += loss.detach().float().item()
        grad_norm = None
        if self.cfg.train.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(self.trainable_params, self.cfg.train.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_grad_norm = float(grad_norm) if grad_norm is not None else None
        mean = total / plan.accumulation
        if plan.processes > 1:
            mean = accelerator.reduce(torch.tensor(mean, device=accelerator.device), reduction="mean").item()
        return mean

    def epoch_batches(self, epoch: int):
        from sdtrain.data.dataset import PlannedBatches

        cache = getattr(self, "_epoch_cache", None)
        if cache is None or cache[0] != epoch:
            batches = list(PlannedBatches(self.plan.dataset.records, self.plan.global_batch_size, self.cfg.train.seed,
                                          epoch))
            self._epoch_cache = cache = (epoch, batches)
        return cache[1]

    def check_finite(self, loss: torch.Tensor, step: int) -> None:
        if torch.isfinite(loss).all():
            return
        bad = [group for group in dict.fromkeys(self.adapters.groups.values())
               if any(not torch.isfinite(p).all() for p in self.adapters.parameters(group))]
        where = f"parameter group(s) {', '.join(bad)} hold NaN/inf" if bad else \
            "all parameter groups are finite; the loss itself overflowed (lower optimizer.lr, or use bf16/fp32)"
        last = f"the last good save is {self.last_save}" if self.last_save else "no adapter was saved yet"
        raise TrainingDiverged(f"loss is {loss.item()} at step {step + 1}: {where}; {last}")

    # ------------------------------------------------------------------ saving, sampling, logging

    def adapter_path(self, step: int | None) -> Path:
        name = self.cfg.train.output_name
        return self.output_dir / (f"{name}.safetensors" if step is None else f"{name}-step{step:06d}.safetensors")

    def metadata(self, step: int) -> dict[str, str]:
        from sdtrain.config import config_to_dict
        from sdtrain.export.metadata import build_metadata

        records = self.plan.dataset.records
        tags: dict[str, int] = {}
        for record in records:
            for tag in record.caption.split(","):
                if tag.strip():
                    tags[tag.strip()] = tags.get(tag.strip(), 0) + 1
        return build_metadata(
            arch=self.arch, spec=self.spec, output_name=self.cfg.train.output_name,
            tag_frequency={"dataset": tags}, resolution=self.plan.dataset.bucketing.resolution,
            num_train_images=sum(r.repeats for r in records if not r.is_reg), steps=step,
            epoch=int(step * self.plan.batches_per_step // max(1, self.plan.batches_per_epoch)),
            max_steps=self.plan.total_steps, started_at=self.started, finished_at=time.time(),
            base_model_name=str(self.cfg.model.path),
            prediction_type=self.base.prediction_type, config=config_to_dict(self.cfg))

    def save_adapter(self, step: int, final: bool = False) -> Path | None:
        from sdtrain.export.adapter_file import save_adapter

        self.accelerator.wait_for_everyone()
        if not self.is_main:
            return None
        path = self.adapter_path(None if final else step)
        save_adapter(self.adapters, path, dtype=self.cfg.save.dtype, metadata=self.metadata(step),
                     target=self.cfg.save.target)
        self.last_save = path
        self.result.saved.append(path)
        if not final and self.cfg.save.keep_last:
            intermediates = sorted(self.output_dir.glob(f"{self.cfg.train.output_name}-step*.safetensors"))
            for old in intermediates[:-self.cfg.save.keep_last]:
                old.unlink(missing_ok=True)
        return path

    def sample(self, step: int) -> None:
        from sdtrain.config import parse_prompt_line
        from sdtrain.train.sampling import sample_images

        self.accelerator.wait_for_everyone()
        if not self.is_main or not self.cfg.sample.prompts:
            return
        from sdtrain.train.plan import resolution_of

        cfg, base = self.cfg, self.base
        width, height = resolution_of(cfg, self.arch)
        defaults = {"steps": cfg.sample.steps, "cfg": cfg.sample.cfg_scale, "seed": cfg.sample.seed,
                    "width": width, "height": height}
        prompts = []
        for line in cfg.sample.prompts:  # a prompt line's own --w --h --d --l --s win over the defaults
            given = {k: v for k, v in parse_prompt_line(line).items() if v is not None}
            prompts.append({k: v for k, v in {**defaults, **given}.items() if v is not None})
        unet = self.accelerator.unwrap_model(self.unet)
        with self.accelerator.autocast():
            paths = sample_images(base.arch, unet=unet, vae=base.vae, text_encoders=base.text_encoders,
                                  tokenizers=base.tokenizers, scheduler_config=base.noise_scheduler.config,
                                  prompts=prompts, sampler=cfg.sample.sampler, out_dir=self.output_dir / "samples",
                                  step=step, clip_skip=cfg.model.clip_skip)
        self.result.samples.extend(paths)

    def verify_final(self, path: Path) -> str:
        if self.cfg.save.targets == [] or not self.is_main:
            return ""
        from sdtrain.export.verify import verify_saved_adapter

        report = verify_saved_adapter(path, self.adapters, targets=self.cfg.save.targets,
                                      base_label=str(self.cfg.model.path))
        self.result.verify_report = report
        return report.format() if hasattr(report, "format") else str(report)

    # ------------------------------------------------------------------ the run

    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg, accelerator, plan = self.cfg, self.accelerator, self.plan
        self.started = time.time()
        if not getattr(self, "adapters", None):
            self.setup()
        if self.resume:
            from sdtrain.train.state import load_training_state

            self.global_step = load_training_state(self, self.resume)
            self.say(f"resumed at step {self.global_step}")
        self.loss_log = LossLog(self.output_dir / "loss_log.csv", keep_until=self.global_step, enabled=self.is_main)
        if cfg.log.tensorboard:
            accelerator.init_trackers("sdtrain")
        bar = tqdm(total=plan.total_steps, initial=self.global_step, disable=not self.is_main or self.quiet,
                   desc="training", dynamic_ncols=True)
        per_epoch = plan.steps_per_epoch
        try:
            while self.global_step < plan.total_steps:
                step = self.global_step
                loss = self.optimizer_step(step)
                self.global_step = step + 1
                self.result.losses.append(loss)
                lr = self.lr_scheduler.get_last_lr()[0]
                self.loss_log.write(self.global_step, loss, lr)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                if cfg.log.tensorboard and self.global_step % cfg.log.log_every_n_steps == 0:
                    values = {"loss": loss, "lr": lr}
                    if self.last_grad_norm is not None:
                        values["grad_norm"] = self.last_grad_norm
                    accelerator.log(values, step=self.global_step)
                self.after_step(per_epoch)
        except KeyboardInterrupt:
            bar.close()
            self.on_interrupt()
            raise
        bar.close()
        self.check_replicas_agree()
        final = self.save_adapter(self.global_step, final=True)
        self.result.final_adapter = final
        self.result.steps = self.global_step
        skipped = self.plan.dataset.skipped
        if skipped:
            self.say(f"skipped {len(skipped)} unreadable files (not trained on):\n"
                     + "\n".join(f"  {s.path}: {s.reason}" for s in skipped))
        if final is not None:
            self.say(f"saved {final}")
            summary = self.verify_final(final)
            if summary:
                self.say(summary)
            self.result.verify_summary = summary
        if cfg.log.tensorboard:
            accelerator.end_training()
        return self.result

    def check_replicas_agree(self) -> None:
        """With several processes, every process must hold the same adapter weights at the end."""
        if self.plan.processes == 1:
            return
        with torch.no_grad():
            digest = torch.stack([p.detach().double().sum() for p in self.adapters.parameters()]).sum()
            digest = digest.reshape(1).to(self.accelerator.device)
            every = self.accelerator.gather(digest).cpu()
        if not torch.equal(every, every[:1].expand_as(every)):
            raise DistributedSetupError(f"the processes ended with different adapter weights (checksums "
                                        f"{every.tolist()}): gradients were not synchronised")
        self.say(f"all {self.plan.processes} processes hold identical adapter weights (checksum {every[0]:.10g})")

    def after_step(self, steps_per_epoch: float) -> None:
        cfg, step = self.cfg, self.global_step
        done = step >= self.plan.total_steps
        if cfg.save.every_n_steps and step % cfg.save.every_n_steps == 0 and not done:
            self.save_adapter(step)
        if cfg.save.every_n_epochs and not done:
            epoch_before = math.floor((step - 1) / steps_per_epoch)
            if math.floor(step / steps_per_epoch) > epoch_before and (epoch_before + 1) % cfg.save.every_n_epochs == 0:
                self.save_adapter(step)
        if cfg.sample.every_n_steps and step % cfg.sample.every_n_steps == 0:
            self.sample(step)
        if cfg.save.state_every_n_steps and (step % cfg.save.state_every_n_steps == 0 or done):
            from sdtrain.train.state import save_training_state

            save_training_state(self)

    def on_interrupt(self) -> None:
        """Ctrl+C: save a resumable state (when states are on) and the adapter so far."""
        if self.global_step == 0:
            return
        if self.cfg.save.state_every_n_steps:
            from sdtrain.train.state import save_training_state

            path = save_training_state(self)
            self.say(f"interrupted at step {self.global_step}; state saved to {path} (resume with --resume latest)")
        saved = self.save_adapter(self.global_step)
        self.say(f"adapter so far saved to {saved}")


class LossLog:
    """`loss_log.csv`: step, loss, learning rate per optimizer step; a resumed run keeps the rows up to its
    start step and continues the file, so an interrupted and resumed run leaves the same log as a straight one."""

    def __init__(self, path: Path, keep_until: int = 0, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if keep_until and path.is_file():
            kept = [line for line in path.read_text().splitlines()[1:] if int(line.split(",")[0]) <= keep_until]
        path.write_text("step,loss,lr\n" + "".join(line + "\n" for line in kept))

    def write(self, step: int, loss: float, lr: float) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(f"{step},{loss!r},{lr!r}\n")


def train(cfg, *, dry_run: bool = False, resume: str | None = None, init_from: str | None = None,
          quiet: bool = False) -> TrainResult | TrainingPlan:
    """Run (or, with dry_run, only plan and describe) a training run."""
    if dry_run:
        plan = make_plan(cfg)
        print(describe_plan(plan, cfg))
        return plan
    trainer = Trainer(cfg, resume=resume, init_from=init_from, quiet=quiet)
    trainer.say(describe_plan(trainer.plan, cfg))
    return trainer.run()
