"""Optimizer and learning-rate schedule from the `[optimizer]` / `[scheduler]` config sections.

Optimizers: torch `AdamW` and `SGD`; bitsandbytes `AdamW8bit`, `PagedAdamW8bit`, `Lion8bit` (these run on CPU
too; "paged" falls back to ordinary memory there); transformers `Adafactor`; `Prodigy` from the optional
`prodigyopt` package.

bitsandbytes keeps the state of parameters with fewer than `min_8bit_size` (default 4096) elements in 32 bits;
small adapter matrices (rank 4 on a 320-wide layer has 1280 elements) therefore get 32-bit state unless
`optimizer.args.min_8bit_size` is lowered. We keep bitsandbytes' default. The Adam ones update those small
32-bit-state tensors on the CPU together (`optim_bnb.grouped_small_updates`, same formula as bitsandbytes).

Schedules are diffusers' `get_scheduler`: a multiplier of each group's own learning rate, stepped once per
optimizer step.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from sdtrain.errors import ConfigError, UserError

OPTIMIZER_TYPES = ("AdamW", "AdamW8bit", "PagedAdamW8bit", "Lion8bit", "Adafactor", "Prodigy", "SGD")
SCHEDULER_TYPES = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial")

if TYPE_CHECKING:
    import torch

# Keys set from their own config entries; `optimizer.args` may not set them again.
_OWN_KEYS = {"params": "the parameter groups", "lr": "optimizer.lr", "weight_decay": "optimizer.weight_decay"}


def optimizer_class(type: str):
    """The optimizer class for a config `optimizer.type`."""
    import torch

    if type == "AdamW":
        return torch.optim.AdamW
    if type == "SGD":
        return torch.optim.SGD
    if type in ("AdamW8bit", "PagedAdamW8bit", "Lion8bit"):
        import bitsandbytes as bnb

        from sdtrain.train.optim_bnb import grouped_small_updates

        cls = getattr(bnb.optim, type)
        return cls if type == "Lion8bit" else grouped_small_updates(cls)
    if type == "Adafactor":
        from transformers.optimization import Adafactor

        return Adafactor
    if type == "Prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise UserError("optimizer.type = 'Prodigy' needs `pip install prodigyopt` (or pick another optimizer.type: "
                            + ", ".join(t for t in OPTIMIZER_TYPES if t != "Prodigy") + ")") from None
        return Prodigy
    raise ConfigError(f"optimizer.type = {type!r} is not supported; use one of {', '.join(OPTIMIZER_TYPES)}")


def _accepted_keywords(cls) -> tuple[set[str], bool]:
    """Keyword names of `cls.__init__` and whether it also takes **kwargs."""
    params = inspect.signature(cls.__init__).parameters
    names = {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return names, any(p.kind == p.VAR_KEYWORD for p in params.values())


def build_optimizer(
    param_groups: list[dict],
    type: str,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] | list[float] | None = None,
    eps: float | None = None,
    args: dict[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """Build the optimizer over `param_groups` (dicts with `params`, `lr`, `name`; each group's lr wins over `lr`).

    `betas` / `eps` of None keep the optimizer's default; `args` are extra keyword arguments checked against
    the optimizer's signature. Adafactor gets `relative_step=False, scale_parameter=False, warmup_init=False`
    (a fixed, scheduled lr) unless `args` says otherwise; with `args.relative_step = true` it ignores `lr`.
    """
    cls = optimizer_class(type)
    args = dict(args or {})
    accepted, takes_any = _accepted_keywords(cls)

    for key in args:
        if key in _OWN_KEYS:
            raise ConfigError(f"optimizer.args.{key} is not allowed: set {_OWN_KEYS[key]} instead")
        if key not in accepted and not takes_any:
            raise ConfigError(f"optimizer.args.{key} is not an argument of {type}; accepted: "
                              + ", ".join(sorted(accepted - set(_OWN_KEYS))))

    kwargs: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
    for key, value in (("betas", betas), ("eps", eps)):
        if value is None:
            continue
        if key in args:
            raise ConfigError(f"optimizer.{key} and optimizer.args.{key} are both set; keep one")
        if key not in accepted or (type == "Adafactor" and key == "eps"):
            hint = " (Adafactor takes a pair: optimizer.args.eps = [1e-30, 1e-3])" if type == "Adafactor" else ""
            raise ConfigError(f"optimizer.{key} does not apply to optimizer.type = {type!r}; remove it{hint}")
        kwargs[key] = tuple(value) if key == "betas" else value

    if type == "Adafactor":
        kwargs.update(relative_step=False, scale_parameter=False, warmup_init=False)
        if "eps" in args:
            args["eps"] = tuple(args["eps"])
    kwargs.update(args)
    if type == "Adafactor" and kwargs["relative_step"]:
        kwargs["lr"] = None  # Adafactor computes its own step size

    groups = [dict(group) for group in param_groups]
    for group in groups:
        group["params"] = list(group["params"])
        if kwargs["lr"] is None:
            group.pop("lr", None)
    try:
        return cls(groups, **kwargs)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"optimizer.type = {type!r} rejected its settings ({error}); "
                          "check optimizer.lr, optimizer.betas, optimizer.eps and optimizer.args") from error


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    type: str,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    num_cycles: int = 1,
    power: float = 1.0,
    start_step: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A diffusers LR schedule over `total_steps` optimizer steps (`num_cycles`: cosine_with_restarts only;
    `power`: polynomial only, which decays to 1e-7 × group lr / optimizer.lr).

    The groups' `lr` are the base rates. With `start_step` (a resumed run) the schedule starts at that step:
    the rates are the base rates times the schedule's factor there, as in a run that took those steps.
    """
    from diffusers.optimization import get_scheduler

    if type not in SCHEDULER_TYPES:
        raise ConfigError(f"scheduler.type = {type!r} is not supported; use one of {', '.join(SCHEDULER_TYPES)}")
    if type == "constant" and warmup_steps:
        raise ConfigError(f"scheduler.warmup_steps = {warmup_steps} has no effect with scheduler.type = 'constant'; "
                          "use 'constant_with_warmup' or set scheduler.warmup_steps = 0")
    if type not in ("constant", "constant_with_warmup") and not total_steps:
        raise ValueError(f"scheduler {type!r} needs total_steps")
    if start_step:
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
    try:
        return get_scheduler(type, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                             num_cycles=num_cycles, power=power, last_epoch=start_step - 1)
    except ValueError as error:
        raise ConfigError(f"scheduler.type = {type!r}: {error}") from error
