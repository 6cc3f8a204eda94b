"""Divergence: a run whose adapters or optimizer state hold NaN/inf stops without writing them.

Before every adapter save and every training state (periodic, on a stop, at the end) the trainer calls
`check_before_save`: the trainable parameters and the optimizer's floating-point state are checked for
NaN/inf (one min/max pass per tensor, as `export.file_checks` does). A non-finite run raises
`TrainingDiverged` (exit code 2) and writes nothing, so the older states and adapters on disk, all finite, stay:
the message names the newest complete training state and the newest adapter exactly, with how to go on
from them. A state is only deleted (`save.keep_last_states`) after a newer finite one is written, so the
last finite state always survives a divergence.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdtrain.errors import UserError


class TrainingDiverged(UserError):
    """The loss or the adapter weights became NaN/inf."""


def _finite(tensor: torch.Tensor) -> bool:
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(low) & torch.isfinite(high))  # aminmax propagates NaN


def non_finite_groups(adapters) -> list[str]:
    """The adapters' parameter groups (unet, te1, te2) that hold NaN/inf, in order."""
    return [group for group in dict.fromkeys(adapters.groups.values())
            if not all(_finite(p) for p in adapters.parameters(group))]


def non_finite_optimizer_tensors(optimizer) -> int:
    """How many floating-point tensors of the optimizer's state hold NaN/inf."""
    count = 0
    for values in optimizer.state.values():
        stack = [values]
        while stack:
            value = stack.pop()
            if isinstance(value, torch.Tensor):
                count += not _finite(value)
            elif isinstance(value, dict):
                stack.extend(value.values())
            elif isinstance(value, (list, tuple)):
                stack.extend(value)
    return count


def last_finite(output_dir, last_adapter: Path | None) -> str:
    """Where the run's newest finite work is: the newest complete training state (with the command that
    resumes it) and the newest adapter saved."""
    from sdtrain.train.state import complete_states, states_root

    states = complete_states(states_root(output_dir))[0]
    if states:
        found = (f"the last finite training state is {states[-1]}: resume it with --resume {states[-1]} and a "
                 "lower optimizer.lr (--set optimizer.lr=...)")
    else:
        found = "no training state was written yet"
    adapter = f"the last finite adapter is {last_adapter}" if last_adapter else "no adapter was saved yet"
    return f"{found}; {adapter}"


def check_before_save(trainer, what: str) -> None:
    """Raise `TrainingDiverged` when the adapters or the optimizer state of `trainer` hold NaN/inf, before
    `what` (e.g. "the training state") is written."""
    groups = non_finite_groups(trainer.adapters)
    optimizer = non_finite_optimizer_tensors(trainer.optimizer) if getattr(trainer, "optimizer", None) else 0
    if not groups and not optimizer:
        return
    held = []
    if groups:
        held.append(f"parameter group(s) {', '.join(groups)} hold NaN/inf")
    if optimizer:
        held.append(f"{optimizer} optimizer state tensor(s) hold NaN/inf")
    raise TrainingDiverged(f"training diverged by step {trainer.global_step}: {' and '.join(held)}; {what} was not "
                           f"written. {last_finite(trainer.output_dir, trainer.last_save)}")
