"""1/‖W0 + s·B·A‖ of many small same-shaped DoRA adapters, computed together in batched ops.

On a small layer the per-layer norm (`DoRAModule.norm_squared` in sdtrain.adapters.dora) is a dozen tiny ops whose
fixed cost dominates: on the tiny test models it was about a third of DoRA's extra step time. Adapters whose
base weight has at most `MAX_BATCHED_WEIGHT` elements and that share weight shape, rank, scale, axis, dtype
and device form one `ChannelNormBatch`: W0 is stacked once (an fp32 copy, refreshed when a base weight
changes) and the norms of the whole group come from the same low-rank identity in a dozen batched ops.

Only detached norms (`detach_norm=True`, the default) are batched: the result carries no gradient. The
values are cached: each adapter checks its own A, B and W0 (version counters and storage) on every
call, and a changed one recomputes its whole group, so an optimizer step, `load_state_dict` or an in-place
edit is seen, while gradient accumulation and checkpoint recomputation reuse the cached values.
"""

from __future__ import annotations

import weakref

import torch

from sdtrain.adapters.dora import NORM_EPS, DoRAModule, norm_squared_delta, norm_state_key, weight_norm_squared

__all__ = ["MAX_BATCHED_WEIGHT", "ChannelNormBatch", "batch_channel_norms"]

MAX_BATCHED_WEIGHT = 1 << 16  # base weights up to this many elements are batched (a 256×256 Linear)


def _tensors(module):
    """A, B and the unmerged W0 of a DoRA module (read from the module's dicts: this runs per layer and step)."""
    children = module._modules
    a = children["lora_down"]._parameters["weight"]
    b = children["lora_up"]._parameters["weight"]
    w = module._buffers["_unmerged_weight"] if module.merged else children["base"]._parameters["weight"]
    return a, b, w


class ChannelNormBatch:
    """The inverse channel norms of a group of same-shaped DoRA adapters (see the module docstring)."""

    def __init__(self, modules):
        self.members = [weakref.ref(m) for m in modules]
        self.keys: list = [None] * len(self.members)
        self.inv: torch.Tensor | None = None  # [members, channels] fp32
        self.rows: tuple = ()  # its rows, one view per member
        self._w0 = self._base_sq = self._w0_keys = self._in_channels = None
        for slot, module in enumerate(modules):
            module._norm_batch, module._norm_slot = self, slot

    def __len__(self) -> int:
        return len(self.members)

    # a copied or unpickled module gets an empty batch and computes its own norm
    def __deepcopy__(self, memo):
        return ChannelNormBatch([])

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__([])

    def forget(self) -> None:
        """Drop the cached values: the next call recomputes the group and restacks W0."""
        self.inv, self._w0_keys = None, None

    def inverse_norm(self, module) -> torch.Tensor | None:
        """1/‖V‖ of `module` (fp32, [channels]), or None when it is not (or no longer) batchable here."""
        slot = getattr(module, "_norm_slot", -1)
        if not 0 <= slot < len(self.members) or self.members[slot]() is not module:
            return None
        try:
            key = norm_state_key(*_tensors(module))
        except RuntimeError:  # inference tensors have no version counter
            return None
        if self.inv is None or key != self.keys[slot]:
            if not self._compute():
                return None
        return self.rows[slot]

    def _compute(self) -> bool:
        modules = [ref() for ref in self.members]
        if None in modules:
            self.members = []  # a member was deleted: every adapter computes its own norm
            return False
        tensors = [_tensors(m) for m in modules]
        first = modules[0]
        axis, s, rank = first.axis, first.scale, first.rank
        count = len(modules)
        keys = [norm_state_key(a, b, w) for a, b, w in tensors]  # what the values computed below depend on
        with torch.inference_mode(False), torch.no_grad():
            w_keys = [(key[2], key[5]) for key in keys]  # W0's version and storage
            try:
                if self._w0 is None or w_keys != self._w0_keys:
                    shape = tensors[0][2].shape
                    w0 = torch.stack([w for _, _, w in tensors]).reshape(count, shape[0], -1).to(torch.float32)
                    base_sq = torch.stack([weight_norm_squared(w, axis) for _, _, w in tensors])  # ‖W0‖², [G, ch]
                    self._w0, self._base_sq, self._w0_keys, self._in_channels = \
                        w0, base_sq, w_keys, (shape[1] if len(shape) > 2 else None)
                w0 = self._w0
                a = torch.stack([a for a, _, _ in tensors]).reshape(count, rank, -1)  # [G, r, K]
                b = torch.stack([b for _, b, _ in tensors]).reshape(count, -1, rank)  # [G, out, r]
                if not a.device == b.device == w0.device:
                    raise RuntimeError("adapters and base weights on different devices")
            except RuntimeError:  # members were moved apart (devices): every adapter computes its own norm
                self.members = []
                return False
            a, b = a.to(torch.float32), b.to(torch.float32)
            # A·W0ᵀ rather than W0·Aᵀ: about twice as fast as a batch of small products
            cross = torch.bmm(a, w0.transpose(1, 2)) if axis == "output" else torch.bmm(b.transpose(1, 2), w0)
            low = norm_squared_delta(cross, a, b, s, axis, self._in_channels, cross_transposed=axis == "output")
            self.inv = low.add_(self._base_sq).clamp_min_(0).add_(NORM_EPS).rsqrt_()
            self.rows = self.inv.unbind(0)
            self.keys = keys
        return True


def batch_channel_norms(modules) -> list[ChannelNormBatch]:
    """Group the small DoRA adapters among `modules` by shape; returns the batches (groups of ≥ 2)."""
    groups: dict[tuple, list] = {}
    for module in modules:
        if not (isinstance(module, DoRAModule) and module.decompose and module.detach_norm):
            continue
        w = module.base.weight
        if w.numel() > MAX_BATCHED_WEIGHT:
            continue
        key = (module.axis, tuple(w.shape), module.rank, module.scale, w.dtype, w.device)
        groups.setdefault(key, []).append(module)
    return [ChannelNormBatch(members) for members in groups.values() if len(members) >= 2]
