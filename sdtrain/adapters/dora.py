"""DoRA (and plain LoRA) layers wrapping nn.Linear and nn.Conv2d, in the kohya/LyCORIS layout.

    W' = m · V / ‖V‖,   V = W0 + s·B·A,   s = alpha / rank

`lora_down` holds A, `lora_up` holds B, `magnitude` holds m (fp32; one entry per output channel for
axis "output", per input channel for axis "input"). ‖V‖ is never formed densely in the training
forward: the per-channel squared norm comes from the low-rank identity

    output axis: ‖V‖²_row = ‖W0‖²_row + 2s·rowdot(W0·Aᵀ, B) + s²·rowdot(B·(A·Aᵀ), B)
    input axis:  ‖V‖²_col = ‖W0‖²_col + 2s·coldot(Bᵀ·W0, A) + s²·coldot((Bᵀ·B)·A, A)

(conv weights flattened to [out, in·kh·kw]; the input axis sums the kh·kw columns of each input
channel), computed in fp32 and clamped at 0; ‖V‖ = sqrt(‖V‖² + NORM_EPS). With c = m / ‖V‖:

    output axis: y = c ⊙ (x·W0ᵀ + s·(x·Aᵀ)·Bᵀ) + bias
    input axis:  y = (x ⊙ c)·W0ᵀ + s·((x ⊙ c)·Aᵀ)·Bᵀ + bias   (exact for convs: zero padding commutes)

The strength-1 path runs in custom autograd Functions that keep what plain LoRA keeps (x and the
rank-sized x·Aᵀ) plus, for the output axis, the layer output itself, from which the pre-scale
activations are recovered in backward as (y − bias) / c; channels with |c| < _SMALL_SCALE are
recomputed exactly instead. Temporaries are processed in row chunks so the peak stays near LoRA's.
1/‖V‖ is kept until A, B or W0 change; when the output-axis forward of an fp32 Linear has to recompute it
and x is small next to W0, A·W0ᵀ comes from the forward's own product [x; A]·W0ᵀ (W0 is read once).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from sdtrain.errors import ConfigError

__all__ = ["NORM_EPS", "AXES", "DoRAModule", "DoRALinear", "DoRAConv2d", "weight_norm", "weight_norm_squared"]

AXES = ("output", "input")
NORM_EPS = 1e-12  # added to the squared channel norm inside the square root
_SMALL_SCALE = 1e-3  # |m/‖V‖| below this: recompute the pre-scale activations of that channel in backward
_CHUNK_ELEMS = 1 << 17  # elementwise reductions work in chunks of about this many elements
_MIN_CHUNK = 128  # matmul chunks never get fewer rows/columns than this (GEMM efficiency)
_FORWARD_CHUNK_ELEMS = 1 << 22  # input-axis forward: scale x in row chunks above this size
_CONV_WEIGHT_CHUNK = 1 << 22  # frozen convs run in output-channel chunks of ≤ this many weights
_CONV_GRAD_CHUNKS = 4  # conv input gradients whose g exceeds the chunk budget: this many chunks
_SAVE_PRESCALE_ELEMS = 1 << 15  # output axis: outputs up to this size keep the pre-scale activations z for backward
_FOLD_RATIO = 1.0  # output axis: scale W0's rows (not the output) when a filter has < this × output rows elements
_SHARED_NORM_RATIO = 0.5  # fp32 Linear, output axis: A·W0ᵀ from the forward product when x ≤ this × W0 in size


# ---------------------------------------------------------------- dense helpers (export, verification, tests)


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
    """Shape that broadcasts a per-channel vector over a weight of `ndim` dims on `axis`."""
    if axis == "output":
        return (-1,) + (1,) * (ndim - 1)
    return (1, -1) + (1,) * (ndim - 2)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype` (t itself when it already is: skips the call, which matters on small layers)."""
    return t if t.dtype == dtype else t.to(dtype)


