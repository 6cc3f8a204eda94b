"""Resumable training state: save, find, check and load.

Every run writes a state at its end and when it is stopped (Ctrl+C, SIGTERM), and every
`save.state_every_n_steps` when set; the newest `save.keep_last_states` are kept. A state is a folder
`<output_dir>/states/step-<N>` holding:
- `optimizer.safetensors` + `optimizer.json`: the optimizer's `state_dict()` (bitsandbytes' 8-bit state
  included), written by `sdtrain.train.state_codec` (tensors in safetensors, the structure in JSON);
- `rng-<process>.safetensors` + `.json`: the RNG states of Python, NumPy, torch CPU and CUDA of each process;
  `scaler.*`: the GradScaler's state (fp16 mixed precision);
- `adapters.safetensors`: the trainable adapter parameters; never the frozen model weights;
- `trainer_state.json`: global step, process count, dataset and base-model fingerprints and the resolved
  config it was trained with;
- `COMPLETE`: written last.

Nothing in a state is a pickle and nothing is unpickled when one is loaded (safetensors and JSON only), so a
state cannot run code; `model.allow_pickle` does not apply to states. A state holding a pickle file (which
sdtrain never writes: someone added it) is refused, and so is a state of format 2 (accelerate's pickled files).

Replacement is atomic: a state is written into `states/.incomplete-step-<N>`, flushed to disk, then renamed
into place; a state of the same step that is already there is first renamed aside
(`.replaced-step-<N>`) and deleted only after the new one is in place. A kill at any moment leaves a
complete state: `recover_states` (run before a resume and before every run, under the output folder's lock)
finishes an interrupted replacement (a complete `.incomplete-*` folder is the newest write of its step and
is renamed into place) and removes folders a killed save left half-written.

The position inside training is the global step alone (see `sdtrain.train.plan`): the epoch, the batch index
within it, every random draw of a step and the learning-rate schedule follow from it, so resuming replays
exactly the remaining steps. `check_resumable` needs only the config and the plan: a resume that cannot work
fails before any model weights load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from sdtrain.errors import UserError
from sdtrain.files import fsync_dir, fsync_tree, write_fault

STATE_DIR = "states"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
ADAPTERS = "adapters.safetensors"
OPTIMIZER = "optimizer"  # optimizer.safetensors + optimizer.json
SCALER = "scaler"
FORMAT = 3
INCOMPLETE_PREFIX = ".incomplete-"
REPLACED_PREFIX = ".replaced-"

# Settings that change what the saved adapter and optimizer state mean: a state trained with other values
# cannot be resumed. Every other key may change between stop and resume; its new value applies from the
# resumed step on, and the change is noted.
INCOMPATIBLE_KEYS = (
    "network.type", "network.rank", "network.alpha", "network.conv_rank", "network.conv_alpha",
    "network.decompose_axis", "network.detach_norm", "network.preset", "network.include", "network.exclude",
    "network.train_unet", "network.train_text_encoder", "optimizer.type", "train.batch_size",
    "train.gradient_accumulation_steps", "train.seed",
)

# Keys that decide the learning-rate schedule: a change re-plans it from the new totals (see
# `Trainer._setup_lr_scheduler`, which positions the new schedule at the resumed step).
SCHEDULE_KEYS = ("train.max_steps", "train.epochs", "scheduler.type", "scheduler.warmup_steps",
                 "scheduler.num_cycles", "scheduler.power")
# Sections whose other keys change what a step computes (data, loss, noise, timesteps, optimizer settings):
# a change applies from the resumed step on and is noted as making the run differ from a straight one.
TRAINING_PREFIXES = ("data.", "train.", "optimizer.", "network.", "model.")
# Keys in those sections that change where and how fast the run works, not what it computes.
NOT_TRAINING_KEYS = ("train.output_dir", "train.output_name", "train.gradient_checkpointing", "data.cache_dir",
                     "data.cache_latents", "data.cache_text_encoder_outputs", "data.num_workers", "model.revision",
                     "model.allow_pickle")


class ResumeError(UserError):
    """A state cannot be resumed with this config (or was not found)."""


def states_root(output_dir) -> Path:
    return Path(output_dir) / STATE_DIR


def rng_name(process_index: int) -> str:
    return f"rng-{process_index}"


# ---------------------------------------------------------------- saving


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


def save_training_state(accelerator, output_dir, *, optimizer, adapter_state: dict, info: dict,
                        keep_last: int) -> Path:
    """Write a state at step `info["global_step"]`: `optimizer`'s state, accelerate's GradScaler, every
    process's RNG states, `adapter_state` and `info`; then keep only the newest `keep_last` states (0: all).
    Returns the state folder. A write fault (full disk, read-only, file-size limit) raises `WriteError`;
    the previous states are kept."""
    from sdtrain.train.state_codec import rng_state, save_tree, tree_bytes

    root = states_root(output_dir)
    step = int(info["global_step"])
    final = root / f"step-{step:08d}"
    temp = root / f"{INCOMPLETE_PREFIX}{final.name}"
    if accelerator.is_main_process:
        with _faults(temp, "the previous training states are kept"):
            root.mkdir(parents=True, exist_ok=True)
            if temp.exists():
                shutil.rmtree(temp)
            temp.mkdir()
    accelerator.wait_for_everyone()
    with _faults(temp, "the previous training states are kept"):
        save_tree(temp, rng_name(accelerator.process_index), rng_state())
        if accelerator.is_main_process:
            optimizer_state = optimizer.state_dict()
            needed = tree_bytes(optimizer_state) + sum(v.numel() * v.element_size() for v in adapter_state.values())
            try:
                save_tree(temp, OPTIMIZER, optimizer_state)
                if accelerator.scaler is not None:
                    save_tree(temp, SCALER, accelerator.scaler.state_dict())
                from safetensors.torch import save_file

                save_file({k: v.detach().to("cpu").contiguous() for k, v in adapter_state.items()},
                          str(temp / ADAPTERS))
                (temp / TRAINER_STATE).write_text(json.dumps(info, indent=1))
                (temp / COMPLETE).write_text("ok\n")
                fsync_tree(temp)
            except BaseException as error:
                shutil.rmtree(temp, ignore_errors=True)
                fault = write_fault(error, temp / "optimizer.safetensors", needed,
                                    kept="the previous training states are kept") if isinstance(error, Exception) else None
                if fault is not None:
                    raise fault from error
                raise
    if accelerator.is_main_process:
        replace_state(temp, final)
        if keep_last:
            for old in complete_states(root)[0][:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class _faults:
    """Turn a write fault inside the block into `WriteError` about `path` (other errors pass through)."""

    def __init__(self, path: Path, kept: str):
        self.path, self.kept = path, kept

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if isinstance(error, Exception) and not isinstance(error, UserError):
            fault = write_fault(error, self.path, kept=self.kept)
            if fault is not None:
                raise fault from error
        return False


def _set_aside(final: Path, replaced: Path) -> None:
    os.replace(final, replaced)


def replace_state(temp: Path, final: Path) -> None:
    """Put the complete state `temp` at `final`: an existing `final` is renamed aside, `temp` renamed in,
    then the old one deleted; every moment leaves a complete state of the step on disk (see
    `recover_states`)."""
    replaced = final.parent / f"{REPLACED_PREFIX}{final.name}"
    if final.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        _set_aside(final, replaced)
    os.replace(temp, final)
    fsync_dir(final.parent)
    shutil.rmtree(replaced, ignore_errors=True)


def recover_states(root: Path) -> list[str]:
    """Finish what a killed save left in `root` (main process, under the output folder's lock); returns notes.

    A complete `.incomplete-step-N` is the newest write of step N: it replaces `step-N` (as `replace_state`
    would have). A `.replaced-step-N` is deleted once `step-N` is in place, or renamed back when it is the
    only complete copy. Folders without `COMPLETE` are half-written and removed."""
    if not root.is_dir():
        return []
    notes = []
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or not folder.name.startswith(INCOMPLETE_PREFIX):
            continue
        final = root / folder.name[len(INCOMPLETE_PREFIX):]
        if (folder / COMPLETE).is_file() and final.name.startswith("step-"):
            replace_state(folder, final)
            notes.append(f"completed the interrupted replacement of the training state {final} (a run was "
                         "stopped while renaming it into place)")
        else:
            shutil.rmtree(folder, ignore_errors=True)
            notes.append(f"removed the incomplete training state {folder} (a run stopped while saving it)")
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or not folder.name.startswith(REPLACED_PREFIX):
            continue
        final = root / folder.name[len(REPLACED_PREFIX):]
        if (final / COMPLETE).is_file() or not (folder / COMPLETE).is_file():
            shutil.rmtree(folder, ignore_errors=True)
        else:
            os.replace(folder, final)
            notes.append(f"restored the training state {final} that a stopped save had set aside")
    fsync_dir(root)
    return notes


# ---------------------------------------------------------------- finding and checking


def complete_states(root: Path) -> tuple[list[Path], list[Path]]:
    """(loadable states oldest first, folders a run left while saving: see `recover_states`)."""
    if not root.is_dir():
        return [], []
    found, incomplete = [], []
    for folder in sorted(root.iterdir()):
        if not folder.is_dir():
            continue
        if folder.name.startswith((INCOMPLETE_PREFIX, REPLACED_PREFIX)) or not (folder / COMPLETE).is_file():
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
    try:
        info = json.loads((folder / TRAINER_STATE).read_text())
    except (OSError, ValueError) as error:
        raise ResumeError(f"cannot resume from {folder}: {TRAINER_STATE} is unreadable ({error}); resume from "
                          "another state (--resume PATH)") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        version = info.get("format") if isinstance(info, dict) else None
        raise ResumeError(f"{folder} is a training state of format {version} (this sdtrain reads {FORMAT}, "
                          "which holds no pickle; format 2 stored accelerate's pickled optimizer and RNG files, "
                          f"which sdtrain does not unpickle); start a new run from its adapter with --init-from "
                          f"{folder / ADAPTERS}")
    return info


def check_resumable(info: dict, cfg, plan) -> list[str]:
    """ResumeError for changes that make the state unusable; notes (returned) for the keys that changed.
    Needs no model weights."""
    from sdtrain.config import config_to_flat_dict

    saved, now = info["config"], config_to_flat_dict(cfg)
    problems, notes, step = [], [], int(info["global_step"])
    for key in sorted(saved.keys() | now.keys()):
        old, new = saved.get(key), now.get(key)
        if old == new:
            continue
        if key in INCOMPATIBLE_KEYS or key.startswith("network.blocks."):  # blocks: ranks and parameter groups
            problems.append(f"{key} was {old!r}, now {new!r}")
        elif key == "model.path":
            notes.append(f"model.path changed from {old!r} to {new!r}; the weights are checked against the "
                         "state's base model after loading")
        elif key in SCHEDULE_KEYS:
            notes.append(f"{key} changed from {old!r} to {new!r}; re-planned: the learning-rate schedule is "
                         f"recomputed for {plan.total_steps} steps, and from step {step + 1} on the rates are "
                         "those of a straight run with the new settings")
        elif key.startswith(TRAINING_PREFIXES) and key not in NOT_TRAINING_KEYS:
            notes.append(f"{key} changed from {old!r} to {new!r}; re-planned: steps {step + 1} to "
                         f"{plan.total_steps} use the new value, steps 1 to {step} were trained with the old one "
                         "(the result differs from a straight run with either)")
        else:
            notes.append(f"{key} changed from {old!r} to {new!r}; the new value applies from step {step + 1} on")
    if info["dataset_fingerprint"] != plan.dataset.fingerprint():
        problems.append("the dataset changed (images, captions, repeats or buckets differ from the state's)")
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

_STATE_FILE = re.compile(r"(optimizer|scaler|rng-\d+)\.(safetensors|json)")


def check_state_files(folder: Path) -> None:
    """Refuse a state that holds a file sdtrain never writes and that could run code when loaded (a pickle,
    a torch.save archive): the state was changed after it was written."""
    from sdtrain.train.state_codec import looks_like_pickle

    known = {COMPLETE, TRAINER_STATE, ADAPTERS}
    foreign = [path for path in sorted(folder.iterdir())
               if path.name not in known and not _STATE_FILE.fullmatch(path.name)
               and (path.is_dir() or looks_like_pickle(path))]
    if foreign:
        names = ", ".join(path.name for path in foreign)
        raise ResumeError(f"cannot resume from {folder}: it holds {names}, which sdtrain never writes into a "
                          "training state (pickle files can run code when loaded; sdtrain loads none). The "
                          "state was changed after it was written: delete these files if you trust the rest of "
                          "it, or start a new run")


def load_training_state(accelerator, folder: Path, optimizer) -> dict:
    """Restore the optimizer, the GradScaler and this process's RNG states from `folder` (safetensors and
    JSON only); returns the saved adapter state."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from sdtrain.train.state_codec import load_tree, set_rng_state, tree_files

    check_state_files(folder)
    name = ADAPTERS
    try:
        adapters = load_file(str(folder / ADAPTERS))
        name = tree_files(OPTIMIZER)[0]
        optimizer.load_state_dict(load_tree(folder, OPTIMIZER))
        if accelerator.scaler is not None and (folder / tree_files(SCALER)[1]).is_file():
            name = tree_files(SCALER)[0]
            accelerator.scaler.load_state_dict(load_tree(folder, SCALER))
        name = tree_files(rng_name(accelerator.process_index))[0]
        set_rng_state(load_tree(folder, rng_name(accelerator.process_index)))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as error:
        raise ResumeError(f"cannot resume from {folder}: {name} (or its .json) is damaged or missing "
                          f"({type(error).__name__}: {str(error)[:200]}); resume from another state "
                          "(--resume PATH) or start a new run with --init-from ADAPTER") from None
    return adapters
