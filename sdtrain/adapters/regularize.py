"""Adapter dropout: kohya's network, rank and module dropout, applied only while the trainer arms it.

Semantics, from kohya-ss/sd-scripts `networks/lora.py` (`LoRAModule.forward`, commit 48d368f) and LyCORIS
`lycoris/modules/locon.py` (`LoConModule`, commit f49d30d), per adapted layer and forward pass, with
h = down(x) the rank-r output of the down projection and s = alpha / rank:

- module dropout p_m: with probability p_m the layer returns its base output (no adapter at all).
- network dropout p: every element of h is zeroed with probability p and the kept ones scaled by 1/(1−p)
  (torch's dropout), one mask per sample.
- rank dropout p_r: whole ranks of h are zeroed with probability p_r and the update is scaled by s/(1−p_r)
  (kohya's fixed rescale "as if the rank changed", not one computed from the mask). Plain LoRA: one mask per
  sample and rank, as kohya. DoRA: one mask per rank for the forward pass, applied to the low-rank branch
  before the norm, so the weight is W' = m · V/‖V‖ with V = W0 + s/(1−p_r)·B·diag(d)·A: the norm is the norm
  of the dropped weight (LyCORIS applies its rank dropout to ΔW before the weight decomposition too; its mask
  is over ΔW's output rows and is not rescaled by default, while ours drops ranks with kohya's rescale).
- DoRA with network dropout: the elements of h are dropped inside the bracket, y = c ⊙ (base(x) + s·up(drop(h)))
  + bias (output axis) or with x ⊙ c as the input (input axis), c = m/‖V‖ of the undropped weight (a per-token
  mask has no weight to take a norm of; LyCORIS ignores network dropout for DoRA with a warning).

This path is plain autograd ops, used only for training steps with a dropout above 0; with all three at 0 no
layer gets a `LayerDropout` and the fused paths of `sdtrain.adapters.dora` run unchanged. Samples, export and
verification never see dropout: the trainer arms the stream only around a micro-batch's forward and backward.

Randomness: every mask comes from a generator seeded by (train seed, global batch index, the layer's index,
the kind of mask, and for per-sample masks the row's slot in the global batch): a pure function of the
step's place. A layer that sees k rows per sample (the text encoders read a long caption as k windows of 75
tokens, rows sample-major) gives row j of sample i the slot (slot of i) x k + j. A resumed run draws the same masks as a straight one, several processes draw what one process
draws for the same global batch, and gradient checkpointing's recomputing forward draws the same masks again.
Per-forward draws (module dropout, DoRA's rank mask) use a CPU generator; element masks use one on the
activations' device.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from sdtrain.adapters.dora import NORM_EPS

__all__ = ["DropoutStream", "LayerDropout", "attach_dropout"]

_MODULE, _RANK, _ELEMENT = 1, 2, 3  # the kinds of draw, part of each seed
_MASK = (1 << 63) - 1


class DropoutStream:
    """The seeded source of every dropout mask of a run; armed for one global batch at a time."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.global_batch: int | None = None
        self.slot_offset = 0
        self.samples = 0  # this process's samples in the armed batch (0: unknown)
        self._generators: dict[torch.device, torch.Generator] = {}

    @property
    def armed(self) -> bool:
        return self.global_batch is not None

    @contextmanager
    def batch(self, global_batch: int, slot_offset: int = 0, samples: int = 0):
        """Arm the stream for this process's slice of one global batch: `samples` samples (0: unknown), the
        first at `slot_offset`."""
        self.global_batch, self.slot_offset, self.samples = int(global_batch), int(slot_offset), int(samples)
        try:
            yield self
        finally:
            self.global_batch = None

    def generator(self, device, layer: int, kind: int, slot: int = -1) -> torch.Generator:
        """A generator on `device` seeded for one draw (reseeded on every call; nothing is carried over)."""
        device = torch.device(device)
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device)
        seed = ((((self.seed * 1_000_003 + self.global_batch) * 8191 + layer) * 7 + kind) * 65_537 + slot + 1) & _MASK
        return gen.manual_seed(seed)

    def __deepcopy__(self, memo):  # copies of a model share the run's stream
        return self


