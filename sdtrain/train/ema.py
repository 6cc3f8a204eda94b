"""Exponential moving average (EMA) of the adapter weights, through diffusers' `EMAModel`.

The EMA is updated after the optimizer steps s with s > `ema.start_step` and (s - start_step) a multiple of
`ema.every_n_steps`. The first update starts it as a copy of the trained weights (until then the EMA *is* the
trained weights); the k-th update after that sets ema = d_k x ema + (1 - d_k) x weights with
d_k = min(ema.decay, (1 + k) / (10 + k)) (EMAModel's warm-up). Every process holds the same weights, so each
keeps the same EMA without communication.

It is saved as an adapter of its own next to each adapter (`<output_name>-ema.safetensors`,
`<output_name>-ema-step<N>.safetensors`, the same keep_last), and inside training states as extra tensors
`ema.<i>` of `adapters.safetensors` (the i-th trainable parameter in optimizer order); the number of updates
follows from the step, so a resumed run continues exactly. `ema.use_for_samples` renders samples with it.
"""

from __future__ import annotations

import contextlib

import torch

STATE_PREFIX = "ema."


class AdapterEma:
    def __init__(self, params: list[torch.nn.Parameter], decay: float, every_n_steps: int, start_step: int):
        self.params = list(params)
        self.decay, self.every, self.start = decay, every_n_steps, start_step
        self.model = None  # diffusers EMAModel, from the first update on

    @classmethod
    def from_config(cls, ema_cfg, params):
        if not ema_cfg.enabled:
            return None
        return cls(params, ema_cfg.decay, ema_cfg.every_n_steps, ema_cfg.start_step)

    def updates_until(self, step: int) -> int:
        """How many updates the EMA has had after optimizer step `step`."""
        return max(0, (step - self.start) // self.every)

    def after_step(self, step: int) -> None:
        if step <= self.start or (step - self.start) % self.every:
            return
        if self.model is None:
            self._start()
        self.model.step(self.params)

    def _start(self) -> None:
        from diffusers.training_utils import EMAModel

        self.model = EMAModel(self.params, decay=self.decay)

    @contextlib.contextmanager
    def applied(self):
        """The adapters hold the EMA weights inside the block (the trained ones again after it)."""
        if self.model is None:  # not started: the EMA is the trained weights
            yield
            return
        self.model.store(self.params)
        self.model.copy_to(self.params)
        try:
            yield
        finally:
            self.model.restore(self.params)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.model is None:
            return {}
        return {f"{STATE_PREFIX}{i}": t for i, t in enumerate(self.model.shadow_params)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], step: int) -> bool:
        """Restore the EMA of a state at `step`; False when the state has none though updates were due (the EMA
        then restarts from the trained weights at the next update)."""
        if not tensors or self.updates_until(step) == 0:
            return not tensors and self.updates_until(step) == 0
        if len(tensors) != len(self.params):
            raise ValueError(f"the state holds {len(tensors)} EMA tensors for {len(self.params)} trainable parameters")
        self._start()
        for i, shadow in enumerate(self.model.shadow_params):
            shadow.copy_(tensors[f"{STATE_PREFIX}{i}"])
        self.model.optimization_step = self.updates_until(step)
        return True


def split_state(saved: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(adapter tensors, EMA tensors) of a state's adapters.safetensors."""
    ema = {k: v for k, v in saved.items() if k.startswith(STATE_PREFIX)}
    return {k: v for k, v in saved.items() if k not in ema}, ema
