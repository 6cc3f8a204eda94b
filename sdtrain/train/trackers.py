"""Experiment trackers (accelerate's): which ones, what they get, sample grids.

`log.trackers` names accelerate trackers; each gets the logged scalars (loss, learning rate, grad norm,
validation loss), the resolved config as hyperparameters (`logs.tracker_hyperparameters`) and one grid of the
sample images per sampling step. TensorBoard writes under `log.log_dir`; wandb writes its run under
`log.log_dir` too and, with `WANDB_MODE=offline` in the environment, runs without network (`wandb sync` uploads
later).

The config schema takes `TRACKER_PACKAGES` from here, so nothing heavy is imported at module level.
"""

from __future__ import annotations

from pathlib import Path

# tracker name (accelerate's LoggerType) -> the package it needs (pip install name)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
PROJECT = "sdtrain"


def start_trackers(accelerator, cfg) -> None:
    """Start the configured trackers with the resolved config as hyperparameters."""
    from sdtrain.train.logs import tracker_hyperparameters

    init_kwargs = {"wandb": {"name": cfg.train.output_name, "dir": str(cfg.log.log_dir)}}
    accelerator.init_trackers(PROJECT, config=tracker_hyperparameters(cfg),
                              init_kwargs={k: v for k, v in init_kwargs.items() if k in cfg.log.trackers})


def sample_grid(paths: list[Path]):
    """The images side by side in one row (HWC uint8 array; shorter ones padded with black at the bottom)."""
    import numpy as np
    from PIL import Image

    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(np.asarray(image.convert("RGB")))
    height = max(image.shape[0] for image in images)
    return np.concatenate([np.pad(image, ((0, height - image.shape[0]), (0, 0), (0, 0))) for image in images], axis=1)


def log_sample_grid(accelerator, paths: list[Path], step: int, tag: str = "samples") -> None:
    """One grid of the sample images to every tracker (main process): TensorBoard as an image, wandb as one."""
    if not paths or not accelerator.is_main_process or not accelerator.trackers:
        return
    grid = sample_grid(paths)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: grid[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({tag: [grid]}, step=step)