class LayerDropout:
    """The dropout of one adapted layer (its index in the adapter set seeds its masks)."""

    def __init__(self, stream: DropoutStream, index: int, dropout: float, rank_dropout: float, module_dropout: float):
        self.stream, self.index = stream, index
        self.p, self.p_rank, self.p_module = float(dropout), float(rank_dropout), float(module_dropout)

    @property
    def armed(self) -> bool:
        return self.stream.armed

    def _uniform(self, shape, kind, slot=-1, device="cpu"):
        return torch.rand(shape, generator=self.stream.generator(device, self.index, kind, slot), device=device)

    def _per_sample(self, n: int, shape, kind, device="cpu") -> torch.Tensor:
        """[n, *shape] uniforms, row i from the generator of its slot in the global batch (k rows per sample when
        n = k x the armed sample count: row i is row i % k of sample i // k)."""
        offset, samples = self.stream.slot_offset, self.stream.samples
        k = n // samples if samples and n % samples == 0 else 1
        return torch.stack([self._uniform(shape, kind, (offset + i // k) * k + i % k, device) for i in range(n)])

    def forward(self, module, x: torch.Tensor) -> torch.Tensor:
        """The adapted layer's output with dropout (DoRAModule.forward at strength 1, while armed)."""
        if self.p_module and float(self._uniform(1, _MODULE)) < self.p_module:
            return module.base(x)
        device_type = x.device.type
        dtype = x.dtype
        if torch.is_autocast_enabled(device_type) and x.is_floating_point():
            dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return self._adapted(module, x.to(dtype), dtype)

    def _adapted(self, module, x, dtype):
        conv = module._conv()
        base = module.base
        w = base.weight.to(dtype)
        bias = None if base.bias is None else base.bias.to(dtype)
        a = module.lora_down.weight.to(dtype)
        b = module.lora_up.weight.to(dtype)
        s, r = module.scale, module.rank
        batched = conv is not None or x.dim() > 1  # conv activations are [N, C, H, W]
        n = x.shape[0] if batched else 1

        def layer(inp, weight, layer_bias=None):
            return F.linear(inp, weight, layer_bias) if conv is None else F.conv2d(inp, weight, layer_bias, *conv)

        def rank_view(mask):  # [n, r] or [r] so that it broadcasts over h
            if conv is None:
                return mask.view(*mask.shape[:-1], *(1,) * (x.dim() - mask.dim()), r)
            return mask.view(*mask.shape, 1, 1)

        rank_mask = up = None
        if self.p_rank:
            s = s / (1.0 - self.p_rank)
            if module.decompose:  # one mask for the forward pass, before the norm
                keep = (self._uniform(r, _RANK) > self.p_rank).to(torch.float32)
                up = module.lora_up.weight * keep.to(module.lora_up.weight.device).view(
                    (1, r) + (1,) * (module.lora_up.weight.dim() - 2))
                rank_mask = keep
            else:  # one mask per sample (kohya)
                draws = self._per_sample(n, r, _RANK) if batched else self._uniform(r, _RANK, self.stream.slot_offset)
                rank_mask = (draws > self.p_rank).to(torch.float32)
            rank_mask = rank_view(rank_mask.to(device=x.device, dtype=dtype))

        def low_rank(inp):
            h = layer(inp, a)
            if self.p:
                if batched:
                    u = self._per_sample(n, h.shape[1:], _ELEMENT, h.device)
                else:
                    u = self._uniform(h.shape, _ELEMENT, self.stream.slot_offset, h.device)
                h = h * (u >= self.p).to(h.dtype) / (1.0 - self.p)
            if rank_mask is not None:
                h = h * rank_mask
            return F.linear(h, b) if conv is None else F.conv2d(h, b)  # B: [out, r] or a 1×1 conv

        if not module.decompose:
            return layer(x, w, bias) + s * low_rank(x)
        if up is None:
            c = module.channel_scale()
        else:  # the norm of the dropped weight (autocast is off here)
            inverse = (module.norm_squared(up=up, scale=s) + NORM_EPS).rsqrt()
            c = module.magnitude * (inverse.detach() if module.detach_norm else inverse)
        shape = [1] * x.dim()  # c over the channel dimension of the activations
        shape[-1 if conv is None else 1] = -1
        if module.axis == "output":
            y = (layer(x, w) + s * low_rank(x)) * c.view(shape)
            return (y if bias is None else y + bias.view(shape)).to(dtype)
        xc = (x * c.view(shape)).to(dtype)
        return layer(xc, w, bias) + s * low_rank(xc)


def attach_dropout(adapters, dropout: float, rank_dropout: float, module_dropout: float, seed: int):
    """Give every layer of an AdapterSet its `LayerDropout`; returns the run's `DropoutStream` (None, and no
    layer changed, when all three probabilities are 0)."""
    if not (dropout or rank_dropout or module_dropout):
        return None
    stream = DropoutStream(seed)
    for index, module in enumerate(adapters.modules.values()):
        module.dropout = LayerDropout(stream, index, dropout, rank_dropout, module_dropout)
    return stream
