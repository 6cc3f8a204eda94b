"""Training logs: `loss_log.csv` and the hyperparameters given to the trackers (TensorBoard)."""

from __future__ import annotations

import json
from pathlib import Path


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


def tracker_hyperparameters(cfg) -> dict[str, bool | int | float | str]:
    """The resolved config as tracker hyperparameters: one entry per dotted key (subsets numbered), lists and
    tables as JSON text (trackers take only scalars)."""
    from sdtrain.config import config_to_flat_dict

    return {key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
            for key, value in config_to_flat_dict(cfg).items()}
