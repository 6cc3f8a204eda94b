"""Mutation check of the trainer's wiring: break the trainer in one small way at a time and show the tests fail.

Each mutation replaces one exact piece of the trainer's source (an option dropped, two learning rates swapped,
accumulation or clipping ignored, ...) in a scratch copy of the project, then runs the tests that cover that
option there. A mutation the tests do not catch is a wiring test missing. The project itself is not touched.

    python3 scripts/check_mutations.py            # all mutations (about a minute each on 2 CPU cores)
    python3 scripts/check_mutations.py --list
    python3 scripts/check_mutations.py --only loss-type --only swap-lrs

Exits 1 when a mutation survives (or when a mutation no longer applies because the source changed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("sdtrain", "tests", "configs", "datasets", "docs", "README.md", "pyproject.toml")

WIRING = "tests/train/test_wiring.py"
STATE = "tests/train/test_state.py"
SAFETY = "tests/train/test_state_safety.py"
GUARDS = "tests/train/test_train_guards.py"
KOHYA = "tests/test_config_kohya.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation("loss-type", "sdtrain/train/loop.py", "diffusion_loss(pred, target, cfg.train.loss,",
             'diffusion_loss(pred, target, "l2",', (f"{WIRING}::test_loss_options_reach_the_step",)),
    Mutation("huber-c", "sdtrain/train/loop.py", "cfg.train.loss, cfg.train.huber_c, weights,",
             "cfg.train.loss, 0.1, weights,", (f"{WIRING}::test_loss_options_reach_the_step",)),
    Mutation("loss-mask-ignored", "sdtrain/train/loop.py", "masks = batch.masks",
             "masks = None", (f"{WIRING}::test_loss_masks_reach_the_loss",)),
    Mutation("mask-normalize", "sdtrain/train/loop.py", "masks,\n                              cfg.train.normalize_masked_loss)",
             "masks,\n                              True)", (f"{WIRING}::test_loss_masks_reach_the_loss",)),
    Mutation("mask-path", "sdtrain/train/plan.py", "mask_path=subset.mask_path,", "mask_path=None,",
             (f"{WIRING}::test_loss_masks_reach_the_loss",)),
    Mutation("alpha-mask", "sdtrain/train/plan.py", "alpha_mask=subset.alpha_mask)", "alpha_mask=False)",
             (f"{WIRING}::test_alpha_masks_reach_the_plan",)),
    Mutation("mask-not-cached", "sdtrain/data/cache.py", 'entry["mask"] = latent_mask(item, latent.shape[-2:])',
             "pass", (f"{WIRING}::test_loss_masks_reach_the_loss",)),
    Mutation("validation-fraction", "sdtrain/train/validation.py", "return hold_out(dataset, fraction, seed)",
             "return hold_out(dataset, 0.5, seed)",
             ("tests/train/test_validation.py::test_plan_shows_the_split_and_a_validation_folder",)),
    Mutation("validation-timesteps", "sdtrain/train/validation.py",
             "validation_timesteps(v.timesteps, t.min_timestep, t.max_timestep)", "validation_timesteps(4, 0, 1000)",
             (f"{WIRING}::test_validation_options_reach_the_evaluation",)),
    Mutation("validation-seed", "sdtrain/train/validation.py", "generator=validation_generator(v.seed, index, j)",
             "generator=validation_generator(0, index, j)", (f"{WIRING}::test_validation_options_reach_the_evaluation",)),
    Mutation("validation-every", "sdtrain/train/loop.py", "step % cfg.validation.every_n_steps == 0 or done",
             "done", (f"{WIRING}::test_validation_options_reach_the_evaluation",)),
    Mutation("ema-decay", "sdtrain/train/ema.py", "EMAModel(self.params, decay=self.decay)",
             "EMAModel(self.params, decay=0.999)", (f"{WIRING}::test_ema_options_reach_the_average_and_the_samples",)),
    Mutation("ema-every", "sdtrain/train/ema.py", "cls(params, ema_cfg.decay, ema_cfg.every_n_steps, ema_cfg.start_step)",
             "cls(params, ema_cfg.decay, 1, ema_cfg.start_step)",
             (f"{WIRING}::test_ema_options_reach_the_average_and_the_samples",)),
    Mutation("ema-start", "sdtrain/train/ema.py", "cls(params, ema_cfg.decay, ema_cfg.every_n_steps, ema_cfg.start_step)",
             "cls(params, ema_cfg.decay, ema_cfg.every_n_steps, 0)",
             (f"{WIRING}::test_ema_options_reach_the_average_and_the_samples",)),
    Mutation("ema-for-samples", "sdtrain/train/loop.py", "self.ema is not None and cfg.ema.use_for_samples else",
             "False else", (f"{WIRING}::test_ema_options_reach_the_average_and_the_samples",)),
    Mutation("ema-not-in-state", "sdtrain/train/loop.py", "adapter_state.update(self.ema.state_tensors())", "pass",
             ("tests/train/test_ema.py::test_ema_resumes_bit_exactly_and_is_saved_as_its_own_adapter",)),
    Mutation("sample-at-start", "sdtrain/train/loop.py", "if cfg.sample.at_start and self.global_step == 0:",
             "if False:", (f"{WIRING}::test_sample_schedule_and_sample_grids_reach_the_tracker",)),
    Mutation("sample-every-epochs", "sdtrain/train/loop.py",
             "(cfg.sample.every_n_epochs and self.epoch_ended(step, cfg.sample.every_n_epochs))", "(False)",
             (f"{WIRING}::test_sample_schedule_and_sample_grids_reach_the_tracker",)),
    Mutation("sample-grid-to-trackers", "sdtrain/train/loop.py", "log_sample_grid(self.accelerator, paths, step, tag=folder)",
             "pass", (f"{WIRING}::test_sample_schedule_and_sample_grids_reach_the_tracker",)),
    Mutation("trackers-ignored", "sdtrain/train/accelerator.py", "log_with=cfg.log.trackers or None,", "log_with=None,",
             (f"{WIRING}::test_sample_schedule_and_sample_grids_reach_the_tracker",)),
    Mutation("validation-prompts", "sdtrain/train/loop.py", 'self.sample(step, self.cfg.validation.prompts, "validation")',
             "pass", (f"{WIRING}::test_sample_schedule_and_sample_grids_reach_the_tracker",)),
    Mutation("mask-flip", "sdtrain/data/masks.py", "plan = plan_crop(tuple(image_size), tuple(bucket), flip=flip)",
             "plan = plan_crop(tuple(image_size), tuple(bucket))",
             ("tests/data/test_masks.py::test_mask_file_follows_exif_resize_crop_and_flip",)),
    Mutation("min-snr", "sdtrain/train/loop.py", "min_snr_gamma=cfg.train.min_snr_gamma,", "min_snr_gamma=0.0,",
             (f"{WIRING}::test_loss_options_reach_the_step",)),
    Mutation("noise-offset", "sdtrain/train/loop.py", "generator, cfg.train.noise_offset,", "generator, 0.0,",
             (f"{WIRING}::test_loss_options_reach_the_step",)),
    Mutation("multires-noise", "sdtrain/train/loop.py", "cfg.train.multires_noise_iterations, cfg.train", "0, cfg.train",
             (f"{WIRING}::test_multires_noise_and_input_perturbation_reach_the_step",)),
    Mutation("multires-discount", "sdtrain/train/loop.py", "cfg.train.multires_noise_discount))", "0.3))",
             (f"{WIRING}::test_multires_noise_and_input_perturbation_reach_the_step",)),
    Mutation("ip-noise-gamma", "sdtrain/train/loop.py", "perturbed_noise(noises[-1], generator, cfg.train.ip_noise_gamma)",
             "perturbed_noise(noises[-1], generator, 0.0)",
             (f"{WIRING}::test_multires_noise_and_input_perturbation_reach_the_step",)),
    Mutation("ip-noise-in-target", "sdtrain/train/loop.py",
             "target = training_target(scheduler, latents, noise, timesteps,",
             "target = training_target(scheduler, latents, torch.cat(inputs), timesteps,",
             (f"{WIRING}::test_multires_noise_and_input_perturbation_reach_the_step",)),
    Mutation("zero-terminal-snr", "sdtrain/train/loop.py", "        if train.zero_terminal_snr:\n", "        if False:\n",
             (f"{WIRING}::test_zero_terminal_snr_and_the_timestep_draw_reach_the_step",)),
    Mutation("zero-terminal-snr-samples", "sdtrain/train/sampling.py", 'overrides["timestep_spacing"] = "trailing"',
             "pass", ("tests/train/test_sampling.py::test_zero_terminal_snr_samples_start_from_pure_noise",)),
    Mutation("timestep-sampling", "sdtrain/train/loop.py", "sampling=cfg.train.timestep_sampling,", 'sampling="uniform",',
             (f"{WIRING}::test_zero_terminal_snr_and_the_timestep_draw_reach_the_step",)),
    Mutation("logit-mean-std", "sdtrain/train/loop.py",
             "logit_mean=cfg.train.logit_mean,\n                                              logit_std=cfg.train.logit_std,",
             "logit_mean=0.0,\n                                              logit_std=1.0,",
             (f"{WIRING}::test_zero_terminal_snr_and_the_timestep_draw_reach_the_step",)),
    Mutation("timestep-shift", "sdtrain/train/loop.py", "shift=cfg.train.timestep_shift)", "shift=1.0)",
             (f"{WIRING}::test_zero_terminal_snr_and_the_timestep_draw_reach_the_step",)),
    Mutation("debiased-estimation", "sdtrain/train/loop.py", "debiased_estimation=cfg.train.debiased_estimation_loss,",
             "debiased_estimation=False,", (f"{WIRING}::test_loss_weight_options_reach_the_step",)),
    Mutation("v-pred-like-noise-pred", "sdtrain/train/loop.py",
             "scale_v_pred_loss_like_noise_pred=cfg.train.scale_v_pred_loss_like_noise_pred,",
             "scale_v_pred_loss_like_noise_pred=False,", (f"{WIRING}::test_loss_weight_options_reach_the_step",)),
    Mutation("prior-loss-weight", "sdtrain/train/loop.py", "prior_loss_weight=cfg.train.prior_loss_weight)",
             "prior_loss_weight=1.0)", (f"{WIRING}::test_loss_weight_options_reach_the_step",)),
    Mutation("timestep-range", "sdtrain/train/loop.py", "generator, cfg.train.min_timestep, cfg.train.max_timestep,",
             "generator, 0, 1000,", (f"{WIRING}::test_loss_options_reach_the_step",)),
    Mutation("v-prediction", "sdtrain/train/loop.py",
             "prediction_type = prediction_type_of(scheduler, base.prediction_type)", 'prediction_type = "epsilon"',
             (f"{WIRING}::test_loss_options_reach_the_step",)),
    Mutation("clip-skip", "sdtrain/train/loop.py", "captions,\n                                      clip_skip=self.cfg.model.clip_skip,",
             "captions,\n                                      clip_skip=1,",
             (f"{WIRING}::test_clip_skip_and_the_text_encoder_cache",)),
    Mutation("max-token-length", "sdtrain/train/loop.py",
             "clip_skip=self.cfg.model.clip_skip,\n                                      max_token_length=self.cfg.model.max_token_length)",
             "clip_skip=self.cfg.model.clip_skip)",
             (f"{WIRING}::test_long_captions_prefix_suffix_and_wildcards_reach_the_text_encoder",)),
    Mutation("sample-max-token-length", "sdtrain/train/loop.py",
             "step=step, clip_skip=cfg.model.clip_skip,\n                                  max_token_length=cfg.model.max_token_length)",
             "step=step, clip_skip=cfg.model.clip_skip)",
             (f"{WIRING}::test_long_captions_prefix_suffix_and_wildcards_reach_the_text_encoder",)),
    Mutation("caption-prefix", "sdtrain/train/plan.py", "prefix=subset.caption_prefix,", 'prefix="",',
             (f"{WIRING}::test_long_captions_prefix_suffix_and_wildcards_reach_the_text_encoder",)),
    Mutation("caption-suffix", "sdtrain/train/plan.py", "suffix=subset.caption_suffix,", 'suffix="",',
             (f"{WIRING}::test_long_captions_prefix_suffix_and_wildcards_reach_the_text_encoder",)),
    Mutation("wildcards", "sdtrain/train/plan.py", "wildcards=subset.wildcards,", "wildcards=False,",
             (f"{WIRING}::test_long_captions_prefix_suffix_and_wildcards_reach_the_text_encoder",)),
    Mutation("te-cache-ignored", "sdtrain/train/loop.py", "        if self.text_cache is None:\n            return self.encode_text",
             "        if True:\n            return self.encode_text",
             (f"{WIRING}::test_clip_skip_and_the_text_encoder_cache",)),
    Mutation("caption-options", "sdtrain/data/loader.py", "augment_caption(record.caption, spec.captions, rng)",
             "record.caption", (f"{WIRING}::test_caption_options_and_flip_reach_the_text_encoder",)),
    Mutation("flip", "sdtrain/data/loader.py", "flip = spec.flip and rng.random() < 0.5", "flip = False",
             (f"{WIRING}::test_caption_options_and_flip_reach_the_text_encoder",)),
    Mutation("num-workers", "sdtrain/train/loop.py", "BatchStream(batches, requests, self.cfg.data.num_workers,",
             "BatchStream(batches, requests, 0,",
             ("tests/train/test_train_data.py::test_workers_and_random_crop_resume_bit_exact",)),
    Mutation("random-crop", "sdtrain/data/loader.py", "plan_crop(image.size, record.bucket, spec.random_crop, rng, flip)",
             "plan_crop(image.size, record.bucket, False, rng, flip)",
             ("tests/train/test_train_data.py::test_workers_and_random_crop_resume_bit_exact",)),
    Mutation("nan-guard-at-log", "sdtrain/train/loop.py", "                        self.check_diverged()  # the step",
             "                        pass  # the step",
             ("tests/train/test_loop_sync.py::test_non_finite_loss_stops_at_the_next_log_or_save_and_saves_nothing",)),
    Mutation("nan-guard-at-save", "sdtrain/train/loop.py",
             "        self.check_diverged()\n        path = self.adapter_path(None if final else step)",
             "        path = self.adapter_path(None if final else step)",
             ("tests/train/test_loop_sync.py::test_non_finite_loss_stops_at_the_next_log_or_save_and_saves_nothing",)),
    Mutation("compile", "sdtrain/train/loop.py", '            self.adapters.compile("unet")', "            pass",
             ("tests/train/test_compile_option.py::test_compiled_unet_trains_like_eager",)),
    Mutation("swap-lrs", "sdtrain/train/loop.py", '{"unet": opt.unet_lr, "te1": opt.text_encoder_lr,',
             '{"unet": opt.text_encoder_lr, "te1": opt.unet_lr,',
             (f"{WIRING}::test_each_group_steps_at_its_own_learning_rate",)),
    Mutation("te2-lr", "sdtrain/train/loop.py", '"te2": opt.text_encoder_2_lr}', '"te2": opt.text_encoder_lr}',
             (f"{WIRING}::test_each_group_steps_at_its_own_learning_rate",)),
    Mutation("accumulation-steps", "sdtrain/train/accelerator.py",
             "gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,", "gradient_accumulation_steps=1,",
             (f"{WIRING}::test_accumulation_averages_micro_batches_into_one_step",)),
    Mutation("accumulate-context", "sdtrain/train/loop.py", "with accelerator.accumulate(*self.models):",
             "with torch.enable_grad():",
             (f"{WIRING}::test_accumulation_averages_micro_batches_into_one_step",)),
    Mutation("no-clipping", "sdtrain/train/loop.py", "if accelerator.sync_gradients and self.cfg.train.max_grad_norm > 0:",
             "if False:", (f"{WIRING}::test_gradients_are_clipped_to_max_grad_norm",)),
    Mutation("clip-norm-value", "sdtrain/train/loop.py",
             "self.trainable_params,\n                                                                      self.cfg.train.max_grad_norm)",
             "self.trainable_params, 1.0)",
             (f"{WIRING}::test_gradients_are_clipped_to_max_grad_norm",)),
    Mutation("mixed-precision", "sdtrain/train/accelerator.py", "Accelerator(mixed_precision=precision,",
             'Accelerator(mixed_precision="no",', (f"{WIRING}::test_mixed_precision_runs_the_unet_under_autocast",)),
    Mutation("gradient-checkpointing", "sdtrain/train/loop.py", "        if self.cfg.train.gradient_checkpointing:\n",
             "        if False:\n", ("tests/train/test_train_options.py::test_gradient_checkpointing_gives_the_same_run",)),
    Mutation("revision", "sdtrain/train/loop.py", "revision=model.revision,", "revision=None,",
             (f"{WIRING}::test_revision_and_variant_reach_the_hub_download",)),
    Mutation("variant", "sdtrain/train/loop.py", "variant=model.variant)", "variant=None)",
             (f"{WIRING}::test_revision_and_variant_reach_the_hub_download",)),
    Mutation("tracker-config", "sdtrain/train/trackers.py", "init_trackers(PROJECT, config=tracker_hyperparameters(cfg),",
             "init_trackers(PROJECT,", ("tests/train/test_train_e2e.py::test_train_end_to_end",)),
    Mutation("dropout-not-armed", "sdtrain/train/loop.py",
             "else self.dropout.batch(global_batch, slot_offset, samples))", "else contextlib.nullcontext())", (f"{WIRING}::test_adapter_dropout_reaches_the_layers_in_training_steps_only",)),
    Mutation("dropout-not-attached", "sdtrain/train/loop.py",
             "return attach_dropout(self.adapters, n.dropout, n.rank_dropout, n.module_dropout, self.cfg.train.seed)",
             "return None", (f"{WIRING}::test_adapter_dropout_reaches_the_layers_in_training_steps_only",)),
    Mutation("rank-dropout-ignored", "sdtrain/train/loop.py", "n.dropout, n.rank_dropout, n.module_dropout,",
             "n.dropout, 0.0, n.module_dropout,",
             (f"{WIRING}::test_adapter_dropout_reaches_the_layers_in_training_steps_only",)),
    Mutation("module-dropout-backward", "sdtrain/train/loop.py",
             "if loss.requires_grad or not self.cfg.network.module_dropout:", "if True:",
             (f"{WIRING}::test_adapter_dropout_reaches_the_layers_in_training_steps_only",)),
    Mutation("dropout-masks-not-per-batch", "sdtrain/adapters/regularize.py",
             "(self.seed * 1_000_003 + self.global_batch)", "(self.seed * 1_000_003)",
             ("tests/adapters/test_regularize.py",)),
    Mutation("rank-dropout-unscaled", "sdtrain/adapters/regularize.py", "s = s / (1.0 - self.p_rank)", "s = s",
             ("tests/adapters/test_regularize.py",)),
    Mutation("block-lr-ignored", "sdtrain/train/loop.py", "block_learning_rates(self.cfg.network, self.adapters.modules))",
             "{})", (f"{WIRING}::test_block_learning_rates_and_ranks_reach_the_optimizer_and_the_file",)),
    Mutation("block-rank-ignored", "sdtrain/adapters/spec.py", "            if block.rank is not None:\n",
             "            if False:\n",
             (f"{WIRING}::test_block_learning_rates_and_ranks_reach_the_optimizer_and_the_file",)),
    Mutation("unread-key", "sdtrain/train/plan.py", "no_upscale=cfg.data.no_upscale)", "no_upscale=False)",
             (f"{WIRING}::test_every_config_key_is_read",)),
    Mutation("no-final-state", "sdtrain/train/loop.py",
             "        self.save_state()  # first: a final adapter that cannot be written loses no training\n",
             "",
             (f"{STATE}::test_finished_default_run_resumes_to_more_steps",
              f"{GUARDS}::test_final_save_overflowing_fp16_keeps_the_state_and_resume_writes_the_adapter")),
    Mutation("keep-last-states", "sdtrain/train/loop.py", "keep_last=self.cfg.save.keep_last_states)", "keep_last=0)",
             (f"{STATE}::test_finished_default_run_resumes_to_more_steps",)),
    Mutation("no-state-on-stop", "sdtrain/train/loop.py", "        state = self.save_state()\n        adapter = self.save_adapter",
             "        state = None\n        adapter = self.save_adapter",
             (f"{STATE}::test_stop_and_resume_is_bitwise_identical",)),
    Mutation("schedule-position", "sdtrain/train/loop.py", "start_step=start_step)", "start_step=0)",
             (f"{STATE}::test_accumulation_stop_mid_epoch_and_resume",)),
    Mutation("resume-checked-after-load", "sdtrain/train/loop.py",
             "        resume = self._check_resume()\n",
             "        self._setup_base()\n        resume = self._check_resume()\n",
             (f"{STATE}::test_resume_that_cannot_work_exits_2_before_weights_load",)),
    Mutation("signals-ignored", "sdtrain/train/loop.py", "            with self.stop:\n", "            with StopRequest():\n",
             (f"{STATE}::test_sigint_sigterm_sigkill_then_resume_is_bitwise_identical",)),
    Mutation("state-pickle-allowed", "sdtrain/train/loop.py",
             "info = read_state_info(folder)\n        check_state_files(folder)\n", "info = read_state_info(folder)\n",
             (f"{SAFETY}::test_pickle_planted_in_a_copied_state_does_not_run",)),
    Mutation("no-state-recovery", "sdtrain/train/loop.py", "for note in recover_states(states_root(self.output_dir)):",
             "for note in []:", (f"{SAFETY}::test_kill_in_the_replacement_window_and_a_second_run_into_the_folder",)),
    Mutation("no-output-lock", "sdtrain/train/loop.py", "                lock_output_dir(self.output_dir)\n",
             "                pass\n",
             (f"{SAFETY}::test_kill_in_the_replacement_window_and_a_second_run_into_the_folder",)),
    Mutation("state-saved-diverged", "sdtrain/train/loop.py", '        check_before_save(self, "the training state")\n',
             "", (f"{GUARDS}::test_divergence_writes_nothing_and_names_the_last_finite_state",)),
    Mutation("adapter-saved-diverged", "sdtrain/train/loop.py", '        check_before_save(self, f"the adapter {path}")\n',
             "", (f"{GUARDS}::test_divergence_of_the_optimizer_alone_stops_a_periodic_adapter_save",)),
    Mutation("kohya-mask-weighting", "sdtrain/config/load.py",
             "    kohya.match_kohya_mask_weighting(data, source, notes, origins)\n", "",
             (f"{KOHYA}::test_kohya_masked_loss_reads_conditioning_masks_and_alpha_masks",)),
    Mutation("kohya-conditioning-masks", "sdtrain/config/kohya.py",
             '    "conditioning_data_dir": "mask_path",\n', "",
             (f"{KOHYA}::test_kohya_masked_run_equals_the_sdtrain_config_it_reads_as",)),
    Mutation("overflow-midway-no-state", "sdtrain/train/loop.py",
             "            bar.close()\n            raise self.overflow_with_state(error) from None\n",
             "            raise\n",
             (f"{GUARDS}::test_periodic_save_overflowing_fp16_saves_a_state_to_continue_from",)),
    Mutation("finished-state-without-adapter", "sdtrain/train/loop.py",
             ' and self.adapter_path(None).is_file():\n', ":\n",
             (f"{GUARDS}::test_final_save_overflowing_fp16_keeps_the_state_and_resume_writes_the_adapter",)),
]


def copy_project(target: Path) -> None:
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif source.exists():
            shutil.copy2(source, target / name)


def run_tests(project: Path, tests, timeout: float) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(project), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:warnings", *tests]
    try:
        done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    failed = [line.split(" ")[1] for line in done.stdout.splitlines() if line.startswith("FAILED ")]
    return done.returncode, (failed[0].split("::", 1)[1] if failed else done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this mutation")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutation's test run")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:26} {m.file}: {m.old.strip()!r} -> {m.new.strip()!r}")
        return 0
    survived = 0
    with tempfile.TemporaryDirectory(prefix="sdtrain-mutations-") as scratch:
        project = Path(scratch)
        copy_project(project)
        print(f"{'mutation':26} {'result':9} {'seconds':>7}  first failing test (or why)", flush=True)
        for m in chosen:
            path = project / m.file
            original = path.read_text()
            if original.count(m.old) != 1:
                print(f"{m.name:26} {'STALE':9} {0:7.0f}  {m.file} has {original.count(m.old)} copies of the text to "
                      "replace; update the mutation", flush=True)
                survived += 1
                continue
            path.write_text(original.replace(m.old, m.new))
            start = time.time()
            code, detail = run_tests(project, m.tests, args.timeout)
            path.write_text(original)
            caught = code not in (0, 5)  # 5: no tests ran
            survived += not caught
            print(f"{m.name:26} {'caught' if caught else 'SURVIVED':9} {time.time() - start:7.0f}  {detail}",
                  flush=True)
    print(f"{len(chosen) - survived} of {len(chosen)} mutations caught")
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main())
