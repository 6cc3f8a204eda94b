"""Resumable training state: save, find, check and load.

Every run writes a state at its end and when it is stopped (Ctrl+C, SIGTERM), and every
`save.state_every_n_steps` when set; the newest `save.keep_last_states` are kept. A state is a folder
`<output_dir>/states/step-<N>` holding:
- what accelerate's `save_state` writes: the optimizer (bitsandbytes 8-bit state included), the GradScaler
  and the RNG states of Python, NumPy, torch CPU and CUDA; never model weights (a save hook drops them, so
  a state of an adapter run is the adapter plus its optimizer state);
- `adapters.safetensors`: the trainable adapter parameters;
- `trainer_state.json`: global step, process count, dataset and base-model fingerprints and the resolved
  config it was trained with;
- `COMPLETE`: written last. A state is written into `states/.incomplete-step-<N>`, flushed to disk, then
  renamed into place, so a kill at any moment leaves the previous state loadable; folders without
  `COMPLETE` are skipped with a note.

The position inside training is the global step alone (see `sdtrain.train.plan`): the epoch, the batch index
within it, every random draw of a step and the learning-rate schedule follow from it, so resuming replays
exactly the remaining steps. `check_resumable` needs only the config and the plan: a resume that cannot work
fails before any model weights load.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from safetensors.torch import load_file, save_file

from sdtrain.errors import UserError
from sdtrain.files import fsync_dir, fsync_tree

STATE_DIR = "states"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
ADAPTERS = "adapters.safetensors"
FORMAT = 2

# Settings that change what the saved adapter and optimizer state mean: a state trained with other values
# cannot be resumed. Every other key may change between stop and resume; its new value applies from the
# resumed step on, and the change is noted.
INCOMPATIBLE_KEYS = (
    "network.type", "network.rank", "network.alpha", "network.conv_rank", "network.conv_alpha",
    "network.decompose_axis", "network.detach_norm", "network.preset", "network.include", "network.exclude",
    "network.train_unet", "network.train_text_encoder", "optimizer.type", "train.batch_size",
    "train.gradient_accumulation_steps", "train.seed",
)


class ResumeError(UserError):
    """A state cannot be resumed with this config (or was not found)."""


def states_root(output_dir) -> Path:
    return Path(output_dir) / STATE_DIR


# ---------------------------------------------------------------- saving


def _drop_model_weights(models, weights, output_dir) -> None:
    weights.clear()  # frozen base weights are never part of a state; adapters are saved by save_training_state


def _skip_model_loading(models, input_dir) -> None:
    models.clear()  # adapters are loaded by load_training_state


def register_state_hooks(accelerator) -> None:
    """Keep model weights out of accelerate's save_state/load_state (the adapters are saved on their own)."""
    accelerator.register_save_state_pre_hook(_drop_model_weights)
    accelerator.register_load_state_pre_hook(_skip_model_loading)


def state_info(cfg, plan, global_step: int, base_fingerprint: str, last_adapter: Path | None) -> dict:
    """What `trainer_state.json` records about a run at `global_step`."""
    from sdtrain.config import config_to_flat_dict

    return {
        "format": FORMAT,
        "global_step": global_step,
        "arch": plan.arch,
        "total_steps": plan.total_steps,
        "processes": plan.processes,
        "batches_consumed": global_step * plan.batches_per_step,
        "dataset_fingerprint": plan.dataset.fingerprint(),
        "base_fingerprint": base_fingerprint,
        "config": config_to_flat_dict(cfg),
        "last_adapter": str(last_adapter) if last_adapter else None,
        "saved_at": time.time(),
    }


