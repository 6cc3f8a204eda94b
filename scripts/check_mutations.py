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
    Mutation("huber-c", "sdtrain/train/loop.py", "cfg.train.loss, cfg.train.huber_c, weights)",
             "cfg.train.loss, 0.1, weights)", (f"{WIRING}::test_loss_options_reach_the_step",)),
    Mutation("min-snr", "sdtrain/train/loop.py", "        if cfg.train.min_snr_gamma:\n", "        if False:\n",
             (f"{WIRING}::test_loss_options_reach_the_step",)),
    Mutation("noise-offset", "sdtrain/train/loop.py", "generator, cfg.train.noise_offset)", "generator, 0.0)",
             (f"{WIRING}::test_loss_options_reach_the_step",)),
    Mutation("timestep-range", "sdtrain/train/loop.py", "generator, cfg.train.min_timestep, cfg.train.max_timestep,",
             "generator, 0, 1000,", (f"{WIRING}::test_loss_options_reach_the_step",)),
    Mutation("v-prediction", "sdtrain/train/loop.py",
             "prediction_type = prediction_type_of(scheduler, base.prediction_type)", 'prediction_type = "epsilon"',
             (f"{WIRING}::test_loss_options_reach_the_step",)),
    Mutation("clip-skip", "sdtrain/train/loop.py", "captions,\n                                      clip_skip=self.cfg.model.clip_skip)",
             "captions,\n                                      clip_skip=1)",
             (f"{WIRING}::test_clip_skip_and_the_text_encoder_cache",)),
    Mutation("te-cache-ignored", "sdtrain/train/loop.py", "        if self.text_cache is None:\n            return self.encode_text",
             "        if True:\n            return self.encode_text",
             (f"{WIRING}::test_clip_skip_and_the_text_encoder_cache",)),
    Mutation("caption-options", "sdtrain/train/batches.py", "augment_caption(record.caption, spec.captions, rng)",
             "record.caption", (f"{WIRING}::test_caption_options_and_flip_reach_the_text_encoder",)),
    Mutation("flip", "sdtrain/train/batches.py", "flip = spec.flip and rng.random() < 0.5", "flip = False",
             (f"{WIRING}::test_caption_options_and_flip_reach_the_text_encoder",)),
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
    Mutation("clip-norm-value", "sdtrain/train/loop.py", "self.cfg.train.max_grad_norm))", "1.0))",
             (f"{WIRING}::test_gradients_are_clipped_to_max_grad_norm",)),
    Mutation("mixed-precision", "sdtrain/train/accelerator.py", "Accelerator(mixed_precision=precision,",
             'Accelerator(mixed_precision="no",', (f"{WIRING}::test_mixed_precision_runs_the_unet_under_autocast",)),
    Mutation("gradient-checkpointing", "sdtrain/train/loop.py", "        if self.cfg.train.gradient_checkpointing:\n",
             "        if False:\n", ("tests/train/test_train_options.py::test_gradient_checkpointing_gives_the_same_run",)),
    Mutation("revision", "sdtrain/train/loop.py", "revision=model.revision,", "revision=None,",
             (f"{WIRING}::test_revision_and_variant_reach_the_hub_download",)),
    Mutation("variant", "sdtrain/train/loop.py", "variant=model.variant)", "variant=None)",
             (f"{WIRING}::test_revision_and_variant_reach_the_hub_download",)),
    Mutation("tracker-config", "sdtrain/train/loop.py", 'init_trackers("sdtrain", config=tracker_hyperparameters(cfg))',
             'init_trackers("sdtrain")', ("tests/train/test_train_e2e.py::test_train_end_to_end",)),
    Mutation("unread-key", "sdtrain/train/plan.py", "no_upscale=cfg.data.no_upscale)", "no_upscale=False)",
             (f"{WIRING}::test_every_config_key_is_read",)),
    Mutation("no-final-state", "sdtrain/train/loop.py", "        self.save_state()\n        self.result.final_adapter = final",
             "        self.result.final_adapter = final", (f"{STATE}::test_finished_default_run_resumes_to_more_steps",)),
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
