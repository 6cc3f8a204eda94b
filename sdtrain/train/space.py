"""Disk space and file size a run needs in `train.output_dir`, checked before the model loads.

From the plan (trainable parameters, steps) and the save settings, an upper estimate of what the run writes:
the final adapter (`save.dtype`), the intermediate adapters that are kept (`save.every_n_steps`,
`save.every_n_epochs`, `save.keep_last`), and the training states that exist at once (`save.keep_last_states`,
plus the one being written): fp32 adapter parameters and the optimizer's state (bytes per parameter by
optimizer, the 32-bit size for the 8-bit ones, whose small tensors keep 32-bit state). What the folder already
holds of these (a resumed run's states and adapters) is counted as available. A run that would not fit exits
with code 2 before any weights load, naming the folder, the sizes and the settings that shrink them; so does
a run whose largest file is over the process's file-size limit (`ulimit -f`).

Samples, logs and the latent/text caches (small next to these) are not counted. Faults that still happen
(another program fills the disk) are reported by `sdtrain.files.WriteError` where they occur.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from sdtrain.errors import UserError
from sdtrain.files import file_size_limit, free_bytes, human_bytes

# optimizer state bytes per trainable parameter (upper estimates: 8-bit optimizers keep small tensors in fp32)
OPTIMIZER_STATE_BYTES = {"AdamW": 8, "AdamW8bit": 8, "PagedAdamW8bit": 8, "Lion8bit": 4, "Adafactor": 8,
                         "Prodigy": 16, "SGD": 4}
SAVE_DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
HEADER_BYTES = 1 << 20  # safetensors headers, metadata and the JSON files of a state, generously


class NotEnoughSpace(UserError):
    """The output folder's filesystem (or the file-size limit) cannot hold what the run will write."""


@dataclass
class OutputSize:
    adapter: int  # one adapter file
    adapters: int  # how many adapter files exist at once (final + kept intermediates)
    state: int  # one training state
    states: int  # how many states exist at once
    largest_file: int

    @property
    def total(self) -> int:
        return self.adapter * self.adapters + self.state * self.states


def output_size(cfg, plan) -> OutputSize | None:
    """The estimate for `cfg` and its plan; None when the plan has no parameter count."""
    params = plan.trainable_params
    if not params:
        return None
    save, steps = cfg.save, plan.total_steps
    adapter = params * SAVE_DTYPE_BYTES.get(save.dtype, 4) + HEADER_BYTES
    saves = steps // save.every_n_steps if save.every_n_steps else 0
    if save.every_n_epochs and plan.steps_per_epoch:
        saves += int(steps / plan.steps_per_epoch) // save.every_n_epochs
    kept = min(saves, save.keep_last) if save.keep_last else saves
    optimizer = params * OPTIMIZER_STATE_BYTES.get(cfg.optimizer.type, 16)
    state = params * 4 + optimizer + HEADER_BYTES
    written = math.ceil(steps / save.state_every_n_steps) + 1 if save.state_every_n_steps else 1
    states = min(written, save.keep_last_states + 1) if save.keep_last_states else written
    return OutputSize(adapter, 1 + kept, state, states, max(adapter, optimizer + HEADER_BYTES))


def _existing_bytes(output_dir: Path, output_name: str) -> int:
    """Bytes of this run's adapters and states already in the folder (they are replaced, not added to)."""
    from sdtrain.train.state import states_root

    total = 0
    paths = list(output_dir.glob(f"{output_name}*.safetensors"))
    root = states_root(output_dir)
    if root.is_dir():
        paths += [p for p in root.rglob("*") if p.is_file()]
    for path in paths:
        try:
            total += path.stat().st_size
        except OSError:
            pass
    return total


def check_output_space(cfg, plan) -> OutputSize | None:
    """Raise `NotEnoughSpace` when the run's files cannot fit (see the module's doc); returns the estimate."""
    size = output_size(cfg, plan)
    if size is None:
        return None
    folder = Path(cfg.train.output_dir)
    limit = file_size_limit()
    if limit is not None and size.largest_file > limit:
        raise NotEnoughSpace(f"train.output_dir {folder}: this process may write files of at most "
                             f"{human_bytes(limit)} (ulimit -f), and the run writes files of about "
                             f"{human_bytes(size.largest_file)} (its adapter and optimizer state); raise the limit "
                             "(`ulimit -f unlimited` in the shell that starts sdtrain)")
    free = free_bytes(folder)
    needed = size.total - _existing_bytes(folder, cfg.train.output_name)
    if free is not None and needed > free:
        raise NotEnoughSpace(
            f"train.output_dir {folder}: the run needs about {human_bytes(needed)} more, and its filesystem has "
            f"{human_bytes(free)} free ({size.adapters} adapter file(s) of {human_bytes(size.adapter)}, "
            f"{size.states} training state(s) of {human_bytes(size.state)} at once). Free some space there, "
            "choose another train.output_dir, or keep fewer files (save.keep_last, save.keep_last_states, "
            "save.dtype = \"bf16\")")
    return size
