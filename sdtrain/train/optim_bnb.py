"""bitsandbytes' 8-bit AdamW with its small 32-bit-state tensors updated together on the CPU.

bitsandbytes keeps the state of tensors with fewer than `min_8bit_size` elements in 32 bits and updates every
tensor in its own call: on the CPU that call is about ten small torch ops, 30–40 µs per tensor whatever its
size. An adapter network is hundreds of such tensors (each DoRA layer adds its magnitude vector to A and B),
so on small models the optimizer step was a fifth of the training step.

`grouped_small_updates(cls)` subclasses a bitsandbytes Adam optimizer so that, on each step, the CPU fp32
parameters with 32-bit state and the group's plain settings (no per-parameter override, no `max_unorm`, no
`skip_zeros`) are updated together, in bitsandbytes' own formula and order of operations, on flat buffers:
the moments of those tensors live in two flat tensors (each tensor's `state1` and `state2` a view into them),
the parameters and gradients are concatenated for the update and copied back. Everything else (8-bit state,
CUDA, overrides) goes through bitsandbytes unchanged. The state dict is bitsandbytes' own (`state1`, `state2`,
`step`), so saved training states load in either.
"""

from __future__ import annotations

import math

import torch

__all__ = ["grouped_small_updates"]

_MAX_FLAT_STATES = 16  # flat buffers kept for different sets of same-step tensors


def _groupable(optimizer, p, state) -> bool:
    return (p.device.type == "cpu" and p.dtype == torch.float32 and p.grad.dtype == torch.float32
            and state.get("state1") is not None and state["state1"].dtype == torch.float32
            and "unorm_vec" not in state and id(p) not in optimizer.mng.pid2config)


class _GroupedSmallUpdates:
    """Mixin for a bitsandbytes `Optimizer2State` Adam (see the module docstring)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        hidden = []  # (param, grad) updated here, hidden from bitsandbytes' per-tensor loop
        if self.args.max_unorm == 0.0 and not self.args.skip_zeros and self.optimizer_name == "adam":
            for gindex, group in enumerate(self.param_groups):
                by_step: dict[int, list] = {}
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None or (gindex, pindex) in self.mng.index2config:
                        continue
                    state = self.state[p]
                    if len(state) == 0:
                        self.init_state(group, p, gindex, pindex)
                    if _groupable(self, p, state):
                        by_step.setdefault(state["step"] + 1, []).append(p)
                for step, params in by_step.items():
                    self._adam_update(group, params, step)
                    hidden.extend((p, p.grad) for p in params)
        for p, _ in hidden:
            p.grad = None
        try:
            super().step()
        finally:
            for p, grad in hidden:
                p.grad = grad
        return loss

    def _adam_update(self, group, params, step):
        """bitsandbytes' CPU 32-bit Adam (backends/cpu/ops.py) on the concatenation of same-step tensors.

        The Adam state of the group lives in two flat buffers (each `state1`/`state2` a view into them), the
        parameters and gradients are concatenated, and the new values copied back: elementwise the same ops,
        so the same numbers, in about ten ops for the group instead of ten per tensor.
        """
        beta1, beta2 = group["betas"][0], group["betas"][1]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        m, v, states = self._flat_state(params)
        g = torch.cat([p.grad.reshape(-1) for p in params])
        flat = torch.cat([p.reshape(-1) for p in params])
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        correction1 = 1.0 - beta1 ** step
        correction2 = math.sqrt(1.0 - beta2 ** step)
        step_size = -lr * correction2 / correction1
        if weight_decay > 0.0:
            flat.mul_(1.0 - lr * weight_decay)
        flat.add_(m / (v.sqrt() + eps * correction2), alpha=step_size)
        torch._foreach_copy_(params, [part.view_as(p) for part, p in zip(flat.split([p.numel() for p in params]),
                                                                         params)])
        for state in states:
            state["step"] = step

    def _flat_state(self, params):
        """Flat Adam moment buffers of `params`; rebuilt (copying the state in) when a state tensor was replaced."""
        cache = self.__dict__.setdefault("_flat_states", {})
        key = tuple(id(p) for p in params)
        states = [self.state[p] for p in params]
        entry = cache.get(key)
        if entry is None or any(s["state1"] is not a or s["state2"] is not b for s, a, b in zip(states, *entry[2:])):
            m = torch.cat([s["state1"].reshape(-1) for s in states])
            v = torch.cat([s["state2"].reshape(-1) for s in states])
            if len(cache) >= _MAX_FLAT_STATES:  # the tensor sets changed (steps without some gradients): start over
                cache.clear()
            sizes = [p.numel() for p in params]
            views1 = [part.view_as(p) for part, p in zip(m.split(sizes), params)]
            views2 = [part.view_as(p) for part, p in zip(v.split(sizes), params)]
            for s, a, b in zip(states, views1, views2):
                s["state1"], s["state2"] = a, b
            entry = cache[key] = (m, v, views1, views2)
        return entry[0], entry[1], states


def grouped_small_updates(cls):
    """`cls` (a bitsandbytes Adam optimizer class) with the grouped CPU update of small 32-bit-state tensors."""
    return type(cls.__name__, (_GroupedSmallUpdates, cls), {"__doc__": cls.__doc__, "__module__": __name__})