def _fp32_product(a: torch.Tensor, b: torch.Tensor, weight_side: str) -> torch.Tensor:
    """a @ b in fp32 where one side ("left"/"right") is a frozen weight of any dtype.

    A non-fp32 weight is converted in row chunks of ≤ _CHUNK_ELEMS·4 elements, not all at once.
    """
    w = a if weight_side == "left" else b
    if w.dtype == torch.float32:
        return torch.mm(a, b)
    step = max(1, (_CHUNK_ELEMS * 4) // max(w.shape[1], 1))
    if weight_side == "left":  # rows of the result
        return torch.cat([a[sl].to(torch.float32) @ b for sl in _steps(a.shape[0], step)])
    result = None
    for sl in _steps(b.shape[0], step):  # reduction over the weight's rows
        part = a[:, sl] @ b[sl].to(torch.float32)
        result = part if result is None else result.add_(part)
    return result


def _steps(total: int, step: int) -> list[slice]:
    step = max(int(step), 1)
    return [slice(i, min(i + step, total)) for i in range(0, total, step)]


def _dot_rows(a: torch.Tensor, b: torch.Tensor, offset: torch.Tensor | None, budget: int) -> torch.Tensor:
    """Σ over rows of a ⊙ (b − offset) for 2-D [rows, channels] tensors, in fp32.

    Works in row chunks of about `budget` elements so the temporary stays bounded.
    """
    off = None if offset is None else offset.to(torch.float32)
    if a.numel() <= budget:  # one temporary of a's size (vecdot multiplies, then sums)
        if off is not None:
            return (b - off).mul_(a).sum(0)
        if a.dtype == b.dtype == torch.float32:
            return torch.linalg.vecdot(a, b, dim=0)
        return (a * b.to(torch.float32)).sum(0)
    slices = _steps(a.shape[0], budget // max(a.shape[1], 1))
    total = None
    for sl in slices:
        prod = a[sl] * b[sl].to(torch.float32) if off is None else (b[sl] - off).mul_(a[sl])
        total = prod.sum(0) if total is None else total.add_(prod.sum(0))
        del prod  # free before the next chunk is allocated
    return total


def _scaled_mm(g: torch.Tensor, c: torch.Tensor, w: torch.Tensor, budget: int) -> torch.Tensor:
    """(g ⊙ c) @ w for g [T, out], c [out], w [out, K] with temporaries of about `budget` elements.

    Chunks over rows of g when the weight is cheap to re-read (out < 2T), else over the out
    dimension, each chunk accumulating into the result; chunks keep ≥ _MIN_CHUNK rows/columns.
    """
    rows, out = g.shape
    cc = _cast(c, g.dtype)
    if rows * out <= budget:
        return torch.mm(g * cc, w)
    if out < 2 * rows:
        result = g.new_empty(rows, w.shape[1])
        for sl in _steps(rows, max(_MIN_CHUNK, budget // out)):
            part = g[sl] * cc
            torch.mm(part, w, out=result[sl])
            del part
        return result
    result = None
    for sl in _steps(out, max(_MIN_CHUNK, budget // rows)):
        part = g[:, sl] * cc[sl]
        result = part @ w[sl] if result is None else result.addmm_(part, w[sl])
        del part
    return result


def norm_squared_delta(cross: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float, axis: str,
                       in_channels: int | None = None, in_place: bool = True,
                       cross_transposed: bool = False) -> torch.Tensor:
    """‖W0 + s·B·A‖² − ‖W0‖² per channel by the low-rank identity, for one layer or a batch of layers.

    a [(G,) r, K] and b [(G,) out, r] in fp32 (K = in·kh·kw); cross = W0·Aᵀ [(G,) out, r] (or, with
    `cross_transposed`, A·W0ᵀ [(G,) r, out]: the faster batched product on small layers) for axis "output",
    Bᵀ·W0 [(G,) r, K] for axis "input" (consumed when `in_place`). `in_channels` (convs, input axis) sums
    the kh·kw columns of each input channel.
    """
    if axis == "output" and cross_transposed:
        # tᵀ = 2s·A·W0ᵀ + s²·(A·Aᵀ)·Bᵀ, [r, out]; ‖V‖²_row − ‖W0‖²_row = coldot(tᵀ, Bᵀ)
        bt = b.transpose(-1, -2)
        m1, m2, right, dim = a @ a.transpose(-1, -2), bt, bt, -2
    elif axis == "output":
        # t = 2s·W0·Aᵀ + s²·B·(A·Aᵀ), [out, r]; ‖V‖²_row − ‖W0‖²_row = rowdot(t, B)
        m1, m2, right, dim = b, a @ a.transpose(-1, -2), b, -1
    else:
        # t = 2s·Bᵀ·W0 + s²·(Bᵀ·B)·A, [r, K]; ‖V‖²_col − ‖W0‖²_col = coldot(t, A)
        m1, m2, right, dim = b.transpose(-1, -2) @ b, a, a, -2
    batched = cross.dim() == 3
    if in_place:
        t = (cross.baddbmm_ if batched else cross.addmm_)(m1, m2, beta=2 * s, alpha=s * s)
        low = t.mul_(right).sum(dim)
    else:
        t = (torch.baddbmm if batched else torch.addmm)(cross, m1, m2, beta=2 * s, alpha=s * s)
        low = (t * right).sum(dim)
    if axis == "input" and in_channels is not None:
        low = low.unflatten(-1, (in_channels, -1)).sum(-1)
    return low


def norm_state_key(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> tuple:
    """What a channel norm computed from A, B and W0 depends on: their storage and version counters.

    Raises RuntimeError for inference tensors (they have no version counter).
    """
    return a._version, b._version, w._version, a.data_ptr(), b.data_ptr(), w.data_ptr()


def _scaled_rows(w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """c ⊙ W0 per output channel (first dim), in W0's dtype."""
    return w * c.to(w.dtype).view(_channel_shape("output", w.dim()))


# ---------------------------------------------------------------- layer-specific tensor ops


class _LinearOps:
    """Ops of a Linear adapter on 2-D activations x [T, in], y [T, out]."""

    def base(self, x, w, bias):
        return torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())

    def down(self, x, a):
        return torch.mm(x, a.t())

    def base_and_cross(self, x, w, a):
        """x·W0ᵀ and A·W0ᵀ from one product [x; A]·W0ᵀ, or None where two products are cheaper.

        The shared product reads W0 once instead of twice (a second pass over a large W0 runs at memory
        speed) and makes one larger GEMM. It costs a copy of x, and the caller must copy (or scale into a
        new tensor) the first result, a view that would keep the A·W0ᵀ rows alive; so it is used only where
        both are small next to W0: x with at most _SHARED_NORM_RATIO × W0's elements and the output no wider
        than the input. And only in fp32 (the norm needs fp32 products).
        """
        rows, (out, width) = x.shape[0], w.shape
        if (not (x.dtype == w.dtype == a.dtype == torch.float32) or rows > _SHARED_NORM_RATIO * out
                or out > width):
            return None
        full = torch.mm(torch.cat([x, a]), w.t())
        return full[:rows], full[rows:]

    def up(self, h, b):
        return torch.mm(h, b.t())

    def add_up_(self, y, h, b, alpha):
        y.addmm_(h, b.t(), alpha=alpha)

    def scale_shift_(self, y, c, bias):
        if bias is None:
            y.mul_(c)
        else:
            torch.addcmul(bias, y, c, out=y)

    def scaled(self, z, c, bias):
        """c ⊙ z + bias as a new tensor."""
        return z * c if bias is None else torch.addcmul(bias, z, c)

    def up_input_grad(self, g, b):
        return torch.mm(g, b)

    def base_input_grad(self, g, w, x, c=None, budget=0):
        return torch.mm(g, w) if c is None else _scaled_mm(g, c, w, budget)

    def down_backward(self, gh, x, a, grad_x, need_a):
        """Adds the down-projection's input gradient into grad_x (if given); returns grad of A."""
        if grad_x is not None:
            grad_x.addmm_(gh, a)
        return torch.mm(gh.t(), x) if need_a else None

    def up_weight_grad(self, g, h):
        return torch.mm(g.t(), h)

    def channel_dot(self, a, b, offset, budget):
        """Σ a ⊙ (b − offset) per channel (last dim), fp32."""
        return _dot_rows(a, b, offset, budget)

    def out_view(self, v):
        return v

    in_view = out_view

    def recompute(self, x, w, h, b, s, idx):
        """Pre-scale outputs x·W0ᵀ + s·h·Bᵀ of channels idx, [T, len(idx)]."""
        return torch.addmm(x @ w[idx].t(), h, b[idx].t(), alpha=s)

    def take(self, t, idx):
        return t[:, idx]

    def scaled_input_forward(self, x, c, w, bias, a):
        """(x ⊙ c)·W0ᵀ + bias and (x ⊙ c)·Aᵀ (in row chunks for large x)."""
        rows, width = x.shape
        cc = _cast(c, x.dtype)
        if rows * width <= _FORWARD_CHUNK_ELEMS:
            xc = x * cc
            return self.base(xc, w, bias), self.down(xc, a)
        y = x.new_empty(rows, w.shape[0])
        h = x.new_empty(rows, a.shape[0])
        for sl in _steps(rows, max(_MIN_CHUNK, _FORWARD_CHUNK_ELEMS // width)):
            xc = x[sl] * cc
            if bias is None:
                torch.mm(xc, w.t(), out=y[sl])
            else:
                torch.addmm(bias, xc, w.t(), out=y[sl])
            torch.mm(xc, a.t(), out=h[sl])
            del xc
        return y, h

    @staticmethod
    def sizes(x, w, r):
        """Element counts of the input gradient and of the A and B gradients, for chunk budgets."""
        return x.numel(), r * (w.shape[0] + w.shape[1])

    @staticmethod
    def output_rows(x, w):
        """Output elements per output channel."""
        return x.shape[0]


class _ConvOps:
    """Ops of a Conv2d adapter (groups 1) on 4-D activations [N, C, H, W]."""

    def __init__(self, stride, padding, dilation):
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def _conv(self, x, w, bias=None):
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation)

    def _backward(self, g, x, w, mask):
        return torch.ops.aten.convolution_backward(g, x, w, None, list(self.stride), list(self.padding),
                                                   list(self.dilation), False, [0, 0], 1, mask)

    def base(self, x, w, bias):
        """The frozen conv; on CPU in output-channel chunks of ≤ _CONV_WEIGHT_CHUNK weights (bounds
        oneDNN's reorder of a large weight, e.g. 59 MB for SDXL's 1280-channel 3×3 convs in fp32)."""
        out = w.shape[0]
        chunks = -(-w.numel() // _CONV_WEIGHT_CHUNK) if x.device.type == "cpu" else 1
        if chunks == 1:
            return self._conv(x, w, bias)
        y = None
        for sl in _steps(out, -(-out // chunks)):
            part = self._conv(x, w[sl], None if bias is None else bias[sl])
            if y is None:
                channels_last = part.dim() == 4 and part.is_contiguous(memory_format=torch.channels_last)
                fmt = torch.channels_last if channels_last and not part.is_contiguous() else torch.contiguous_format
                y = part.new_empty(part.shape[0], out, *part.shape[2:]).to(memory_format=fmt)
            y[:, sl] = part
            del part
        return y

    def down(self, x, a):
        return self._conv(x, a)

    def base_and_cross(self, x, w, a):
        """Never shared for convs (their products with W0 are not one GEMM): None."""
        return None

    def up(self, h, b):
        return F.conv2d(h, b)

    def add_up_(self, y, h, b, alpha):
        n, out = y.shape[:2]
        b2 = b.reshape(out, -1)
        if y.is_contiguous() and h.is_contiguous():
            y.view(n, out, -1).baddbmm_(b2.expand(n, *b2.shape), h.view(n, h.shape[1], -1), alpha=alpha)
        else:
            y.add_(F.conv2d(h, b), alpha=alpha)

    def scale_shift_(self, y, c, bias):
        cv = c.view(1, -1, 1, 1)
        if bias is None:
            y.mul_(cv)
        else:
            torch.addcmul(bias.view(1, -1, 1, 1), y, cv, out=y)

    def scaled(self, z, c, bias):
        cv = c.view(1, -1, 1, 1)
        return z * cv if bias is None else torch.addcmul(bias.view(1, -1, 1, 1), z, cv)

    def up_input_grad(self, g, b):
        n, out = g.shape[:2]
        b2 = b.reshape(out, -1)
        return torch.matmul(b2.t(), g.reshape(n, out, -1)).view(n, b2.shape[1], *g.shape[2:])

    def base_input_grad(self, g, w, x, c=None, budget=0):
        """Input gradient of the base conv for g (⊙ c), in output-channel chunks.

        Chunks bound the scaled copy of g and, on CPU, oneDNN's reorders of the weight (≤
        _CONV_WEIGHT_CHUNK weights) and of g: _CONV_GRAD_CHUNKS chunks when g is larger than `budget`.
        On CPU this measured no slower than one call and is used alike for LoRA and DoRA.
        """
        out = w.shape[0]
        cpu = g.device.type == "cpu"
        chunks = -(-w.numel() // _CONV_WEIGHT_CHUNK) if cpu else 1
        if g.numel() > budget and (cpu or c is not None):
            chunks = max(chunks, _CONV_GRAD_CHUNKS)
        cc = None if c is None else c.to(g.dtype).view(1, -1, 1, 1)
        result = None
        for sl in _steps(out, -(-out // chunks)):
            part = g[:, sl] if cc is None else g[:, sl] * cc[:, sl]
            gx = self._backward(part, x, w[sl], [True, False, False])[0]
            del part
            result = gx if result is None else result.add_(gx)
            del gx
        return result

    def down_backward(self, gh, x, a, grad_x, need_a):
        gx, ga, _ = self._backward(gh, x, a, [grad_x is not None, need_a, False])
        if grad_x is not None:
            grad_x.add_(gx)
        return ga

    def up_weight_grad(self, g, h):
        n, out = g.shape[:2]
        r = h.shape[1]
        gh = torch.matmul(g.reshape(n, out, -1), h.reshape(n, r, -1).transpose(1, 2)).sum(0)
        return gh.view(out, r, 1, 1)

    def channel_dot(self, a, b, offset, budget):
        """Σ over N, H, W of a ⊙ (b − offset) per channel (dim 1), fp32, in channel chunks."""
        n, channels = a.shape[:2]
        if offset is None and a.numel() <= budget:
            return (a * b.to(torch.float32)).sum((0, 2, 3))
        total = torch.empty(channels, dtype=torch.float32, device=a.device)
        off = None if offset is None else offset.to(torch.float32).view(1, -1, 1, 1)
        for sl in _steps(channels, budget // max(a[:, 0].numel(), 1)):
            if off is None:
                prod = a[:, sl] * b[:, sl].to(torch.float32)
            else:
                prod = (b[:, sl] - off[:, sl]).mul_(a[:, sl])
            total[sl] = prod.sum((0, 2, 3))
            del prod
        return total

    def out_view(self, v):
        return v.view(1, -1, 1, 1)

    in_view = out_view

    def recompute(self, x, w, h, b, s, idx):
        z = self._conv(x, w[idx])
        z.add_(F.conv2d(h, b[idx]), alpha=s)
        return z

    def take(self, t, idx):
        return t[:, idx]

    def scaled_input_forward(self, x, c, w, bias, a):
        xc = x * c.to(x.dtype).view(1, -1, 1, 1)
        return self.base(xc, w, bias), self.down(xc, a)

    @staticmethod
    def sizes(x, w, r):
        """Element counts of the input gradient and of the A and B gradients, for chunk budgets."""
        return x.numel(), r * (w.shape[0] + w[0].numel())

    def output_rows(self, x, w):
        """Output elements per output channel: N·H_out·W_out."""
        rows = x.shape[0]
        for size, k, s, p, d in zip(x.shape[2:], w.shape[2:], self.stride, self.padding, self.dilation):
            rows *= (size + 2 * p - d * (k - 1) - 1) // s + 1
        return rows


# ---------------------------------------------------------------- autograd Functions (strength 1)


class _OutputAxisFn(torch.autograd.Function):
    """y = c ⊙ (base(x) + s·up(down(x))) + bias; plain LoRA when c is None. Base weight and bias frozen.

    c is the channel scale itself, or (when `inv` is given) the magnitude m with c = m ⊙ inv, inv the
    detached 1/‖V‖; the gradient then goes to m directly. `inv` may also be a function computing 1/‖V‖
    from A·W0ᵀ (or from nothing, given None): it is then computed here, from the forward's own product
    where `ops.base_and_cross` can share it. Saves x, x·Aᵀ and (DoRA) either the output
    y, from which backward recovers the pre-scale activations z as (y − bias) / c (recomputing channels
    with |c| < _SMALL_SCALE exactly), or, for outputs of ≤ _SAVE_PRESCALE_ELEMS elements, z itself:
    fewer ops where per-op overhead dominates, for at most that many elements more memory.
    The reduction for grad c runs first, before the input and weight gradients exist; the scaled
    copy of g runs in chunks of ≤ max(A and B gradient size, 5% of grad x + output), so the peak
    stays within a few percent of plain LoRA's.
    """

    @staticmethod
    def forward(ctx, x, w, bias, a, b, c, inv, s, ops):
        h = ops.down(x, a)
        ctx.ops, ctx.s, ctx.prescale = ops, s, False
        if c is None:
            y = ops.base(x, w, bias)
            ops.add_up_(y, h, b, s)
            ctx.save_for_backward(x, w, bias, a, b, h, None, None, None)
            return y
        rows = ops.output_rows(x, w)
        prescale = rows * w.shape[0] <= _SAVE_PRESCALE_ELEMS
        # c ⊙ (x·W0ᵀ) = x·(c ⊙ W0)ᵀ: scale the weight instead of the output where the weight is smaller
        ctx.fold = not prescale and w.numel() // w.shape[0] < rows * _FOLD_RATIO
        if ctx.fold:
            inv = inv(None) if callable(inv) else inv
            c = c if inv is None else c * inv
            y = ops.base(x, _scaled_rows(w, c), bias)
        else:
            y, inv, shared = _base_and_inverse_norm(ops, x, w, a, inv)
            c = c if inv is None else c * inv
            if prescale:  # y is z: keep it, return c ⊙ z + bias
                z = y.clone() if shared else y  # not the view of the shared product
                ops.add_up_(z, h, b, s)
                ctx.prescale = True
                ctx.save_for_backward(x, w, None, a, b, h, c, inv, z)
                return ops.scaled(z, _cast(c, z.dtype), bias)
            if shared:  # scale into a new tensor: the shared product, A·W0ᵀ rows included, is freed
                y = ops.scaled(y, _cast(c, y.dtype), bias)
            else:
                ops.scale_shift_(y, c, bias)
        ops.add_up_(y, h, b * _cast(c, b.dtype).view(_channel_shape("output", b.dim())), s)
        ctx.save_for_backward(x, w, bias, a, b, h, c, inv, y)
        return y

    @staticmethod
    def backward(ctx, g):
        x, w, bias, a, b, h, c, inv, y = ctx.saved_tensors
        ops, s = ctx.ops, ctx.s
        needs = ctx.needs_input_grad
        need_x, need_a, need_b, need_c = needs[0], needs[3], needs[4], needs[5]
        grad_x = grad_a = grad_b = grad_c = None
        if ctx.prescale:  # y holds z; work with g ⊙ c directly (small tensors)
            gc = g * ops.out_view(_cast(c, g.dtype))
            if need_c:
                grad_c = ops.channel_dot(g, y, None, g.numel())
                grad_c = grad_c if inv is None else grad_c.mul_(inv)
            if need_x or need_a:
                gh = ops.up_input_grad(gc, b * s)
                grad_x = ops.base_input_grad(gc, w, x) if need_x else None
                grad_a = ops.down_backward(gh, x, a, grad_x, need_a)
            if need_b:
                grad_b = ops.up_weight_grad(gc, h).mul_(s)
            return grad_x, None, None, grad_a, grad_b, grad_c, None, None, None
        x_size, grads_size = ops.sizes(x, w, a.shape[0])
        if need_c:
            grad_c = _scale_grad(ops, g, y, bias, c, x, w, h, b, s, min(x_size + grads_size, _CHUNK_ELEMS))
            grad_c = grad_c if inv is None else grad_c.mul_(inv)
        coef = s if c is None else (c if s == 1.0 else s * c).to(b.dtype).view(_channel_shape("output", b.dim()))
        if need_x or need_a:
            gh = ops.up_input_grad(g, b * coef)
            budget = max(grads_size, (x_size + g.numel()) // 20)  # ≤ 5% of LoRA's grad_x + output
            if not need_x:
                grad_x = None
            elif c is not None and ctx.fold:  # (g ⊙ c)·W0 = g·(c ⊙ W0)
                grad_x = ops.base_input_grad(g, _scaled_rows(w, c), x, None, budget)
            else:
                grad_x = ops.base_input_grad(g, w, x, c, budget)
            grad_a = ops.down_backward(gh, x, a, grad_x, need_a)
        if need_b:
            grad_b = ops.up_weight_grad(g, h).mul_(coef)
        return grad_x, None, None, grad_a, grad_b, grad_c, None, None, None


def _base_and_inverse_norm(ops, x, w, a, inv):
    """x·W0ᵀ, 1/‖V‖ and whether x·W0ᵀ is a view of a shared product with A·W0ᵀ: a pending 1/‖V‖ (a function
    of A·W0ᵀ or None) is computed here, from the same product as x·W0ᵀ where the ops can share it."""
    if not callable(inv):
        return ops.base(x, w, None), inv, False
    shared = ops.base_and_cross(x, w, a)
    if shared is None:
        return ops.base(x, w, None), inv(None), False
    z, cross_t = shared
    return z, inv(cross_t), True


def _scale_grad(ops, g, y, bias, c, x, w, h, b, s, budget) -> torch.Tensor:
    """Σ g ⊙ z per output channel, z = pre-scale activations = (y − bias) / c (recomputed where c ≈ 0)."""
    grad_c = ops.channel_dot(g, y, bias, budget).div_(c)
    if torch.linalg.vector_norm(c, -math.inf).item() < _SMALL_SCALE:  # min |c|
        idx = (c.abs() < _SMALL_SCALE).nonzero().flatten()
        grad_c[idx] = ops.channel_dot(ops.take(g, idx), ops.recompute(x, w, h, b, s, idx), None, budget)
    return grad_c


class _InputAxisFn(torch.autograd.Function):
    """y = base(x ⊙ c) + s·up(down(x ⊙ c)) + bias, c per input channel. Base weight and bias frozen.

    Saves what plain LoRA saves (x, x·Aᵀ); x ⊙ c is recomputed where needed.
    """

    @staticmethod
    def forward(ctx, x, w, bias, a, b, c, inv, s, ops):
        if inv is not None:
            c = c * inv
        y, h = ops.scaled_input_forward(x, c, w, bias, a)
        ops.add_up_(y, h, b, s)
        ctx.ops, ctx.s = ops, s
        ctx.save_for_backward(x, w, a, b, h, c, inv)
        return y

    @staticmethod
    def backward(ctx, g):
        x, w, a, b, h, c, inv = ctx.saved_tensors
        ops, s = ctx.ops, ctx.s
        need_x, need_a, need_b, need_c = (ctx.needs_input_grad[i] for i in (0, 3, 4, 5))
        x_size, grads_size = ops.sizes(x, w, a.shape[0])
        grad_x = grad_a = grad_b = grad_c = None
        if need_x or need_a or need_c:
            gh = ops.up_input_grad(g, b * s)
            budget = max(grads_size, (x_size + g.numel()) // 20)
            grad_xc = ops.base_input_grad(g, w, x, None, budget) if (need_x or need_c) else None
            if grad_xc is not None:
                ops.down_backward(gh, x, a, grad_xc, False)
            if need_c:
                # grad_xc exists, the A and B gradients not yet: chunks up to their size are free
                grad_c = ops.channel_dot(x, grad_xc, None, max(grads_size, min(_CHUNK_ELEMS, x_size // 16)))
                grad_c = grad_c if inv is None else grad_c.mul_(inv)
            if need_x:
                grad_x = grad_xc.mul_(ops.in_view(c))
            del grad_xc
            if need_a:
                grad_a = ops.down_backward(gh, x, a, None, True)
                grad_a.mul_(c.to(grad_a.dtype).view(_channel_shape("input", grad_a.dim())))
        if need_b:
            grad_b = ops.up_weight_grad(g, h).mul_(s)
        return grad_x, None, None, grad_a, grad_b, grad_c, None, None, None


# ---------------------------------------------------------------- modules


class DoRAModule(nn.Module):
    """DoRA/LoRA adapter around a frozen base layer. See the module docstring for the math.

    Attributes: base, lora_down, lora_up, magnitude (fp32 Parameter or None), rank, alpha, scale
    (alpha/rank), axis, decompose, detach_norm, multiplier (strength k), merged.
    """

    fused = True  # False: always the plain-autograd path (same math; for benchmarks and debugging)
    _norm_batch = None  # a ChannelNormBatch computing this adapter's 1/‖V‖ together with its peers

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

    def __setstate__(self, state):
        """Unpickled and deep-copied modules start without a cached 1/‖V‖ (its key names the original's tensors)."""
        super().__setstate__(state)
        self._inverse_norm_cache = None

    # -- subclass hooks
    def _make_lora(self, rank: int) -> tuple[nn.Module, nn.Module]:
        raise NotImplementedError

    def _ops(self):
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

    # -- weights
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
        """Dense W0 + k·(W' − W0) in fp32 (W' = m·V/‖V‖ for DoRA, V for LoRA), for export and checks."""
        w0 = self.original_weight().detach().to(torch.float32)
        v = w0 + self.delta_weight()
        if self.decompose:
            norm = (weight_norm_squared(v, self.axis) + NORM_EPS).sqrt()
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
        """‖W0‖² per channel on the axis (fp32 buffer, recomputed when the base weight changes).

        Changes are detected through the weight's storage and version counter (in-place updates,
        `load_state_dict`, `.to()`); after writing to `base.weight.data` directly call `refresh_norms()`.
        """
        w = self.original_weight()
        key = self._weight_key(w)
        cached = self.base_norm_sq
        if key is None or key != self._norm_key or cached.dtype != torch.float32 or cached.is_inference():
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor even when sampling
                cached = weight_norm_squared(w.detach(), self.axis)
            if key is not None:
                self.base_norm_sq = cached
                self._norm_key = key
        return cached

    def refresh_norms(self) -> None:
        """Forget the cached ‖W0‖² and 1/‖V‖ (needed only after writing to a weight's `.data` in place)."""
        self._norm_key = None
        self._inverse_norm_cache = None
        if self._norm_batch is not None:
            self._norm_batch.forget()

    def norm_squared(self, cross_t: torch.Tensor | None = None) -> torch.Tensor:
        """‖V‖² per channel on the axis via the low-rank identity (fp32, ≥ 0, differentiable in A and B).

        Costs one r-column product with W0 (out·in·kh·kw·r multiply-adds) and rank-sized products;
        the dense V is never formed. `cross_t`: A·W0ᵀ in fp32 (output axis) when the caller already has it
        (it is then consumed).
        """
        w0 = self.original_weight().detach()
        shape = w0.shape
        w0 = w0.reshape(shape[0], -1)
        a = self.lora_down.weight.to(torch.float32).reshape(self.rank, -1)
        b = self.lora_up.weight.to(torch.float32).reshape(shape[0], self.rank)
        in_place = not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
        in_channels = shape[1] if len(shape) > 2 else None
        if cross_t is not None:
            if self.axis != "output":
                raise ValueError("A·W0ᵀ gives the output-axis norm only")
            low = norm_squared_delta(cross_t, a, b, self.scale, "output", None, in_place, cross_transposed=True)
        else:
            cross = (_fp32_product(w0, a.t(), "left") if self.axis == "output"
                     else _fp32_product(b.t(), w0, "right"))
            low = norm_squared_delta(cross, a, b, self.scale, self.axis, in_channels, in_place)
        base = self.base_norm_squared()
        return low.add_(base).clamp_min_(0) if in_place else (low + base).clamp_min(0)

    def inverse_norm(self) -> torch.Tensor:
        """1/‖V‖ per channel on the axis (fp32, no gradient): batched with same-shaped adapters when
        `batch_channel_norms` grouped this one, else computed here.

        The value is kept until A, B or W0 change (storage or version counter, as an optimizer step, `.to()`
        or `load_state_dict` do), so gradient accumulation, the recomputing forward of gradient checkpointing
        and the denoising steps of a sample pay for the norm once per weight update.
        """
        inv, key = self._known_inverse_norm()
        return inv if inv is not None else self._compute_inverse_norm(key)

    def _known_inverse_norm(self) -> tuple[torch.Tensor | None, tuple | None]:
        """(1/‖V‖ from the batch or kept from an earlier call, else None; the key a new value is kept under)."""
        batch = self._norm_batch
        if batch is not None:
            inv = batch.inverse_norm(self)
            if inv is not None:
                return inv, None
        try:
            key = (self.alpha, self.axis, self.merged,
                   *norm_state_key(self.lora_down.weight, self.lora_up.weight, self.original_weight()))
        except RuntimeError:  # inference tensors have no version counter: nothing to key a cache on
            return None, None
        cached = self._inverse_norm_cache
        if cached is not None and cached[0] == key:
            return cached[1], key
        return None, key

    def _compute_inverse_norm(self, key: tuple | None, cross_t: torch.Tensor | None = None) -> torch.Tensor:
        """1/‖V‖ computed now (from A·W0ᵀ when given), kept under `key` (unless None)."""
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor even when sampling
            if cross_t is not None and cross_t.is_inference():
                cross_t = cross_t.clone()
            inv = self.norm_squared(cross_t).add_(NORM_EPS).rsqrt_()
        self._inverse_norm_cache = None if key is None else (key, inv)
        return inv

    def _channel_scale(self) -> torch.Tensor:
        if self.detach_norm:
            return self.magnitude * self.inverse_norm()
        return self.magnitude * (self.norm_squared() + NORM_EPS).rsqrt()

    def channel_scale(self) -> torch.Tensor:
        """c = m / ‖V‖ per channel (fp32, ‖V‖ = sqrt(‖V‖² + NORM_EPS)), ‖V‖ detached when detach_norm."""
        with torch.autocast(self.base.weight.device.type, enabled=False):
            return self._channel_scale()

    # -- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = float(self.multiplier)
        if self.merged or k == 0.0:
            return self.base(x)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):  # compute in the autocast dtype, with autocast off inside
            dtype = torch.get_autocast_dtype(device_type) if x.is_floating_point() else x.dtype
            with torch.autocast(device_type, enabled=False):
                return self._layer_forward(x, dtype, k)
        return self._layer_forward(x, x.dtype, k)

    def _layer_forward(self, x, dtype, k):
        """The adapted layer on x in the compute dtype, autocast off: in the ops' layout and back."""
        xd, lead = self._as_layer_input(_cast(x, dtype))
        y = self._adapted(xd, dtype, k)
        return y if lead is None else y.view(*lead, y.shape[-1])

    def _adapted(self, x, dtype, k):
        """The adapted layer on x (already in the compute dtype and layout), autocast off."""
        base = self.base
        w = _cast(base.weight, dtype)
        bias = None if base.bias is None else _cast(base.bias, dtype)
        a = _cast(self.lora_down.weight, dtype)
        b = _cast(self.lora_up.weight, dtype)
        fast = self.fused and not (w.requires_grad or (bias is not None and bias.requires_grad))
        if not self.decompose:
            if fast:
                return _OutputAxisFn.apply(x, w, bias, a, b, None, None, k * self.scale, self._ops())
            return self._composite(x, w, bias, a, b, None, k)
        if fast and k == 1.0:
            if not self.detach_norm:
                fn = _OutputAxisFn if self.axis == "output" else _InputAxisFn
                return fn.apply(x, w, bias, a, b, self._channel_scale(), None, self.scale, self._ops())
            # the Function takes m and 1/‖V‖ and returns the gradient of m itself
            if self.axis == "input":
                return _InputAxisFn.apply(x, w, bias, a, b, self.magnitude, self.inverse_norm(), self.scale,
                                          self._ops())
            inv, key = self._known_inverse_norm()
            if inv is None:  # computed in the Function, from its forward product where that can be shared
                inv = functools.partial(self._compute_inverse_norm, key)
            return _OutputAxisFn.apply(x, w, bias, a, b, self.magnitude, inv, self.scale, self._ops())
        return self._composite(x, w, bias, a, b, self._channel_scale(), k)

    def _composite(self, x, w, bias, a, b, c, k):
        """Plain-autograd path (any strength, trainable base weight): the layer with weight W0 + k·(W' − W0)."""
        ops, s = self._ops(), self.scale
        dtype = x.dtype
        if c is None:
            y = ops.base(x, w, bias)
            return y + ops.up(ops.down(x, a), b) * (k * s)
        if self.axis == "output":
            base_coef = ((1.0 - k) + k * c).to(dtype)
            up_coef = (k * s * c).to(dtype)
            y = ops.base(x, w, None) * ops.out_view(base_coef) + ops.up(ops.down(x, a), b) * ops.out_view(up_coef)
            return y if bias is None else y + ops.out_view(bias)
        base_coef = ((1.0 - k) + k * c).to(dtype)
        return (ops.base(x * ops.in_view(base_coef), w, bias)
                + ops.up(ops.down(x * ops.in_view(c.to(dtype)), a), b) * (k * s))


class DoRALinear(DoRAModule):
    """DoRA/LoRA around nn.Linear: lora_down Linear(in, r), lora_up Linear(r, out), no biases."""

    def _make_lora(self, rank):
        base = self.base
        return nn.Linear(base.in_features, rank, bias=False), nn.Linear(rank, base.out_features, bias=False)

    def _ops(self):
        return _LinearOps()

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

    def _ops(self):
        return _ConvOps(self.base.stride, _numeric_padding(self.base), self.base.dilation)


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
