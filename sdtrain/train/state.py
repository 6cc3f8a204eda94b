"""Resumable training state: save, find, check and load.

A state is a folder `<output_dir>/states/step-<N>` holding:
- what accelerate's `save_state` writes: optimizer (bitsandbytes 8-bit state included), GradScaler, the LR
  scheduler (registered for checkpointing) and the RNG states of Python, NumPy, torch CPU and CUDA;
- `adapters.safetensors`: the trainable adapter parameters (never the frozen base weights; accelerate's
  model saving is redirected here by a save hook);
- `trainer_state.json`: global step, process count, the plan's position, dataset and base-model
  fingerprints and the network/optimizer config it was trained with;
- `COMPLETE`: written last. A state is written into `states/.incomplete-step-<N>`, flushed to disk, then
  renamed into place, so a kill at any moment leaves the previous state loadable; folders without
  `COMPLETE` are ignored with a warning.

The position inside training is the global step alone (see `sdtrain.train.plan`): the epoch, the batch index
within it and every random draw of a step follow from it, so resuming replays exactly the remaining steps.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path

from safetensors.torch import load_file, save_file

from sdtrain.errors import UserError
from sdtrain.files import fsync_dir, fsync_tree

STATE_DIR = "states"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
ADAPTERS = "adapters.safetensors"
FORMAT = 1

# Settings that change what is trained: a state trained with other values cannot be resumed.
INCOMPATIBLE_KEYS = {
    "network": ("type", "rank", "alpha", "conv_rank", "conv_alpha", "decompose_axis", "detach_norm", "preset",
                "include", "exclude", "train_unet", "train_text_encoder"),
    "optimizer": ("type",),
    "train": ("batch_size", "gradient_accumulation_steps", "seed"),
}
# Settings that may change between stop and resume (the new value applies from the resumed step on).
COMPATIBLE_KEYS = {
    "train": ("max_steps", "epochs", "max_grad_norm", "output_name"),
    "optimizer": ("lr", "unet_lr", "text_encoder_lr", "text_encoder_2_lr", "weight_decay"),
    "save": ("every_n_steps", "every_n_epochs", "keep_last", "state_every_n_steps", "keep_last_states"),
    "sample": ("every_n_steps",),
}


class ResumeError(UserError):
    """A state cannot be resumed with this config (or was not found)."""


def states_root(output_dir) -> Path:
    return Path(output_dir) / STATE_DIR


def _section_values(cfg, keys: dict) -> dict:
    return {f"{section}.{key}": _plain(getattr(getattr(cfg, section), key)) for section, names in keys.items()
            for key in names}


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _hang_if_asked(step: int) -> None:
    """Test hook: with SDTRAIN_TEST_HANG_IN_STATE_SAVE=<step>, touch the file SDTRAIN_TEST_HANG_MARKER names and
    stop forever in the middle of that step's state save, so a test can SIGKILL the process there."""
    target = os.environ.get("SDTRAIN_TEST_HANG_IN_STATE_SAVE")
    if target and int(target) == step:
        Path(os.environ["SDTRAIN_TEST_HANG_MARKER"]).touch()
        while True:
            time.sleep(1)


def install_hooks(trainer) -> None:
    """Route accelerate's model saving to adapter-only files and register the LR scheduler."""
    accelerator = trainer.accelerator

    def save_hook(models, weights, output_dir):
        weights.clear()  # frozen base weights are never part of a state
        if accelerator.is_main_process:
            state = {k: v.detach().to("cpu").contiguous() for k, v in trainer.adapters.trainable_state_dict().items()}
            save_file(state, os.path.join(output_dir, ADAPTERS))

    def load_hook(models, input_dir):
        models.clear()  # adapters are loaded here, not by accelerate
        state = load_file(os.path.join(input_dir, ADAPTERS))
        trainer.adapters.load_trainable_state_dict(state)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    accelerator.register_for_checkpointing(trainer.lr_scheduler)


def trainer_state(trainer) -> dict:
    plan = trainer.plan
    return {
        "format": FORMAT,
        "global_step": trainer.global_step,
        "total_steps": plan.total_steps,
        "processes": plan.processes,
        "batches_consumed": trainer.global_step * plan.batches_per_step,
        "dataset_fingerprint": plan.dataset.fingerprint(),
        "base_fingerprint": trainer.base.fingerprint,
        "incompatible": _section_values(trainer.cfg, INCOMPATIBLE_KEYS),
        "compatible": _section_values(trainer.cfg, COMPATIBLE_KEYS),
        "last_adapter": str(trainer.last_save) if trainer.last_save else None,
        "saved_at": time.time(),
    }


