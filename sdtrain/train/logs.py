"""Training logs: the per-step values kept on the device until a log, `loss_log.csv`, and the hyperparameters
given to the trackers (TensorBoard)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class StepRow:
    """One optimizer step's logged values, on the host."""

    step: int
    loss: float
    lr: float
    grad_norm: float | None = None


class PendingSteps:
    """The values of the steps since the last log, as the steps left them: losses and gradient norms as tensors
    on the device (reading one on the host would make it wait for the device), learning rates as floats.
    `take` brings them to the host in one transfer."""

    def __init__(self):
        self.rows: list[tuple[int, torch.Tensor, float, torch.Tensor | None]] = []

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, step: int, loss: torch.Tensor, lr: float, grad_norm: torch.Tensor | None = None) -> None:
        self.rows.append((step, loss.detach(), lr, None if grad_norm is None else grad_norm.detach()))

    def take(self, mean_over_processes=None, extra: list[torch.Tensor] = ()) -> tuple[list[StepRow], list[float]]:
        """(the pending rows with their values on the host, the values of the `extra` one-element tensors), read
        in one device-to-host copy, and clear. `mean_over_processes(tensor)`, when given, averages the stacked
        losses over processes first (a collective: every process takes at the same steps)."""
        rows, self.rows = self.rows, []
        parts = []
        if rows:
            losses = torch.stack([loss.float().reshape(()) for _, loss, _, _ in rows])
            parts.append(mean_over_processes(losses) if mean_over_processes is not None else losses)
        parts += [norm.float().reshape(1) for *_, norm in rows if norm is not None]
        parts += [value.float().reshape(1) for value in extra]
        values = torch.cat(parts).tolist() if parts else []  # the one transfer
        losses, values = values[:len(rows)], values[len(rows):]
        norms = iter(values)
        out = [StepRow(step, loss, lr, None if norm is None else next(norms))
               for (step, _, lr, norm), loss in zip(rows, losses)]
        return out, list(norms)


class ResumedCsv:
    """A CSV log with one row per step: a resumed run keeps the rows up to its start step and continues the
    file, so an interrupted and resumed run leaves the same log as a straight one. Only the main process writes
    (`enabled`)."""

    def __init__(self, path: Path, header: str, keep_until: int = 0, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if keep_until and path.is_file():
            kept = [line for line in path.read_text().splitlines()[1:] if int(line.split(",")[0]) <= keep_until]
        path.write_text(header + "\n" + "".join(line + "\n" for line in kept))

    def append(self, lines) -> None:
        lines = list(lines)
        if self.enabled and lines:
            with open(self.path, "a") as handle:
                handle.writelines(line + "\n" for line in lines)


class LossLog(ResumedCsv):
    """`loss_log.csv`: step, loss, learning rate per optimizer step. Rows are written at each log, save and stop
    (the loop keeps the values on the device in between)."""

    def __init__(self, path: Path, keep_until: int = 0, enabled: bool = True):
        super().__init__(path, "step,loss,lr", keep_until, enabled)

    def write(self, rows: list[StepRow]) -> None:
        self.append(f"{row.step},{row.loss!r},{row.lr!r}" for row in rows)


def tracker_hyperparameters(cfg) -> dict[str, bool | int | float | str]:
    """The resolved config as tracker hyperparameters: one entry per dotted key (subsets numbered), lists and
    tables as JSON text (trackers take only scalars)."""
    from sdtrain.config import config_to_flat_dict

    return {key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
            for key, value in config_to_flat_dict(cfg).items()}
