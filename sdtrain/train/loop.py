"""The training loop: config in, trained adapter files out.

`Trainer` builds its components one `_setup_*` method each, in this order: plan (data scan, steps, network;
no weights) → accelerator → resume check (a state that cannot be resumed fails here, before any weights
load) → base model (re-planned when it is another family than its name suggested) → frozen weights cast and
placed → adapters (injected, or from an --init-from file) → latent / text-encoder caches → optimizer →
restored state → LR schedule. Then the steps, with saves, samples, logs and states between them, and at the
end the final adapter, a final training state and the loaders' `verify` summary.

Randomness that decides what a step computes is a pure function of the run's seed and the step's place:
noise and timesteps from a generator seeded by (seed, global batch index), flips and caption augmentation
from (seed, epoch, batch, slot), the adapters' initial weights from the seed. A resumed run therefore
computes exactly the steps an uninterrupted run would have (see `sdtrain.train.state`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdtrain.export.file_checks import SaveDtypeOverflow
from sdtrain.train.accelerator import DistributedSetupError, make_accelerator, weight_dtype_for
from sdtrain.train.divergence import TrainingDiverged, check_before_save, last_finite
from sdtrain.train.interrupt import StopRequest, TrainingInterrupted
from sdtrain.train.logs import PendingSteps
from sdtrain.train.plan import TrainingPlan, describe_plan, make_plan


@dataclass
class TrainResult:
    final_adapter: Path | None
    saved: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # one per optimizer step, from the resumed step on (filled
    # at each log, save and stop: see Trainer.check_diverged)
    samples: list[Path] = field(default_factory=list)
    verify_summary: str = ""
    verify_report: object = None
    steps: int = 0
    state: Path | None = None  # the newest training state written
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss) of this run


class TrainerCallback:
    """Hooks for scripts and tests: pass instances as `Trainer(..., callbacks=[...])`; override what you need."""

    def on_batch(self, trainer: Trainer, epoch: int, keys: list) -> None:
        """Before a micro-batch trains: its epoch and this process's sample keys (`key.record` is the image)."""

    def on_step_end(self, trainer: Trainer, step: int, loss: torch.Tensor) -> None:
        """After optimizer step `step` (counted from 1) and the saves and samples that follow it. `loss` is this
        process's mean loss of the step, a 0-dim tensor on the device: reading its value (`float(loss)`) makes
        the host wait for the device (the trainer itself reads losses only every log.log_every_n_steps)."""