def save_training_state(accelerator, output_dir, *, adapter_state: dict, info: dict, keep_last: int) -> Path:
    """Write a state at step `info["global_step"]`: accelerate's state, `adapter_state` (main process) and
    `info`; then keep only the newest `keep_last` states (0: all). Returns the state folder."""
    root = states_root(output_dir)
    step = int(info["global_step"])
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
        save_file({k: v.detach().to("cpu").contiguous() for k, v in adapter_state.items()}, str(temp / ADAPTERS))
        (temp / TRAINER_STATE).write_text(json.dumps(info, indent=1))
        (temp / COMPLETE).write_text("ok\n")
        fsync_tree(temp)
        replaced = root / f".replaced-step-{step:08d}"
        if final.exists():  # a state of this step from an earlier run: set aside until the new one is in place
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(temp, final)
        fsync_dir(root)
        shutil.rmtree(replaced, ignore_errors=True)
        if keep_last:
            for old in complete_states(root)[0][:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------- finding and checking


def complete_states(root: Path) -> tuple[list[Path], list[Path]]:
    """(loadable states oldest first, incomplete folders left by a run that stopped while saving)."""
    if not root.is_dir():
        return [], []
    found, incomplete = [], []
    for folder in sorted(root.iterdir()):
        if not folder.is_dir():
            continue
        if folder.name.startswith(".replaced-"):
            continue
        if folder.name.startswith(".incomplete-") or not (folder / COMPLETE).is_file():
            incomplete.append(folder)
        elif folder.name.startswith("step-"):
            found.append(folder)
    return found, incomplete


def find_state(output_dir, which: str | None) -> tuple[Path, list[str]]:
    """(state folder, notes) for `--resume latest` or `--resume PATH`."""
    if which in (None, "", "latest"):
        states, incomplete = complete_states(states_root(output_dir))
        notes = [f"skipping the incomplete training state {folder} (the run stopped while saving it)"
                 for folder in incomplete]
        if not states:
            raise ResumeError(f"--resume latest: no complete training state in {states_root(output_dir)}; a run "
                              "writes one when it ends or is stopped (Ctrl+C, SIGTERM) and every "
                              "save.state_every_n_steps. Start without --resume, or give a state folder "
                              "(--resume PATH)")
        return states[-1], notes
    path = Path(which)
    if not (path / TRAINER_STATE).is_file() or not (path / COMPLETE).is_file():
        raise ResumeError(f"--resume {which}: not a complete sdtrain training state (needs {TRAINER_STATE} and "
                          f"{COMPLETE}); use a folder under {states_root(output_dir)} or --resume latest")
    return path, []


def read_state_info(folder: Path) -> dict:
    info = json.loads((folder / TRAINER_STATE).read_text())
    if info.get("format") != FORMAT:
        raise ResumeError(f"{folder} is a training state of format {info.get('format')} (this sdtrain reads "
                          f"{FORMAT}); start a new run from its adapter with --init-from {folder / ADAPTERS}")
    return info


def check_resumable(info: dict, cfg, plan) -> list[str]:
    """ResumeError for changes that make the state unusable; notes (returned) for the keys that changed.
    Needs no model weights."""
    from sdtrain.config import config_to_flat_dict

    saved, now = info["config"], config_to_flat_dict(cfg)
    problems, notes = [], []
    for key in sorted(saved.keys() | now.keys()):
        old, new = saved.get(key), now.get(key)
        if old == new:
            continue
        if key in INCOMPATIBLE_KEYS:
            problems.append(f"{key} was {old!r}, now {new!r}")
        elif key == "model.path":
            notes.append(f"model.path changed from {old!r} to {new!r}; the weights are checked against the "
                         "state's base model after loading")
        else:
            notes.append(f"{key} changed from {old!r} to {new!r}; the new value applies from step "
                         f"{info['global_step']} on")
    if info["dataset_fingerprint"] != plan.dataset.fingerprint():
        problems.append("the dataset changed (images, repeats or buckets differ from the state's)")
    if info["processes"] != plan.processes:
        problems.append(f"the state was trained with {info['processes']} process(es), this run has "
                        f"{plan.processes}: the data order per process would differ; launch with "
                        f"--num_processes {info['processes']}")
    if problems:
        raise ResumeError("cannot resume: " + "; ".join(problems)
                          + ". Revert these settings, or start a new run (use --init-from ADAPTER to start from "
                            "the trained adapter with a fresh optimizer)")
    return notes


def check_base(info: dict, base_fingerprint: str) -> None:
    if info["base_fingerprint"] != base_fingerprint:
        raise ResumeError("cannot resume: the base model (model.path) is not the one the state was trained on; "
                          "point model.path at that model, or start a new run with --init-from ADAPTER")


# ---------------------------------------------------------------- loading


def load_training_state(accelerator, folder: Path) -> dict:
    """Restore accelerate's state (optimizer, scaler, RNG) from `folder`; returns the saved adapter state."""
    accelerator.load_state(str(folder))
    return load_file(str(folder / ADAPTERS))
