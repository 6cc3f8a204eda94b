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
from bitsandbytes.optim.optimizer import sync_gpu  # what bitsandbytes' own step calls per tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

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
        p = None
        for group, grouped, others in self._step_plan():
            for gindex, pindex, p in others:  # bitsandbytes' own per-tensor loop (Optimizer8bit.step)
                self.prefetch_state(p)
                self.update_step(group, p, gindex, pindex)
                sync_gpu(p)
            if grouped:
                params, states = grouped
                steps = [state["step"] for state in states]
                if steps.count(steps[0]) == len(steps):
                    self._adam_update(group, params, steps[0] + 1)
                else:  # tensors that missed steps: update each step count together
                    for step in dict.fromkeys(steps):
                        chosen = [q for q, n in zip(params, steps) if n == step]
                        self._adam_update(group, chosen, step + 1)
        if self.is_paged and p is not None:
            sync_gpu(p)
        return loss

    def _step_plan(self):
        """Per parameter group: (group, (grouped params, their states) or None, [(gindex, pindex, p)] for the rest).

        Cached while the same parameters have gradients, the state dict is the same object and no override
        was registered; building it initialises the state of new parameters, as bitsandbytes' step does.
        """
        present = tuple(tuple(q.grad is not None for q in group["params"]) for group in self.param_groups)
        key = (present, len(self.mng.index2config), len(self.mng.pid2config))
        cached = self.__dict__.get("_plan")
        if cached is not None and cached[0] is self.state and cached[1] == key:
            return cached[2]
        grouping = self.args.max_unorm == 0.0 and not self.args.skip_zeros and self.optimizer_name == "adam"
        plan = []
        for gindex, group in enumerate(self.param_groups):
            params, states, others = [], [], []
            for pindex, q in enumerate(group["params"]):
                if q.grad is None:
                    continue
                state = self.state[q]
                if len(state) == 0:
                    self.init_state(group, q, gindex, pindex)
                if grouping and (gindex, pindex) not in self.mng.index2config and _groupable(self, q, state):
                    params.append(q)
                    states.append(state)
                else:
                    others.append((gindex, pindex, q))
            plan.append((group, (params, states) if params else None, others))
        self.__dict__["_plan"] = (self.state, key, plan)
        return plan

    def _adam_update(self, group, params, step):
        """bitsandbytes' CPU 32-bit Adam (backends/cpu/ops.py) on the concatenation of same-step tensors.

        The Adam state of the group lives in two flat buffers (each `state1`/`state2` a view into them), the
        parameters and gradients are concatenated, and the new values copied back: elementwise the same ops,
        so the same numbers, in about ten ops for the group instead of ten per tensor.
        """
        beta1, beta2 = group["betas"][0], group["betas"][1]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        m, v, states = self._flat_state(params)
        g = _flatten_dense_tensors([q.grad for q in params])
        flat = _flatten_dense_tensors(params)
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        correction1 = 1.0 - beta1 ** step
        correction2 = math.sqrt(1.0 - beta2 ** step)
        step_size = -lr * correction2 / correction1
        if weight_decay > 0.0:
            flat.mul_(1.0 - lr * weight_decay)
        flat.add_(m / (v.sqrt() + eps * correction2), alpha=step_size)
        torch._foreach_copy_(params, _unflatten_dense_tensors(flat, params))
        for state in states:
            state["step"] = step

    def _flat_state(self, params):
        """Flat Adam moment buffers of `params`; rebuilt (copying the state in) when a state tensor was replaced."""
        cache = self.__dict__.setdefault("_flat_states", {})
        key = tuple(map(id, params))
        entry = cache.get(key)
        if entry is not None and entry[4] is self.state and all(
                s["state1"] is a and s["state2"] is b for s, a, b in zip(entry[2], entry[3][0], entry[3][1])):
            return entry[0], entry[1], entry[2]
        states = [self.state[q] for q in params]
        m = _flatten_dense_tensors([s["state1"] for s in states])
        v = _flatten_dense_tensors([s["state2"] for s in states])
        if len(cache) >= _MAX_FLAT_STATES:  # the tensor sets changed (steps without some gradients): start over
            cache.clear()
        views1, views2 = _unflatten_dense_tensors(m, params), _unflatten_dense_tensors(v, params)
        for s, a, b in zip(states, views1, views2):
            s["state1"], s["state2"] = a, b
        cache[key] = (m, v, states, (views1, views2), self.state)
        return m, v, states


def grouped_small_updates(cls):
    """`cls` (a bitsandbytes Adam optimizer class) with the grouped CPU update of small 32-bit-state tensors."""
    return type(cls.__name__, (_GroupedSmallUpdates, cls), {"__doc__": cls.__doc__, "__module__": __name__})