class Trainer:
    """One training run. `run()` trains; `setup()` alone builds the components (loads the model)."""

    def __init__(self, cfg, *, resume: str | None = None, init_from: str | None = None, quiet: bool = False,
                 callbacks=(), continue_command: str | None = None):
        self.cfg = cfg
        self.resume = resume
        self.init_from = init_from
        self.quiet = quiet
        self.callbacks = list(callbacks)
        self.continue_command = continue_command
        self.accelerator = make_accelerator(cfg)
        self.plan: TrainingPlan = make_plan(cfg, processes=self.accelerator.num_processes)
        self.output_dir = Path(cfg.train.output_dir)
        self.global_step = 0
        self.result = TrainResult(final_adapter=None)
        self.last_save: Path | None = None
        self.stop = StopRequest()
        self.base = None
        self.finished_state = None  # a resumed state already at the last step: nothing to train
        self.state_step = None  # the step of the newest state this run wrote
        self.batch_stream = None  # the data loader, from the first step on
        self.pending = PendingSteps()  # the values of the steps since the last log, on the device
        self.bar = None

    # ------------------------------------------------------------------ output

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def say(self, text: str) -> None:
        if self.is_main and not self.quiet:
            print(text, flush=True)

    def note(self, text: str) -> None:
        """One note in sdtrain's format (`note: ...` on stderr), once (main process), not with --quiet."""
        if self.is_main and not self.quiet:
            from sdtrain.console import note

            note(text)

    def resume_command(self) -> str:
        """The command that continues this run from its newest state."""
        if self.continue_command:
            return self.continue_command
        from sdtrain.config import resolved_config_path

        return f"sdtrain train {resolved_config_path(self.cfg)} --resume latest"

    # ------------------------------------------------------------------ components

    def setup(self) -> None:
        """Build every component; with `resume`, check the state first (no weights) and restore it last."""
        from sdtrain.config import resolved_config_path, write_resolved_config

        self._claim_output_dir()
        resume = self._check_resume()
        if resume and resume[1]["global_step"] >= self.plan.total_steps and self.adapter_path(None).is_file():
            self.finished_state = resume
            return
        from sdtrain.train.space import check_output_space

        check_output_space(self.cfg, self.plan)  # before any weights load
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_resolved_config(self.cfg, resolved_config_path(self.cfg))
        self.base = self._setup_base()
        self._replan(self.base.arch)
        self.arch = self.base.arch
        self.weight_dtype = self._place_base()
        self.adapters = self._setup_adapters()
        self.spec = self.adapters.spec
        self.dropout = self._setup_dropout()
        self.train_te = self.spec.train_text_encoder and any(g != "unet" for g in self.adapters.groups.values())
        self.text_encoders = list(self.base.text_encoders)
        self._setup_training_modes()
        self.latent_cache = self._setup_latent_cache()
        self.text_cache = self._setup_text_cache()
        self.validator = self._setup_validator()
        optimizer = self._setup_optimizer()
        models = [self.base.unet] + (self.text_encoders if self.train_te else [])
        *self.models, self.optimizer = self.accelerator.prepare(*models, optimizer)
        self.unet = self.models[0]
        if self.train_te:
            self.text_encoders = self.models[1:]  # through the DDP wrappers, so their gradients are all-reduced
        self.ema = self._setup_ema()
        self.global_step = self._restore_state(*resume) if resume else 0
        self.lr_scheduler = self._setup_lr_scheduler(optimizer, self.global_step)

    def _claim_output_dir(self) -> None:
        """Lock the output folder for this run (a second run into it exits 2), then remove the temporaries of
        killed writes and finish interrupted state saves (see `output_lock`, `state.recover_states`)."""
        from sdtrain.train.output_lock import (
            STALE_SHARED_SECONDS, OutputDirBusy, lock_output_dir, remove_stale_temporaries,
        )
        from sdtrain.train.state import recover_states, states_root

        busy = None
        if self.is_main:
            try:
                lock_output_dir(self.output_dir)
            except OutputDirBusy as error:
                busy = error
        if self.plan.processes > 1:
            flag = torch.tensor(float(busy is not None), device=self.accelerator.device)
            if self.accelerator.reduce(flag, reduction="sum").item() > 0 and busy is None:
                busy = OutputDirBusy(f"train.output_dir {self.output_dir} is in use by another sdtrain run")
        if busy is not None:
            raise busy
        if self.is_main:
            cache = self.cfg.data.cache_dir
            stale = remove_stale_temporaries(self.output_dir, skip=[cache])
            if cache is not None and os.path.isdir(cache):
                stale += remove_stale_temporaries(cache, older_than=STALE_SHARED_SECONDS)
            for path in stale:
                self.note(f"removed {path}, left by a write that was interrupted")
            for note in recover_states(states_root(self.output_dir)):
                self.note(note)
        self.accelerator.wait_for_everyone()

    def _check_resume(self) -> tuple[Path, dict] | None:
        """(state folder, its trainer_state) for `resume`, checked against the config and plan; no weights load."""
        if not self.resume:
            return None
        from sdtrain.train.state import check_resumable, check_state_files, find_state, read_state_info

        folder, notes = find_state(self.output_dir, self.resume)
        info = read_state_info(folder)
        check_state_files(folder)
        if self.cfg.model.arch == "auto":
            self._replan(info["arch"], quiet=True)  # the family the state's run found in the weights
        notes += check_resumable(info, self.cfg, self.plan)
        for note in notes:
            self.note(note)
        if info["global_step"] >= self.plan.total_steps:
            final = self.adapter_path(None)
            written = (f"its final adapter {final} exists" if final.is_file() else
                       f"its final adapter {final} is missing (its save failed): writing it from the state")
            self.note(f"nothing to train: the state {folder} is at step {info['global_step']} and training ends at "
                      f"step {self.plan.total_steps}; {written}; raise train.max_steps or train.epochs to train "
                      f"further (e.g. --set train.max_steps={2 * info['global_step']})")
        return folder, info

    def _setup_base(self):
        """The base model: UNet, VAE, text encoders, tokenizers and the training noise scheduler (rescaled to
        zero terminal SNR with train.zero_terminal_snr; samples are drawn with its config too)."""
        from sdtrain.models import loading
        from sdtrain.train.loss import training_noise_scheduler
        from sdtrain.train.loss_weights import prediction_notes

        model, train = self.cfg.model, self.cfg.train
        base = loading.load_base(model.path, arch=model.arch, vae=model.vae, config_dir=model.config_dir,
                                 prediction_type=model.prediction_type, allow_pickle=model.allow_pickle,
                                 revision=model.revision, variant=model.variant)
        if train.zero_terminal_snr:
            base.noise_scheduler = training_noise_scheduler(base.noise_scheduler.config, zero_terminal_snr=True)
        notes = prediction_notes(base.prediction_type, zero_terminal_snr=train.zero_terminal_snr,
                                 debiased_estimation=train.debiased_estimation_loss,
                                 scale_v_pred_loss_like_noise_pred=train.scale_v_pred_loss_like_noise_pred)
        for note in notes if model.prediction_type == "auto" else ():  # the plan showed those of an explicit type
            self.note(note)
        return base

    def _replan(self, arch: str, quiet: bool = False) -> None:
        """Plan again for `arch` when the plan guessed another family from the model's name."""
        if arch == self.plan.arch:
            return
        if not quiet:
            self.note(f"{self.cfg.model.path} is {arch}, not {self.plan.arch} as guessed from its name; "
                      "re-planning (set model.arch to skip the guess)")
        self.cfg = dataclasses.replace(self.cfg, model=dataclasses.replace(self.cfg.model, arch=arch))
        self.plan = make_plan(self.cfg, processes=self.accelerator.num_processes)

    def _place_base(self) -> torch.dtype:
        """Cast the frozen UNet and text encoders to the weight dtype (half with mixed precision on a GPU) and
        move them and the VAE to the device; returns the weight dtype. Done before the adapters are made, so
        a DoRA magnitude starts as the norm of the weights the forward pass uses."""
        base, device, dtype = self.base, self.accelerator.device, weight_dtype_for(self.accelerator)
        vae_dtype = torch.float32 if (dtype == torch.float16 or base.vae.config.get("force_upcast", False)) else dtype
        base.vae.requires_grad_(False)
        for module, wanted in [(base.unet, dtype), *((encoder, dtype) for encoder in base.text_encoders),
                               (base.vae, vae_dtype)]:
            module.to(device)
            if next(module.parameters()).dtype != wanted:  # float()/half()/bfloat16(): floating tensors only
                getattr(module, {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat16"}[wanted])()
        return dtype

    def _setup_adapters(self):
        """The adapters: from the --init-from file (its network replaces the config's), else injected fresh
        with initial weights drawn from train.seed. Trainable parameters are fp32."""
        from diffusers.training_utils import cast_training_params

        from sdtrain.adapters.inject import inject_adapters
        from sdtrain.adapters.spec import NetworkSpec

        base, spec = self.base, NetworkSpec.from_config(self.cfg.network)
        if self.init_from:
            adapters = self._adapters_from_file(spec)
        else:
            device = self.accelerator.device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(self.cfg.train.seed)
                adapters = inject_adapters(base.unet, base.text_encoders, base.arch, spec)
        cast_training_params([base.unet, *base.text_encoders], dtype=torch.float32)
        if adapters.report() != self.plan.network_report:  # the model or the file differs from the plan
            self.say(adapters.report())
        for warning in adapters.warnings:
            if warning not in self.plan.warnings:  # the plan's own were printed with it
                self.say(f"warning: {warning}")
        return adapters

    def _setup_dropout(self):
        """Network / rank / module dropout on every adapted layer, seeded from train.seed (None when all are 0:
        the layers then run their fused paths unchanged). Armed only around a micro-batch's forward and backward."""
        from sdtrain.adapters.regularize import attach_dropout

        n = self.cfg.network
        return attach_dropout(self.adapters, n.dropout, n.rank_dropout, n.module_dropout, self.cfg.train.seed)

    def _adapters_from_file(self, spec):
        from sdtrain.export.adapter_file import adapters_from_file, load_adapter

        base = self.base
        adapters, report = adapters_from_file(load_adapter(self.init_from), base.unet, base.text_encoders,
                                              base.arch, strict=False, detach_norm=spec.detach_norm)
        file_spec = adapters.spec
        changed = [f"{key} {getattr(spec, key)!r} -> {getattr(file_spec, key)!r}"
                   for key in ("type", "rank", "alpha", "decompose_axis", "train_text_encoder")
                   if getattr(spec, key) != getattr(file_spec, key)]
        self.say(f"initialised from {self.init_from}: {len(report.restored)} modules, fresh optimizer state"
                 + (f"; the file's network replaces the config's ({', '.join(changed)})" if changed else ""))
        if report.unknown_in_network:
            self.say(f"warning: {len(report.unknown_in_network)} modules of {self.init_from} have no layer in "
                     f"this model and were skipped (e.g. {report.unknown_in_network[0]})")
        return adapters

    def _setup_training_modes(self) -> None:
        """Gradient checkpointing, torch.compile of the UNet with its adapters (train.compile; in place, before
        accelerate wraps it) and train/eval modes."""
        base = self.base
        if self.cfg.train.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
            if self.train_te:
                for encoder in base.text_encoders:
                    encoder.gradient_checkpointing_enable()
        if self.cfg.train.compile:
            self.adapters.compile("unet")
        base.unet.train()
        for encoder in base.text_encoders:
            encoder.train(self.train_te)

    def _setup_latent_cache(self):
        """The VAE latent cache with every planned latent in it (data.cache_latents), or None."""
        from sdtrain.data.cache import LatentCache, vae_fingerprint
        from sdtrain.data.dataset import latent_items, latent_pixels
        from sdtrain.train.batches import encode_pixels

        cfg, accelerator, vae = self.cfg, self.accelerator, self.base.vae
        if not cfg.data.cache_latents:
            return None
        cache = LatentCache(Path(cfg.data.cache_dir) / "latents", vae_fingerprint(vae))
        items = latent_items(self.plan.dataset)
        mine = items[accelerator.process_index::accelerator.num_processes]  # a fixed split: no races

        def encode(chunk):
            return encode_pixels(vae, torch.stack([latent_pixels(item) for item in chunk])).cpu()

        encoded = cache.ensure(mine, encode, batch_size=max(1, cfg.train.batch_size))
        accelerator.wait_for_everyone()
        if accelerator.num_processes > 1:
            encoded = int(accelerator.reduce(torch.tensor(encoded, device=accelerator.device), reduction="sum"))
        self.say(f"latent cache: {len(items)} latents, {encoded} encoded now"
                 + (" (all others reused)" if encoded < len(items) else ""))
        return cache

    def _setup_text_cache(self):
        """The text-encoder output cache with every planned caption in it (data.cache_text_encoder_outputs,
        frozen text encoders), or None."""
        from sdtrain.data.cache import TextEncoderCache, text_encoder_fingerprint
        from sdtrain.data.dataset import captions_to_cache

        cfg, accelerator = self.cfg, self.accelerator
        if not cfg.data.cache_text_encoder_outputs or self.train_te:
            return None
        extra = f"clip_skip={cfg.model.clip_skip};max_token_length={cfg.model.max_token_length}"
        fingerprint = text_encoder_fingerprint(*self.base.text_encoders, extra=extra)
        cache = TextEncoderCache(Path(cfg.data.cache_dir) / "text", fingerprint)
        captions = captions_to_cache(self.plan.dataset)
        cache.ensure(captions[accelerator.process_index::accelerator.num_processes], self._encode_for_cache)
        accelerator.wait_for_everyone()
        return cache

    def _setup_validator(self):
        """The fixed validation samples (sdtrain.train.validation), encoded once, or None."""
        from sdtrain.train.validation import Validator

        if not self.plan.validation:
            return None
        return Validator(self.cfg, self.plan.validation, self.base, self.accelerator.device)

    def _encode_for_cache(self, captions: list[str]) -> dict[str, torch.Tensor]:
        cond = self.encode_text(captions)
        out = {"prompt_embeds": cond.prompt_embeds.float().cpu()}
        if cond.pooled_embeds is not None:
            out["pooled_embeds"] = cond.pooled_embeds.float().cpu()
        return out

    def _setup_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over the adapters' parameter groups, each at its own learning rate."""
        from sdtrain.train.optim import build_optimizer

        opt = self.cfg.optimizer
        # per-group rates; the config resolver already filled unset ones from optimizer.lr
        from sdtrain.train.blocks import block_learning_rates

        groups = self.adapters.param_groups({"unet": opt.unet_lr, "te1": opt.text_encoder_lr,
                                             "te2": opt.text_encoder_2_lr},
                                            block_learning_rates(self.cfg.network, self.adapters.modules))
        self.trainable_params = [param for group in groups for param in group["params"]]  # clipped every step
        return build_optimizer(groups, opt.type, opt.lr, opt.weight_decay, opt.betas, opt.eps, opt.args)

    def _setup_ema(self):
        """The EMA of the adapter weights (sdtrain.train.ema), or None."""
        from sdtrain.train.ema import AdapterEma

        return AdapterEma.from_config(self.cfg.ema, self.trainable_params)

    def _restore_state(self, folder: Path, info: dict) -> int:
        """Load a training state into the prepared components; returns the step to continue from. The
        optimizer keeps its saved state, while the config's learning rates and settings apply from here."""
        from sdtrain.train.state import check_base, load_training_state

        check_base(info, self.base.fingerprint)
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        from sdtrain.train.ema import split_state

        saved, ema_state = split_state(load_training_state(self.accelerator, folder, self.optimizer))
        self.adapters.load_trainable_state_dict(saved)
        for group, values in zip(self.optimizer.param_groups, settings):
            group.update(values)
        if info.get("last_adapter"):
            self.last_save = Path(info["last_adapter"])
        step = int(info["global_step"])
        self.result.state, self.state_step = folder, step
        if self.ema is not None and not self.ema.load_state_tensors(ema_state, step):
            self.note(f"the state {folder} holds no EMA of the adapter weights; the EMA starts again from the "
                      "trained weights at its next update")
        self.say(f"resumed from {folder} at step {step}")
        return step

    def _setup_lr_scheduler(self, optimizer, start_step: int):
        """diffusers' LR schedule over the planned steps, positioned at `start_step`."""
        from sdtrain.train.optim import build_lr_scheduler

        s = self.cfg.scheduler
        return build_lr_scheduler(optimizer, s.type, s.warmup_steps, self.plan.total_steps, s.num_cycles, s.power,
                                  start_step=start_step)

    # ------------------------------------------------------------------ one step

    def encode_text(self, captions: list[str]):
        from sdtrain.train.conditioning import encode_prompts

        with torch.set_grad_enabled(self.train_te and torch.is_grad_enabled()):
            with self.accelerator.autocast():
                return encode_prompts(self.base.arch, self.base.tokenizers, self.text_encoders, captions,
                                      clip_skip=self.cfg.model.clip_skip,
                                      max_token_length=self.cfg.model.max_token_length)

    def conditioning(self, captions: list[str], cached=None):
        """The UNet's text conditioning of `captions`: encoded now, or from the text-encoder cache (`cached`: the
        entries the data loader read with the batch, else read here)."""
        from sdtrain.train.conditioning import Conditioning

        if self.text_cache is None:
            return self.encode_text(captions)
        if cached is not None:
            return cached
        entries = [self.text_cache.load(c) for c in captions]
        device = self.accelerator.device
        embeds = torch.stack([e["prompt_embeds"] for e in entries]).to(device)
        pooled = None
        if "pooled_embeds" in entries[0]:
            pooled = torch.stack([e["pooled_embeds"] for e in entries]).to(device)
        return Conditioning(embeds, pooled)

    def sample_generator(self, global_batch: int, slot: int) -> torch.Generator:
        """The generator of one sample's noise and timestep: seeded by its place in the global batch stream,
        so the draw does not depend on the process count, the per-device batch size or on resuming."""
        return torch.Generator("cpu").manual_seed((self.cfg.train.seed * 1_000_003 + global_batch) * 4099 + slot)

    def planned_batch(self, global_index: int):
        """This process's slice of global batch `global_index` (a `sdtrain.data.loader.Batch`, on the host), loaded
        ahead of the steps by the data loader (data.num_workers worker processes)."""
        if self.batch_stream is None:
            from sdtrain.data.loader import BatchRequests, BatchStream, PlannedBatchDataset

            plan, accelerator = self.plan, self.accelerator
            batches = PlannedBatchDataset(plan.dataset, self.cfg.train.seed, self.latent_cache, self.text_cache)
            stop = plan.global_batch_index(plan.total_steps)

            def requests(start: int) -> BatchRequests:
                return BatchRequests(plan.dataset, plan.global_batch_size, plan.seed, start, stop, plan.processes,
                                     accelerator.process_index)

            self.batch_stream = BatchStream(batches, requests, self.cfg.data.num_workers,
                                            pin_memory=accelerator.device.type == "cuda")
        return self.batch_stream.batch(global_index)

    def micro_batch_loss(self, batch) -> torch.Tensor:
        """Loss of this process's slice of one global batch (a `sdtrain.data.loader.Batch`)."""
        from diffusers.training_utils import compute_snr

        from sdtrain.train.batches import encode_pixels
        from sdtrain.train.conditioning import Conditioning, unet_added_cond_kwargs
        from sdtrain.train.loss import (diffusion_loss, prediction_type_of, sample_noise, sample_timesteps,
                                        training_target)
        from sdtrain.train.loss_weights import sample_weights
        from sdtrain.train.noise import perturbed_noise

        cfg, base, device = self.cfg, self.base, self.accelerator.device
        global_batch, slot_offset, keys = batch.global_index, batch.slot_offset, batch.keys
        batch = batch.to(device)  # from pinned memory on CUDA: the host does not wait
        latents = batch.latents if batch.latents is not None else encode_pixels(base.vae, batch.pixels)
        scheduler = base.noise_scheduler
        noises, inputs, timesteps = [], [], []
        for i in range(latents.shape[0]):  # each sample's draws from its own generator, in this order
            generator = self.sample_generator(global_batch, slot_offset + i)
            noises.append(sample_noise(latents[i:i + 1], generator, cfg.train.noise_offset,
                                       cfg.train.multires_noise_iterations, cfg.train.multires_noise_discount))
            timesteps.append(sample_timesteps(1, generator, cfg.train.min_timestep, cfg.train.max_timestep,
                                              scheduler.config.num_train_timesteps, device=device,
                                              sampling=cfg.train.timestep_sampling, logit_mean=cfg.train.logit_mean,
                                              logit_std=cfg.train.logit_std, shift=cfg.train.timestep_shift))
            inputs.append(perturbed_noise(noises[-1], generator, cfg.train.ip_noise_gamma))
        noise, timesteps = torch.cat(noises), torch.cat(timesteps)
        noisy = scheduler.add_noise(latents, torch.cat(inputs), timesteps)
        prediction_type = prediction_type_of(scheduler, base.prediction_type)
        target = training_target(scheduler, latents, noise, timesteps, prediction_type)
        cached = Conditioning(batch.prompt_embeds, batch.pooled_embeds) if batch.prompt_embeds is not None else None
        cond = self.conditioning(batch.captions, cached)
        added = unet_added_cond_kwargs(cond, batch.time_ids.to(device)) if base.arch == "sdxl" else None
        with self.accelerator.autocast():
            pred = self.unet(noisy.to(self.weight_dtype), timesteps, encoder_hidden_states=cond.prompt_embeds,
                             added_cond_kwargs=added).sample
        is_reg = [self.plan.dataset.records[key.record].is_reg for key in keys]
        weights = sample_weights(compute_snr(scheduler, timesteps), prediction_type, is_reg,
                                 min_snr_gamma=cfg.train.min_snr_gamma,
                                 scale_v_pred_loss_like_noise_pred=cfg.train.scale_v_pred_loss_like_noise_pred,
                                 debiased_estimation=cfg.train.debiased_estimation_loss,
                                 prior_loss_weight=cfg.train.prior_loss_weight)
        masks = batch.masks
        if masks is not None and masks.shape[-2:] != latents.shape[-2:]:  # pixel-size masks of uncached latents
            masks = torch.nn.functional.interpolate(masks, size=latents.shape[-2:], mode="area")  # as to_latent_size
        return diffusion_loss(pred, target, cfg.train.loss, cfg.train.huber_c, weights, masks,
                              cfg.train.normalize_masked_loss)

    def optimizer_step(self, step: int) -> torch.Tensor:
        """One optimizer step over `accumulation` global batches, accumulated by accelerate (the wrapped models
        all-reduce only on the last one). Returns this process's mean loss over the micro-batches as a 0-dim
        tensor on the device: nothing in a step reads a value on the host (see `check_diverged`)."""
        plan, accelerator = self.plan, self.accelerator
        total = None
        self.last_grad_norm = None
        for a in range(plan.accumulation):
            batch = self.planned_batch(plan.global_batch_index(step, a))
            for callback in self.callbacks:
                callback.on_batch(self, batch.epoch, batch.keys)
            with accelerator.accumulate(*self.models):
                if accelerator.sync_gradients != (a == plan.accumulation - 1):
                    raise RuntimeError(f"accelerate's accumulation is out of step with the plan at step {step + 1}")
                with self.dropout_armed(batch.global_index, batch.slot_offset, len(batch.keys)):
                    loss = self.micro_batch_loss(batch)
                    if loss.requires_grad or not self.cfg.network.module_dropout:  # module dropout can skip all
                        accelerator.backward(loss)  # divided by the accumulation count
                if accelerator.sync_gradients and self.cfg.train.max_grad_norm > 0:
                    self.last_grad_norm = accelerator.clip_grad_norm_(self.trainable_params,
                                                                      self.cfg.train.max_grad_norm)
                self.optimizer.step()  # accelerate skips it until the last micro-batch
                self.optimizer.zero_grad(set_to_none=True)
            loss = loss.detach().float()
            total = loss if total is None else total + loss
        self.lr_scheduler.step()
        return total / plan.accumulation

    def dropout_armed(self, global_batch: int, slot_offset: int, samples: int):
        """Adapter dropout for one micro-batch (forward and the backward that may recompute it), if configured."""
        return (contextlib.nullcontext() if self.dropout is None
                else self.dropout.batch(global_batch, slot_offset, samples))

    def check_diverged(self) -> None:
        """Raise `TrainingDiverged` when training has diverged: the loss of a step since the previous check, or an
        adapter weight now, is NaN/inf. First brings the values the steps kept on the device to the host, in one
        transfer, and writes them (loss_log.csv, `result.losses`, TensorBoard, the progress bar).

        It waits for the device, so the loop calls it every log.log_every_n_steps steps, and the saves call it
        before they write (a saved adapter or training state is never diverged). With several processes it is a
        collective: every process calls it at the same step (the loss is averaged over processes)."""
        params = [p.detach() for p in self.adapters.parameters()]
        weights = torch.stack([p.sum() for p in params]).sum()  # NaN/inf in any weight makes it non-finite
        rows, (weights_sum,) = self.pending.take(self._mean_over_processes, extra=[weights])
        self.write_logs(rows)
        bad = next((row for row in rows if not math.isfinite(row.loss)), None)
        if bad is None and math.isfinite(weights_sum):
            return
        groups = [group for group in dict.fromkeys(self.adapters.groups.values())
                  if any(not torch.isfinite(p).all() for p in self.adapters.parameters(group))]
        where = f"parameter group(s) {', '.join(groups)} hold NaN/inf" if groups else \
            "all parameter groups are finite; the loss itself overflowed (lower optimizer.lr, or use bf16/fp32)"
        what = f"loss is {bad.loss} at step {bad.step}" if bad else f"the adapter weights after step {self.global_step}"
        raise TrainingDiverged(f"{what}: {where}; {last_finite(self.output_dir, self.last_save)}")

    def _mean_over_processes(self, values: torch.Tensor) -> torch.Tensor:
        if self.plan.processes == 1:
            return values
        return self.accelerator.reduce(values, reduction="mean")

    def write_logs(self, rows) -> None:
        """Steps' values on the host (`sdtrain.train.logs.StepRow`) into loss_log.csv, `result.losses`, the trackers
        (the steps at multiples of log.log_every_n_steps) and the progress bar."""
        cfg = self.cfg
        if not rows:
            return
        self.loss_log.write(rows)
        self.result.losses.extend(row.loss for row in rows)
        if cfg.log.trackers:
            for row in rows:
                if row.step % cfg.log.log_every_n_steps == 0:
                    values = {"loss": row.loss, "lr": row.lr}
                    if row.grad_norm is not None:
                        values["grad_norm"] = row.grad_norm
                    self.accelerator.log(values, step=row.step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rows[-1].loss:.4f}", lr=f"{rows[-1].lr:.2e}")

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

        self.check_diverged()
        path = self.adapter_path(None if final else step)
        check_before_save(self, f"the adapter {path}")
        self.accelerator.wait_for_everyone()
        if not self.is_main:
            return None
        save_adapter(self.adapters, path, dtype=self.cfg.save.dtype, metadata=self.metadata(step),
                     target=self.cfg.save.target)
        self.last_save = path
        self.result.saved.append(path)
        if self.ema is not None:
            with self.ema.applied():
                ema_path = self.ema_adapter_path(None if final else step)
                save_adapter(self.adapters, ema_path, dtype=self.cfg.save.dtype, metadata=self.metadata(step),
                             target=self.cfg.save.target)
            self.result.saved.append(ema_path)
        if not final and self.cfg.save.keep_last:
            for stem in ("", "-ema")[:1 + (self.ema is not None)]:
                intermediates = sorted(self.output_dir.glob(f"{self.cfg.train.output_name}{stem}-step*.safetensors"))
                for old in intermediates[:-self.cfg.save.keep_last]:
                    old.unlink(missing_ok=True)
        return path

    def ema_adapter_path(self, step: int | None) -> Path:
        name = f"{self.cfg.train.output_name}-ema"
        return self.output_dir / (f"{name}.safetensors" if step is None else f"{name}-step{step:06d}.safetensors")

    def save_state(self) -> Path:
        """A training state at the current step (see `sdtrain.train.state`); keeps the newest
        save.keep_last_states."""
        from sdtrain.train.state import save_training_state, state_info

        self.check_diverged()
        if self.state_step == self.global_step:  # a stop right after a periodic state: it is this one
            return self.result.state
        check_before_save(self, "the training state")
        info = state_info(self.cfg, self.plan, self.global_step, self.base.fingerprint, self.last_save)
        adapter_state = self.adapters.trainable_state_dict()
        if self.ema is not None:
            adapter_state.update(self.ema.state_tensors())
        path = save_training_state(self.accelerator, self.output_dir, optimizer=self.optimizer,
                                   adapter_state=adapter_state, info=info, keep_last=self.cfg.save.keep_last_states)
        self.result.state, self.state_step = path, self.global_step
        return path

    def sample(self, step: int, lines: list[str] | None = None, folder: str = "samples") -> None:
        """Sample images of `lines` (sample.prompts) into <output_dir>/<folder>, and their grid to the trackers."""
        from sdtrain.config import parse_prompt_line
        from sdtrain.train.plan import resolution_of
        from sdtrain.train.sampling import sample_images
        from sdtrain.train.trackers import log_sample_grid

        self.accelerator.wait_for_everyone()
        lines = self.cfg.sample.prompts if lines is None else lines
        if not self.is_main or not lines:
            return
        cfg, base = self.cfg, self.base
        width, height = resolution_of(cfg, self.arch)
        defaults = {"steps": cfg.sample.steps, "cfg": cfg.sample.cfg_scale, "seed": cfg.sample.seed,
                    "width": width, "height": height}
        prompts = []
        for line in lines:  # a prompt line's own --w --h --d --l --s win over the defaults
            given = {k: v for k, v in parse_prompt_line(line).items() if v is not None}
            prompts.append({k: v for k, v in {**defaults, **given}.items() if v is not None})
        unet = self.accelerator.unwrap_model(self.unet)
        weights = self.ema.applied() if self.ema is not None and cfg.ema.use_for_samples else contextlib.nullcontext()
        with weights, self.accelerator.autocast():
            paths = sample_images(base.arch, unet=unet, vae=base.vae, text_encoders=base.text_encoders,
                                  tokenizers=base.tokenizers, scheduler_config=base.noise_scheduler.config,
                                  prompts=prompts, sampler=cfg.sample.sampler, out_dir=self.output_dir / folder,
                                  step=step, clip_skip=cfg.model.clip_skip,
                                  max_token_length=cfg.model.max_token_length)
        self.result.samples.extend(paths)
        log_sample_grid(self.accelerator, paths, step, tag=folder)

    def validate(self, step: int) -> float:
        """The validation loss at `step`: validation_log.csv, the trackers, the result."""
        loss = self.validator.evaluate(self)
        self.validation_log.write(step, loss)
        if self.cfg.log.trackers:
            self.accelerator.log({"validation_loss": loss}, step=step)
        self.result.validation.append((step, loss))
        if self.cfg.validation.prompts:
            self.sample(step, self.cfg.validation.prompts, "validation")
        return loss

    def verify_final(self, path: Path) -> str:
        if self.cfg.save.targets == [] or not self.is_main:
            return ""
        from sdtrain.export.verify import verify_saved_adapter

        report = verify_saved_adapter(path, self.adapters, targets=self.cfg.save.targets,
                                      base_label=str(self.cfg.model.path))
        self.result.verify_report = report
        return report.format() if hasattr(report, "format") else str(report)

    # ------------------------------------------------------------------ the run

    def request_stop(self, reason: str, exit_code: int = 1) -> None:
        """Stop after the current optimizer step, as Ctrl+C does: save a state and the adapter so far, then
        raise `TrainingInterrupted` with `exit_code`."""
        self.stop.request(reason, exit_code)

    def run(self) -> TrainResult:
        """Train (building the components first when `setup` was not called); the output folder's lock is
        released at the end, however the run ends."""
        from sdtrain.files import write_fault
        from sdtrain.train.output_lock import unlock_output_dir

        try:
            return self._run()
        except OSError as error:  # a write the writers did not report themselves (logs, samples, caches)
            fault = write_fault(error, error.filename or self.output_dir, kept="the files written so far are kept")
            if fault is None:
                raise
            raise fault from error
        finally:
            unlock_output_dir(self.output_dir)

    def _run(self) -> TrainResult:
        from tqdm.auto import tqdm

        from sdtrain.train.logs import LossLog
        from sdtrain.train.trackers import start_trackers

        self.started = time.time()
        if self.base is None and self.finished_state is None:
            self.setup()
        if self.finished_state is not None:
            self.result.steps = self.global_step = int(self.finished_state[1]["global_step"])
            self.result.state = self.finished_state[0]
            final = self.adapter_path(None)
            self.result.final_adapter = final if final.is_file() else None
            return self.result
        cfg, accelerator, plan = self.cfg, self.accelerator, self.plan
        self.loss_log = LossLog(self.output_dir / "loss_log.csv", keep_until=self.global_step, enabled=self.is_main)
        if self.validator is not None:
            from sdtrain.train.validation import ValidationLog

            self.validation_log = ValidationLog(self.output_dir / "validation_log.csv", keep_until=self.global_step,
                                                enabled=self.is_main)
        if cfg.log.trackers:
            start_trackers(accelerator, cfg)
        if cfg.sample.at_start and self.global_step == 0:
            self.sample(0)
        bar = self.bar = tqdm(total=plan.total_steps, initial=self.global_step,
                              disable=not self.is_main or self.quiet, desc="training", dynamic_ncols=True)
        try:
            with self.stop:
                while self.global_step < plan.total_steps:
                    loss = self.optimizer_step(self.global_step)
                    self.global_step += 1
                    self.pending.add(self.global_step, loss, self.lr_scheduler.get_last_lr()[0], self.last_grad_norm)
                    bar.update(1)
                    bar.refresh()  # every step (tools read the progress line; the loss shows from each log)
                    if self.global_step % cfg.log.log_every_n_steps == 0:
                        self.check_diverged()  # the step values' one trip to the host
                    self.after_step()
                    for callback in self.callbacks:
                        callback.on_step_end(self, self.global_step, loss)
                    if self.stop_agreed():
                        break
        except KeyboardInterrupt:
            bar.close()
            self.say(self.abandoned_message())
            raise
        except SaveDtypeOverflow as error:  # an adapter save during the run
            bar.close()
            raise self.overflow_with_state(error) from None
        finally:
            if self.batch_stream is not None:
                self.batch_stream.close()  # the loader's worker processes
        bar.close()
        if self.global_step < plan.total_steps:
            self.stop_and_save()
        self.check_replicas_agree()
        self.save_state()  # first: a final adapter that cannot be written loses no training
        try:
            final = self.save_adapter(self.global_step, final=True)
        except SaveDtypeOverflow as error:
            raise self.overflow_with_state(error) from None
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
        if cfg.log.trackers:
            accelerator.end_training()
        return self.result

    def overflow_with_state(self, error: SaveDtypeOverflow) -> SaveDtypeOverflow:
        """`error` (an adapter that overflows save.dtype) with a training state at the current step, so that the
        run continues, or writes its final adapter, with another save.dtype instead of starting again. The state is
        the one saved at this step already, or saved now by a single process (with several, only the main process
        saw the error: the others cannot join a state save)."""
        if self.state_step != self.global_step and self.plan.processes == 1:
            self.save_state()
        if self.state_step != self.global_step:
            return error
        what = ("write the final adapter from it, without training again" if self.global_step >= self.plan.total_steps
                else "continue from it")
        return SaveDtypeOverflow(
            f"{error}. The training state at step {self.global_step} is saved ({self.result.state}): {what}, with "
            f"another save.dtype:\n  {self.resume_command()} --set save.dtype=bf16", error.counts, error.path)

    def after_step(self) -> None:
        """Saves, samples and states due after the step just taken (the end of the run saves its own)."""
        cfg, step = self.cfg, self.global_step
        done = step >= self.plan.total_steps
        if self.ema is not None:
            self.ema.after_step(step)
        if cfg.save.every_n_steps and step % cfg.save.every_n_steps == 0 and not done:
            self.save_adapter(step)
        if cfg.save.every_n_epochs and not done and self.epoch_ended(step, cfg.save.every_n_epochs):
            self.save_adapter(step)
        if (cfg.sample.every_n_steps and step % cfg.sample.every_n_steps == 0) or \
                (cfg.sample.every_n_epochs and self.epoch_ended(step, cfg.sample.every_n_epochs)):
            self.sample(step)
        if self.validator is not None and (step % cfg.validation.every_n_steps == 0 or done):
            self.validate(step)
        if cfg.save.state_every_n_steps and step % cfg.save.state_every_n_steps == 0 and not done:
            self.save_state()

    def epoch_ended(self, step: int, every_n_epochs: int) -> bool:
        """Whether step `step` ends an epoch whose number (from 1) is a multiple of `every_n_epochs`."""
        per_epoch = self.plan.steps_per_epoch
        epoch_before = math.floor((step - 1) / per_epoch)
        return math.floor(step / per_epoch) > epoch_before and (epoch_before + 1) % every_n_epochs == 0

    def stop_agreed(self) -> bool:
        """Whether a stop was asked for, in any process (they all stop after the same step). Several processes
        agree at the steps that log (every log.log_every_n_steps), as the exchange waits for the device."""
        asked = self.stop.reason is not None
        if self.plan.processes > 1:
            if self.global_step % self.cfg.log.log_every_n_steps:
                return False
            flag = torch.tensor(float(asked), device=self.accelerator.device)
            if self.accelerator.reduce(flag, reduction="sum").item() > 0 and not asked:
                self.stop.request("a stop in another process", 1)
                asked = True
        return asked

    def stop_and_save(self) -> None:
        """Save a training state and the adapter so far, then raise TrainingInterrupted saying how to continue."""
        state = self.save_state()
        adapter = self.save_adapter(self.global_step)
        how = self.resume_command()
        if self.plan.processes > 1:
            how += f"  (launched the same way, with {self.plan.processes} processes)"
        raise TrainingInterrupted(
            f"stopped by {self.stop.reason} after step {self.global_step} of {self.plan.total_steps}; training "
            f"state saved to {state}" + (f", the adapter so far to {adapter}" if adapter else "")
            + f". Continue with:\n  {how}", self.stop.exit_code)

    def abandoned_message(self) -> str:
        from sdtrain.train.state import complete_states, states_root

        states = complete_states(states_root(self.output_dir))[0]
        if not states:
            return f"stopped during step {self.global_step + 1} without saving; no training state was written yet"
        return (f"stopped during step {self.global_step + 1} without saving; the newest training state is "
                f"{states[-1]}. Continue with:\n  {self.resume_command()}")

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


def train(cfg, *, dry_run: bool = False, resume: str | None = None, init_from: str | None = None,
          quiet: bool = False, continue_command: str | None = None) -> TrainResult | TrainingPlan:
    """Run (or, with dry_run, only plan and describe) a training run."""
    if dry_run:
        plan = make_plan(cfg)
        print(describe_plan(plan, cfg))
        return plan
    trainer = Trainer(cfg, resume=resume, init_from=init_from, quiet=quiet, continue_command=continue_command)
    trainer.say(describe_plan(trainer.plan, cfg))
    return trainer.run()