def save_training_state(trainer) -> Path | None:
    """Write the state of `trainer` at its current global step; returns the state folder (main process)."""
    accelerator = trainer.accelerator
    root = states_root(trainer.output_dir)
    step = trainer.global_step
    final = root / f"step-{step:08d}"
    temp = root / f".incomplete-step-{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if temp.exists():
            shutil.rmtree(temp)
        temp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temp), safe_serialization=True)
    if accelerator.is_main_process:
        (temp / TRAINER_STATE).write_text(json.dumps(trainer_state(trainer), indent=1))
        _hang_if_asked(step)
        (temp / COMPLETE).write_text("ok\n")
        fsync_tree(temp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temp, final)
        fsync_dir(root)
        _prune_states(root, trainer.cfg.save.keep_last_states)
    accelerator.wait_for_everyone()
    return final


def _prune_states(root: Path, keep: int) -> None:
    if not keep:
        return
    for old in complete_states(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def complete_states(root: Path) -> list[Path]:
    """Loadable states, oldest first; incomplete folders are reported with a warning and skipped."""
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(root.iterdir()):
        if not folder.is_dir():
            continue
        if folder.name.startswith(".incomplete-") or not (folder / COMPLETE).is_file():
            warnings.warn(f"ignoring incomplete training state {folder} (the run stopped while saving it)")
            continue
        if folder.name.startswith("step-"):
            found.append(folder)
    return found


def find_state(output_dir, which: str) -> Path:
    """The state folder for `--resume latest` or `--resume PATH`."""
    if which in (None, "", "latest"):
        states = complete_states(states_root(output_dir))
        if not states:
            raise ResumeError(f"--resume latest: no complete training state in {states_root(output_dir)}; "
                              f"turn on save.state_every_n_steps for the run, or give a state folder")
        return states[-1]
    path = Path(which)
    if not (path / TRAINER_STATE).is_file() or not (path / COMPLETE).is_file():
        raise ResumeError(f"--resume {which}: not a complete sdtrain training state (needs {TRAINER_STATE} and "
                          f"{COMPLETE}); use a folder under {states_root(output_dir)} or --resume latest")
    return path


def check_compatible(saved: dict, trainer) -> list[str]:
    """ResumeError for changes that alter what is trained; warnings (returned) for allowed changes."""
    problems, notes = [], []
    now = _section_values(trainer.cfg, INCOMPATIBLE_KEYS)
    for key, old in saved["incompatible"].items():
        if key in now and now[key] != old:
            problems.append(f"{key} was {old!r}, now {now[key]!r}")
    if saved["base_fingerprint"] != trainer.base.fingerprint:
        problems.append("the base model (model.path) is not the one the state was trained on")
    if saved["dataset_fingerprint"] != trainer.plan.dataset.fingerprint():
        problems.append("the dataset changed (images, repeats or buckets differ from the state's)")
    if saved["processes"] != trainer.plan.processes:
        problems.append(f"the state was trained with {saved['processes']} process(es), this run has "
                        f"{trainer.plan.processes}: the data order per process would differ; launch with "
                        f"--num_processes {saved['processes']}")
    if problems:
        raise ResumeError("cannot resume: " + "; ".join(problems)
                          + ". Revert these settings, or start a new run (use --init-from ADAPTER to start from "
                            "the trained adapter with a fresh optimizer)")
    compat_now = _section_values(trainer.cfg, COMPATIBLE_KEYS)
    for key, old in saved["compatible"].items():
        if key in compat_now and compat_now[key] != old:
            notes.append(f"{key} changed from {old!r} to {compat_now[key]!r}; the new value applies from here")
    return notes


def load_training_state(trainer, which: str) -> int:
    """Load a state into a set-up trainer; returns the global step to continue from."""
    folder = find_state(trainer.output_dir, which)
    saved = json.loads((folder / TRAINER_STATE).read_text())
    for note in check_compatible(saved, trainer):
        warnings.warn(note)
        trainer.say(f"warning: {note}")
    base_lrs = [group["initial_lr"] for group in trainer.optimizer.param_groups]
    trainer.accelerator.load_state(str(folder))
    if list(trainer.lr_scheduler.base_lrs) != base_lrs:
        # a changed learning rate: keep the schedule's position, apply it to the new base rates
        trainer.lr_scheduler.base_lrs = base_lrs
        for group, lr in zip(trainer.optimizer.param_groups, base_lrs):
            group["initial_lr"] = lr
        _recompute_lrs(trainer)
    if saved.get("last_adapter"):
        trainer.last_save = Path(saved["last_adapter"])
    trainer.say(f"loaded training state {folder}")
    step = int(saved["global_step"])
    if step >= trainer.plan.total_steps:
        trainer.say(f"the state is at step {step}, training ends at step {trainer.plan.total_steps}: nothing to do")
    return step


def _recompute_lrs(trainer) -> None:
    """Current learning rates from the base rates and the restored schedule position."""
    scheduler = trainer.lr_scheduler
    for group, base_lr, fn in zip(trainer.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in trainer.optimizer.param_groups]
