"""The run's accelerate `Accelerator`: device, processes, mixed precision, gradient accumulation and trackers.

accelerate keeps one precision per process (its `AcceleratorState`): a second run in the same process with
another `train.mixed_precision` is refused with a message instead of being half-applied.
"""

from __future__ import annotations

import logging
import os

import torch

from sdtrain.errors import UserError

log = logging.getLogger("sdtrain")


class DistributedSetupError(UserError):
    """Launched as several processes, but they do not form one process group."""


def make_accelerator(cfg):
    """accelerate's Accelerator for this run: CPU (gloo) when there is no GPU, mixed precision and gradient
    accumulation from the config, TensorBoard when `log.tensorboard` is on."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    on_cpu = not torch.cuda.is_available()
    precision = cfg.train.mixed_precision
    if on_cpu and precision == "fp16":
        log.warning("train.mixed_precision = 'fp16' needs a GPU; training in fp32 on the CPU")
        precision = "no"
    project = ProjectConfiguration(project_dir=str(cfg.train.output_dir), logging_dir=str(cfg.log.log_dir))
    # SDXL conditions on the text encoders' penultimate layers: adapters in CLIP-L's last layer get no gradient,
    # which DDP only accepts when it looks for unused parameters.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.network.train_text_encoder)
    try:
        accelerator = Accelerator(mixed_precision=precision, cpu=on_cpu,
                                  gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
                                  log_with="tensorboard" if cfg.log.tensorboard else None, project_config=project,
                                  kwargs_handlers=[ddp])
    except ValueError as error:
        if "already been initialized" not in str(error):
            raise
        raise UserError(f"train.mixed_precision = {precision!r}: this process already trained with another "
                        "precision, and accelerate keeps one per process; run each config in its own process "
                        "(one `sdtrain train` each)") from None
    check_distributed(accelerator)
    return accelerator


def check_distributed(accelerator, environ=None) -> None:
    """Fail loudly when a launcher started several processes that accelerate does not connect: they would
    each train their own copy with no gradient sync."""
    environ = os.environ if environ is None else environ
    launched = int(environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and accelerator.num_processes != launched:
        raise DistributedSetupError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but this process trains alone "
            f"(accelerate sees {accelerator.num_processes} process, distributed type "
            f"{accelerator.distributed_type}); the copies would train separately with no gradient sync. "
            "Launch with `accelerate launch --multi_gpu --num_processes N -m sdtrain train CONFIG` on GPUs, or "
            "`torchrun --nproc_per_node N -m sdtrain train CONFIG` (CPU: gloo), and do not set CUDA_VISIBLE_DEVICES "
            "to hide the GPUs from some processes")


def weight_dtype_for(accelerator) -> torch.dtype:
    """dtype of the frozen base weights: half precision with mixed precision on a GPU, else fp32."""
    if accelerator.device.type != "cuda":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
