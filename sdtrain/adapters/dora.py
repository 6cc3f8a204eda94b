"""DoRA (and plain LoRA) layers wrapping nn.Linear and nn.Conv2d, in the kohya/LyCORIS layout.

    W' = m · V / ‖V‖,   V = W0 + s·B·A,   s = alpha / rank

`lora_down` holds A, `lora_up` holds B, `magnitude` holds m (fp32; one entry per output channel for axis
"output", per input channel for axis "input"); conv weights are flattened to [out, in·kh·kw] and the input axis
sums the kh·kw columns of each input channel.

Reference. `DoRAModule.merged_weight` forms W0 + k·(W' − W0) densely in fp32 from the formula above. Export,
verification and the tests use it, and so does the forward at a strength k ≠ 1 or with a trainable base weight.

Fused paths. At strength 1 over a frozen base layer the forward is one autograd Function per axis, with the
channel scale c = m / ‖V‖ (fp32, one value per channel) as an input whose gradient it returns:

    output axis (`_OutputAxisFn`): y = c ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + bias
        forward: h = x·Aᵀ; y = x·W0ᵀ; y ← c ⊙ y + bias; y += s·h·(c ⊙ B)ᵀ.
        saves: x and h (what plain LoRA saves) and the output y itself (the next layer usually saves it too).
        backward: the pre-scale activations are recovered from y, Σ_t g ⊙ (y − bias) = c ⊙ grad c, so
        grad c = that sum / c (0 for a channel with c = 0, whose y is the bias alone: B's row and hence the
        channel's gradient are 0 too); then with g_c = g ⊙ c it is LoRA's backward:
        grad x = g_c·W0 + (s·g_c·B)·A, grad A = (s·g_c·B)ᵀ·x, grad B = s·g_cᵀ·h.
        Nothing is recomputed. grad c has the rounding of y − bias: an absolute error of about
        ε·|bias| / |c| per element (ε of the compute dtype), negligible unless |c| is tiny next to 1.
    input axis (`_InputAxisFn`): y = (x ⊙ c)·W0ᵀ + s·((x ⊙ c)·Aᵀ)·Bᵀ + bias (exact for convs: zero padding
        commutes with the channel scale)
        forward: x_c = x ⊙ c (a temporary); y = x_c·W0ᵀ + bias; h = x_c·Aᵀ; y += s·h·Bᵀ.
        saves: x and h, as plain LoRA.
        backward: g_h = s·g·B; g_xc = g·W0 + g_h·A; grad c = Σ_t x ⊙ g_xc; grad x = g_xc ⊙ c;
        grad A = (g_hᵀ·x) ⊙ c (per input channel); grad B = s·gᵀ·h. Nothing is recomputed.
    plain LoRA is the output-axis Function without c: y = x·W0ᵀ + bias + s·h·Bᵀ.

c stays fp32 in the products with activations of a lower-precision compute dtype (the result is rounded once,
so a magnitude change below that dtype's resolution still shows in the output). Nothing in these paths reads a
tensor value on the host (no device synchronization), so they run asynchronously on a GPU and under
`torch.compile`.

The norm. ‖V‖² per channel comes from the low-rank identity, never from the dense V:

    output axis: ‖V‖²_row = ‖W0‖²_row + 2s·rowdot(W0·Aᵀ, B) + s²·rowdot(B·(A·Aᵀ), B)
    input axis:  ‖V‖²_col = ‖W0‖²_col + 2s·coldot(Bᵀ·W0, A) + s²·coldot((Bᵀ·B)·A, A)

always in fp32 with autocast off (a bf16/fp16 W0 is converted for its product), clamped at 0;
1/‖V‖ = rsqrt(‖V‖² + NORM_EPS). With `detach_norm` (the default) 1/‖V‖ carries no gradient and is computed
once per weight update: it is kept until A, B or W0 change (their storage and version counters, which an
optimizer step, `.to()` and `load_state_dict` change; checked on the host, no synchronization), so gradient
accumulation, the recomputing forward of gradient checkpointing and the steps of a sample reuse it. ‖W0‖² is
kept the same way. Under `torch.compile` both are computed in the graph on every forward (the compiler fuses
them; a Python-side cache cannot live in a graph). Without `detach_norm` the norm is part of the autograd graph
and recomputed every forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sdtrain.errors import ConfigError

__all__ = ["NORM_EPS", "AXES", "DoRAModule", "DoRALinear", "DoRAConv2d", "weight_norm", "weight_norm_squared"]

AXES = ("output", "input")
NORM_EPS = 1e-12  # added to the squared channel norm inside the square root


# ---------------------------------------------------------------- dense helpers (reference, export, tests)


def weight_norm_squared(weight: torch.Tensor, axis: str = "output") -> torch.Tensor:
    """Dense per-channel squared L2 norm in fp32.

    output: one value per output channel (row of [out, in], filter of [out, in, kh, kw]);
    input: one value per input channel (column of [out, in], over out·kh·kw for a conv weight).
    """
    w = weight.to(torch.float32)
    if axis == "output":
        return w.reshape(w.shape[0], -1).square().sum(1)
    if axis == "input":
        return w.transpose(0, 1).reshape(w.shape[1], -1).square().sum(1)
    raise ValueError(f"axis must be one of {AXES}, got {axis!r}")


def weight_norm(weight: torch.Tensor, axis: str = "output") -> torch.Tensor:
    """Dense per-channel L2 norm in fp32: [out] for axis "output", [in] for axis "input"."""
    return weight_norm_squared(weight, axis).sqrt()


def _channel_shape(axis: str, ndim: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel vector over a weight (or conv activation) of `ndim` dims on `axis`."""
    if axis == "output":
        return (-1,) + (1,) * (ndim - 1)
    return (1, -1) + (1,) * (ndim - 2)


def _scaled(t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """t ⊙ c as a new tensor of t's dtype; with a wider c (fp32 over bf16 t) the product is formed in c's dtype
    and rounded once."""
    return torch.mul(t, c, out=torch.empty_like(t))


# ---------------------------------------------------------------- layer ops (conv = None: Linear on [T, in])
# `conv` is the base conv's (stride, padding, dilation); activations are [T, features] for a Linear and
# [N, C, H, W] for a conv, so a per-output-channel vector broadcasts as [out] or [1, out, 1, 1].


def _per_channel(v: torch.Tensor, conv) -> torch.Tensor:
    return v if conv is None else v.view(1, -1, 1, 1)


def _base(x, w, bias, conv):
    return F.linear(x, w, bias) if conv is None else F.conv2d(x, w, bias, *conv)


def _down(x, a, conv):
    return torch.mm(x, a.t()) if conv is None else F.conv2d(x, a, None, *conv)


def _add_up_(y, h, b, s, conv):
    """y += s·up(h) in place (B a [out, r] matrix or [out, r, 1, 1] 1×1 conv)."""
    if conv is None:
        y.addmm_(h, b.t(), alpha=s)
    elif y.is_contiguous() and h.is_contiguous():
        n, out = y.shape[:2]
        b2 = b.reshape(out, -1)
        y.view(n, out, -1).baddbmm_(b2.expand(n, *b2.shape), h.view(n, h.shape[1], -1), alpha=s)
    else:
        y.add_(F.conv2d(h, b), alpha=s)


def _up_input_grad(g, b, s, conv):
    """s·gradient of up(h) with respect to h: s·g·B ([T, r] or [N, r, H, W])."""
    if conv is None:
        return torch.mm(g, b).mul_(s)
    n, out = g.shape[:2]
    b2 = b.reshape(out, -1)
    return torch.matmul(b2.t(), g.reshape(n, out, -1)).mul_(s).view(n, b2.shape[1], *g.shape[2:])


def _up_weight_grad(g, h, s, conv):
    """s·gradient of B: s·gᵀ·h summed over tokens / positions."""
    if conv is None:
        return torch.mm(g.t(), h).mul_(s)
    n, out, r = g.shape[0], g.shape[1], h.shape[1]
    return torch.matmul(g.reshape(n, out, -1), h.reshape(n, r, -1).transpose(1, 2)).sum(0).mul_(s).view(out, r, 1, 1)


def _conv_backward(g, x, w, conv, mask):
    stride, padding, dilation = conv
    return torch.ops.aten.convolution_backward(g, x, w, None, list(stride), list(padding), list(dilation), False,
                                               [0, 0], 1, mask)


def _input_grad(g, x, w, gh, a, conv):
    """g·W0 + g_h·A: the input gradient of the base layer plus the down projection's (a new tensor)."""
    if conv is None:
        return torch.mm(g, w).addmm_(gh, a)
    grad = _conv_backward(g, x, w, conv, [True, False, False])[0]
    return grad.add_(_conv_backward(gh, x, a, conv, [True, False, False])[0])


def _down_weight_grad(gh, x, a, conv):
    return torch.mm(gh.t(), x) if conv is None else _conv_backward(gh, x, a, conv, [False, True, False])[1]


def _channel_sum(t, conv) -> torch.Tensor:
    """Σ over tokens / batch and positions per channel, accumulated in fp32."""
    return t.sum(0, dtype=torch.float32) if conv is None else t.sum((0, 2, 3), dtype=torch.float32)


# ---------------------------------------------------------------- autograd Functions (strength 1, frozen base)


class _OutputAxisFn(torch.autograd.Function):
    """y = c ⊙ (base(x) + s·up(down(x))) + bias; plain LoRA when c is None (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, w, bias, a, b, c, s, conv):
        ctx.s, ctx.conv = s, conv
        h = _down(x, a, conv)
        if c is None:
            y = _base(x, w, bias, conv)
            _add_up_(y, h, b, s, conv)
            ctx.save_for_backward(x, w, None, a, b, h, None, None)
            return y
        y = _base(x, w, None, conv)
        cv = _per_channel(c, conv)
        if bias is None:
            y.mul_(cv)
        else:
            torch.addcmul(_per_channel(bias, conv), y, cv, out=y)
        _add_up_(y, h, _scaled(b, c.view(_channel_shape("output", b.dim()))), s, conv)
        ctx.save_for_backward(x, w, bias, a, b, h, c, y)
        return y

    @staticmethod
    def backward(ctx, g):
        x, w, bias, a, b, h, c, y = ctx.saved_tensors
        s, conv = ctx.s, ctx.conv
        need_x, need_a, need_b, need_c = (ctx.needs_input_grad[i] for i in (0, 3, 4, 5))
        grad_x = grad_a = grad_b = grad_c = None
        if c is not None:
            if need_c:  # Σ g ⊙ (y − bias) = c ⊙ grad c
                scaled_z = y * g if bias is None else (y - _per_channel(bias, conv)).mul_(g)
                dot = _channel_sum(scaled_z, conv)
                del scaled_z
                grad_c = torch.where(c == 0, 0.0, dot / c)
            g = _scaled(g, _per_channel(c, conv))
        if need_b:
            grad_b = _up_weight_grad(g, h, s, conv)
        if need_x or need_a:
            gh = _up_input_grad(g, b, s, conv)
            if need_x:
                grad_x = _input_grad(g, x, w, gh, a, conv)
            if need_a:
                grad_a = _down_weight_grad(gh, x, a, conv)
        return grad_x, None, None, grad_a, grad_b, grad_c, None, None


class _InputAxisFn(torch.autograd.Function):
    """y = base(x ⊙ c) + s·up(down(x ⊙ c)) + bias, c per input channel (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, w, bias, a, b, c, s, conv):
        ctx.s, ctx.conv = s, conv
        xc = _scaled(x, _per_channel(c, conv))
        y = _base(xc, w, bias, conv)
        h = _down(xc, a, conv)
        del xc
        _add_up_(y, h, b, s, conv)
        ctx.save_for_backward(x, w, a, b, h, c)
        return y

    @staticmethod
    def backward(ctx, g):
        x, w, a, b, h, c = ctx.saved_tensors
        s, conv = ctx.s, ctx.conv
        need_x, need_a, need_b, need_c = (ctx.needs_input_grad[i] for i in (0, 3, 4, 5))
        grad_x = grad_a = grad_b = grad_c = None
        cv = _per_channel(c, conv)
        if need_b:
            grad_b = _up_weight_grad(g, h, s, conv)
        if need_x or need_a or need_c:
            gh = _up_input_grad(g, b, s, conv)
            if need_x or need_c:
                grad_xc = _input_grad(g, x, w, gh, a, conv)
                if need_c:
                    grad_c = _channel_sum(x * grad_xc, conv)
                if need_x:
                    grad_x = grad_xc.mul_(cv)
                del grad_xc
            if need_a:
                grad_a = _down_weight_grad(gh, x, a, conv).mul_(c.view(_channel_shape("input", a.dim())))
        return grad_x, None, None, grad_a, grad_b, grad_c, None, None


# ---------------------------------------------------------------- modules


class DoRAModule(nn.Module):
    """DoRA/LoRA adapter around a frozen base layer. See the module docstring for the math and the contract.

    Attributes: base, lora_down, lora_up, magnitude (fp32 Parameter or None), rank, alpha, scale
    (alpha/rank), axis, decompose, detach_norm, multiplier (strength k), merged.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, *, decompose: bool = True,
                 axis: str = "output", detach_norm: bool = True):
        super().__init__()
        if axis not in AXES:
            raise ConfigError(f"DoRA axis must be one of {AXES}, got {axis!r}: set network.decompose_axis accordingly")
        if int(rank) != rank or rank < 1:
            raise ConfigError(f"adapter rank must be a positive integer, got {rank!r}: set network.rank (e.g. 16)")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.axis = axis
        self.decompose = bool(decompose)
        self.detach_norm = bool(detach_norm)
        self.multiplier = 1.0
        self.merged = False
        weight = base.weight
        self.lora_down, self.lora_up = self._make_lora(self.rank)
        self.lora_down.to(device=weight.device, dtype=torch.float32)
        self.lora_up.to(device=weight.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        if self.decompose:
            self.magnitude = nn.Parameter(weight_norm(weight.detach(), axis))
        else:
            self.register_parameter("magnitude", None)
        self.register_buffer("base_norm_sq", weight_norm_squared(weight.detach(), axis), persistent=False)
        self.register_buffer("_unmerged_weight", None, persistent=False)
        self._norm_key = self._weight_key(weight)
        self._inverse_norm_cache = None  # (what 1/‖V‖ was computed from, 1/‖V‖)
        self.dropout = None  # a LayerDropout while training with adapter dropout (sdtrain.adapters.regularize)

    def __setstate__(self, state):
        """Unpickled and deep-copied modules start without a cached 1/‖V‖ (its key names the original's tensors)."""
        super().__setstate__(state)
        self._inverse_norm_cache = None
        self.__dict__.setdefault("dropout", None)

    # -- subclass hooks
    def _make_lora(self, rank: int) -> tuple[nn.Module, nn.Module]:
        raise NotImplementedError

    def _conv(self):
        """(stride, padding, dilation) of a conv base layer, None for a Linear."""
        raise NotImplementedError

    def _as_layer_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...] | None]:
        """x as the ops expect it and the leading shape to restore (None: keep)."""
        return x, None

    # -- properties
    @property
    def scale(self) -> float:
        """s = alpha / rank."""
        return self.alpha / self.rank

    def extra_repr(self) -> str:
        kind = f"dora axis={self.axis} detach_norm={self.detach_norm}" if self.decompose else "lora"
        return f"{kind}, rank={self.rank}, alpha={self.alpha:g}"

    # -- weights (the reference)
    def original_weight(self) -> torch.Tensor:
        """The unmerged base weight W0 (the base layer's weight, or its saved copy while merged)."""
        return self._unmerged_weight if self.merged else self.base.weight

    def delta_weight(self) -> torch.Tensor:
        """s·B·A in the base weight's shape, fp32."""
        w = self.original_weight()
        a = self.lora_down.weight.to(torch.float32).reshape(self.rank, -1)
        b = self.lora_up.weight.to(torch.float32).reshape(w.shape[0], self.rank)
        return (self.scale * (b @ a)).reshape(w.shape)

    def merged_weight(self, strength: float = 1.0) -> torch.Tensor:
        """Dense W0 + k·(W' − W0) in fp32 (W' = m·V/‖V‖ for DoRA, V for LoRA): the reference formula.

        Differentiable in A, B, m (and W0 if it requires grad); ‖V‖ carries no gradient when `detach_norm`.
        """
        w0 = self.original_weight().to(torch.float32)
        v = w0 + self.delta_weight()
        if self.decompose:
            norm = (weight_norm_squared(v, self.axis) + NORM_EPS).sqrt()
            if self.detach_norm:
                norm = norm.detach()
            v = v * (self.magnitude / norm).view(_channel_shape(self.axis, v.dim()))
        if strength == 1.0:
            return v
        return w0 + strength * (v - w0)

    @torch.no_grad()
    def merge(self, strength: float = 1.0) -> None:
        """Bake W0 + k·(W' − W0) into the base weight; forward then uses the base layer only.

        The original W0 is kept bit-exact (a copy in its own dtype) so `unmerge` restores it exactly:
        recomputing W0 from the merged weight would be lossy in fp16/bf16.
        """
        if self.merged:
            self.unmerge()
        merged = self.merged_weight(strength)
        self._unmerged_weight = self.base.weight.detach().clone()
        self.base.weight.copy_(merged.to(self.base.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the original base weight (no-op when not merged)."""
        if not self.merged:
            return
        self.base.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = False

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """m = ‖W0‖ on the axis (the initial value; the adapter then equals the base when B = 0)."""
        if self.magnitude is not None:
            self.magnitude.copy_(weight_norm(self.original_weight().detach(), self.axis))

    # -- norms
    @staticmethod
    def _weight_key(w: torch.Tensor):
        try:
            version = w._version
        except RuntimeError:  # inference tensors have no version counter
            return None
        return (w.data_ptr(), version, w.dtype, w.device, tuple(w.shape))

    def base_norm_squared(self) -> torch.Tensor:
        """‖W0‖² per channel on the axis (fp32; kept in a buffer until the base weight changes).

        Changes are detected through the weight's storage and version counter (in-place updates,
        `load_state_dict`, `.to()`); after writing to `base.weight.data` directly call `refresh_norms()`.
        Under torch.compile it is computed in the graph.
        """
        w = self.original_weight().detach()
        if torch.compiler.is_compiling():
            return weight_norm_squared(w, self.axis)
        key = self._weight_key(w)
        cached = self.base_norm_sq
        if key is None or key != self._norm_key or cached.dtype != torch.float32 or cached.is_inference():
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor even when sampling
                cached = weight_norm_squared(w, self.axis)
            if key is not None:
                self.base_norm_sq = cached
                self._norm_key = key
        return cached

    def refresh_norms(self) -> None:
        """Forget the kept ‖W0‖² and 1/‖V‖ (needed only after writing to a weight's `.data` in place)."""
        self._norm_key = None
        self._inverse_norm_cache = None

    def norm_squared(self, up: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
        """‖V‖² per channel on the axis via the low-rank identity (fp32, ≥ 0, differentiable in A and B).

        One r-column product with W0 (out·in·kh·kw·r multiply-adds) and rank-sized products; the dense V is
        never formed. Call with autocast off. `up` and `scale` replace B and s (V = W0 + scale·up·A; rank
        dropout passes B with dropped columns, see sdtrain.adapters.regularize).
        """
        w0 = self.original_weight().detach()
        shape, s = w0.shape, self.scale if scale is None else scale
        w0 = w0.reshape(shape[0], -1).to(torch.float32)
        a = self.lora_down.weight.to(torch.float32).reshape(self.rank, -1)
        b = (self.lora_up.weight if up is None else up).to(torch.float32).reshape(shape[0], self.rank)
        if self.axis == "output":  # t = 2s·W0·Aᵀ + s²·B·(A·Aᵀ), [out, r]; rowdot(t, B)
            low = (torch.addmm(w0 @ a.t(), b, a @ a.t(), beta=2 * s, alpha=s * s) * b).sum(1)
        else:  # t = 2s·Bᵀ·W0 + s²·(Bᵀ·B)·A, [r, K]; coldot(t, A), summed over each input channel's kh·kw
            low = (torch.addmm(b.t() @ w0, b.t() @ b, a, beta=2 * s, alpha=s * s) * a).sum(0)
            if len(shape) > 2:
                low = low.view(shape[1], -1).sum(1)
        return (low + self.base_norm_squared()).clamp_min(0)

    def _norm_cache_key(self):
        """What 1/‖V‖ depends on (None for inference tensors, which have no version counter)."""
        a, b, w = self.lora_down.weight, self.lora_up.weight, self.original_weight()
        try:
            versions = (a._version, b._version, w._version)
        except RuntimeError:
            return None
        return (self.alpha, self.axis, self.merged, *versions, a.data_ptr(), b.data_ptr(), w.data_ptr())

    def inverse_norm(self) -> torch.Tensor:
        """1/‖V‖ per channel on the axis (fp32, no gradient), kept until A, B or W0 change (see the module
        docstring); computed in the graph under torch.compile."""
        with torch.autocast(self.base.weight.device.type, enabled=False):
            if torch.compiler.is_compiling():
                return (self.norm_squared() + NORM_EPS).rsqrt().detach()
            key = self._norm_cache_key()
            cached = self._inverse_norm_cache
            if key is not None and cached is not None and cached[0] == key:
                return cached[1]
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor even when sampling
                inv = (self.norm_squared() + NORM_EPS).rsqrt_()
            self._inverse_norm_cache = None if key is None else (key, inv)
            return inv

    def channel_scale(self) -> torch.Tensor:
        """c = m / ‖V‖ per channel (fp32, ‖V‖ = sqrt(‖V‖² + NORM_EPS)), ‖V‖ detached when detach_norm."""
        if self.detach_norm:
            return self.magnitude * self.inverse_norm()
        with torch.autocast(self.base.weight.device.type, enabled=False):
            return self.magnitude * (self.norm_squared() + NORM_EPS).rsqrt()

    # -- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.multiplier
        if self.merged or k == 0.0:
            return self.base(x)
        if self.dropout is not None and k == 1.0 and self.training and self.dropout.armed:
            return self.dropout.forward(self, x)
        device_type = x.device.type
        dtype = x.dtype
        if torch.is_autocast_enabled(device_type) and x.is_floating_point():
            dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):  # the compute dtype is chosen here; c stays fp32
            xd, lead = self._as_layer_input(x.to(dtype))
            y = self._adapted(xd, dtype, k)
        return y if lead is None else y.view(*lead, y.shape[-1])

    def _adapted(self, x, dtype, k):
        """The adapted layer on x (in the compute dtype and the ops' layout), autocast off."""
        base = self.base
        w = base.weight.to(dtype)
        bias = None if base.bias is None else base.bias.to(dtype)
        if k != 1.0 or w.requires_grad or (bias is not None and bias.requires_grad):
            return _base(x, self.merged_weight(k).to(dtype), bias, self._conv())
        a = self.lora_down.weight.to(dtype)
        b = self.lora_up.weight.to(dtype)
        if not self.decompose:
            return _OutputAxisFn.apply(x, w, bias, a, b, None, self.scale, self._conv())
        fn = _OutputAxisFn if self.axis == "output" else _InputAxisFn
        return fn.apply(x, w, bias, a, b, self.channel_scale(), self.scale, self._conv())


class DoRALinear(DoRAModule):
    """DoRA/LoRA around nn.Linear: lora_down Linear(in, r), lora_up Linear(r, out), no biases."""

    def _make_lora(self, rank):
        base = self.base
        return nn.Linear(base.in_features, rank, bias=False), nn.Linear(rank, base.out_features, bias=False)

    def _conv(self):
        return None

    def _as_layer_input(self, x):
        return x.reshape(-1, x.shape[-1]), x.shape[:-1]


class DoRAConv2d(DoRAModule):
    """DoRA/LoRA around nn.Conv2d (groups 1, zero padding; any kernel, stride, padding, dilation).

    LoCon layout: lora_down Conv2d(in, r) with the base kernel/stride/padding/dilation, lora_up a
    1×1 Conv2d(r, out); no biases.
    """

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, **kwargs):
        if base.groups != 1:
            raise ConfigError(f"DoRA/LoRA on Conv2d supports groups=1 only, got groups={base.groups} for {base}: "
                              "exclude this layer from the adapter (network.exclude)")
        if base.padding_mode != "zeros":
            raise ConfigError(f"DoRA/LoRA on Conv2d supports padding_mode='zeros' only, got {base.padding_mode!r} "
                              f"for {base}: exclude this layer from the adapter (network.exclude)")
        _numeric_padding(base)
        super().__init__(base, rank, alpha, **kwargs)

    def _make_lora(self, rank):
        base = self.base
        down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, _numeric_padding(base), base.dilation,
                         bias=False)
        up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        return down, up

    def _conv(self):
        return tuple(self.base.stride), _numeric_padding(self.base), tuple(self.base.dilation)


def _numeric_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """The conv's padding as two ints ('valid' → 0; 'same' when symmetric)."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            if total % 2:
                raise ConfigError(f"{conv}: padding='same' with an even effective kernel is asymmetric and not "
                                  "supported by DoRAConv2d: exclude this layer from the adapter (network.exclude)")
            pads.append(total // 2)
        return tuple(pads)
    return tuple(conv.padding)
