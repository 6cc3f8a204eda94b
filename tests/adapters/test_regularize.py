"""Adapter dropout (sdtrain.adapters.regularize) against formulas written out here: kohya's network / rank / module
dropout on plain LoRA, rank dropout before the norm on DoRA, the seeded stream, and that nothing changes while the
stream is not armed."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sdtrain.adapters.dora import DoRAConv2d, DoRALinear
from sdtrain.adapters.regularize import DropoutStream, LayerDropout, attach_dropout


def make_layer(kind="linear", decompose=True, axis="output", rank=3, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    base = nn.Linear(8, 6) if kind == "linear" else nn.Conv2d(4, 5, 3, padding=1)
    layer = (DoRALinear if kind == "linear" else DoRAConv2d)(base.to(dtype), rank, 2.0, decompose=decompose,
                                                               axis=axis)
    with torch.no_grad():
        layer.lora_up.weight.normal_()
        if decompose:
            layer.magnitude.mul_(1.3)
    return layer


def inputs(kind="linear", n=2, dtype=torch.float32):
    torch.manual_seed(1)
    return torch.randn(n, 7, 8, dtype=dtype) if kind == "linear" else torch.randn(n, 4, 5, 5, dtype=dtype)


def with_dropout(layer, stream, p=0.0, p_rank=0.0, p_module=0.0, index=0):
    layer.dropout = LayerDropout(stream, index, p, p_rank, p_module)
    return layer


CASES = [(kind, decompose, axis) for kind in ("linear", "conv") for decompose, axis in
         ((False, "output"), (True, "output"), (True, "input"))]


@pytest.mark.parametrize("kind,decompose,axis", CASES)
def test_the_dropout_path_at_zero_equals_the_fused_path(kind, decompose, axis):
    """The composed ops of the dropout path compute the same layer as the fused Functions."""
    layer, x = make_layer(kind, decompose, axis), inputs(kind)
    fused = layer(x)
    stream = DropoutStream(0)
    with_dropout(layer, stream)
    with stream.batch(0):
        composed = layer(x)
    torch.testing.assert_close(composed, fused, rtol=1e-5, atol=1e-5)


def test_all_zero_attaches_nothing_so_the_fused_path_runs_bit_for_bit():
    from sdtrain.adapters.adapter_set import AdapterSet

    layer, x = make_layer(), inputs()
    before = layer(x)
    adapters = AdapterSet(arch="sd15", spec=None)
    adapters.add("lora_unet_x", "unet", "x", layer)
    assert attach_dropout(adapters, 0.0, 0.0, 0.0, seed=1) is None
    assert layer.dropout is None
    assert torch.equal(layer(x), before)


@pytest.mark.parametrize("kind,decompose,axis", CASES)
def test_module_dropout_one_returns_the_base_layer(kind, decompose, axis):
    layer, x = make_layer(kind, decompose, axis), inputs(kind)
    stream = DropoutStream(5)
    with_dropout(layer, stream, p_module=1.0)
    with stream.batch(3):
        out = layer(x)
    assert torch.equal(out, layer.base(x))
    assert not torch.allclose(layer(x), out)  # not armed: the adapter is back


def test_module_dropout_skips_whole_forwards_at_its_rate():
    layer, x = make_layer(), inputs()
    stream = DropoutStream(0)
    with_dropout(layer, stream, p_module=0.3)
    base = layer.base(x)
    skipped = 0
    for batch in range(400):
        with stream.batch(batch):
            skipped += torch.equal(layer(x), base)
    assert 0.23 < skipped / 400 < 0.37


def lora_coefficients(layer, x, out):
    """Per sample, token and rank: the coefficient of each column of B in (out − base(x)) / s (B orthonormal)."""
    delta = (out - layer.base(x)).double() / layer.scale
    return delta @ layer.lora_up.weight.double()  # Bᵀ·delta with orthonormal columns


def orthonormal_up(layer):
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(layer.lora_up.weight.shape[0], layer.rank, dtype=torch.float64))
        layer.lora_up.weight.copy_(q.float())


def test_rank_dropout_on_lora_drops_ranks_per_sample_scaled_as_kohya():
    """kohya: h ⊙ mask[sample, rank], update × s / (1 − p), the scale fixed (not from the mask)."""
    p = 0.5
    layer, x = make_layer(decompose=False), inputs(n=16)
    orthonormal_up(layer)
    stream = DropoutStream(7)
    with_dropout(layer, stream, p_rank=p)
    with stream.batch(0):
        out = layer(x)
    h = (x @ layer.lora_down.weight.t()).double()
    coefficients = lora_coefficients(layer, x, out)
    kept = torch.isclose(coefficients, h / (1 - p), rtol=1e-4, atol=1e-5)
    dropped = coefficients.abs() < 1e-5
    assert bool((kept | dropped).all())
    per_sample = kept.all(1)  # one decision per sample and rank, the same for every token
    assert torch.equal(per_sample, ~dropped.all(1))
    assert len({tuple(row.tolist()) for row in per_sample}) > 1  # the samples draw their own masks
    assert 0.25 < per_sample.float().mean().item() < 0.75


def test_network_dropout_on_lora_drops_elements_of_the_down_output():
    p = 0.25
    layer, x = make_layer(decompose=False), inputs(n=4)
    orthonormal_up(layer)
    stream = DropoutStream(7)
    with_dropout(layer, stream, p=p)
    with stream.batch(2):
        out = layer(x)
    h = (x @ layer.lora_down.weight.t()).double()
    coefficients = lora_coefficients(layer, x, out)
    kept = torch.isclose(coefficients, h / (1 - p), rtol=1e-4, atol=1e-5)
    dropped = coefficients.abs() < 1e-5
    assert bool((kept | dropped).all())
    assert 0.6 < kept.float().mean().item() < 0.9


@pytest.mark.parametrize("kind,axis", [("linear", "output"), ("linear", "input"), ("conv", "output"), ("conv", "input")])
def test_rank_dropout_on_dora_drops_ranks_before_the_norm(kind, axis):
    """W' = m·V/‖V‖ with V = W0 + s/(1−p)·B·diag(d)·A for one rank mask d of the forward pass (float64 reference)."""
    p = 0.5
    layer, x = make_layer(kind, True, axis), inputs(kind)
    stream = DropoutStream(11)
    with_dropout(layer, stream, p_rank=p)
    with stream.batch(4):
        out = layer(x).double()
    w0 = layer.base.weight.double()
    a = layer.lora_down.weight.double().reshape(layer.rank, -1)
    b = layer.lora_up.weight.double().reshape(w0.shape[0], layer.rank)
    m = layer.magnitude.double()
    matches = []
    for d in itertools.product((0.0, 1.0), repeat=layer.rank):
        v = w0 + (layer.scale / (1 - p) * (b * torch.tensor(d, dtype=torch.float64)) @ a).reshape(w0.shape)
        if axis == "output":
            norm = v.reshape(v.shape[0], -1).norm(dim=1)
            weight = v * (m / norm).view(-1, *[1] * (v.dim() - 1))
        else:
            norm = v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1)
            weight = v * (m / norm).view(1, -1, *[1] * (v.dim() - 2))
        bias = layer.base.bias.double()
        ref = (torch.nn.functional.linear(x.double(), weight, bias) if kind == "linear"
               else torch.nn.functional.conv2d(x.double(), weight, bias, padding=1))
        if torch.allclose(out, ref, rtol=1e-4, atol=1e-4):
            matches.append(d)
    assert len(matches) == 1


def test_masks_are_a_function_of_the_global_batch_and_the_sample_slot():
    """Same batch: same masks (a resume, a recomputing forward); a sample's mask depends on its slot in the global
    batch, not on which process or micro-batch slice computes it."""
    layer, x = make_layer(decompose=False), inputs(n=2)
    stream = DropoutStream(3)
    with_dropout(layer, stream, p=0.3, p_rank=0.5)
    with stream.batch(9):
        both, again = layer(x), layer(x)
    with stream.batch(9, slot_offset=1):
        second = layer(x[1:])
    with stream.batch(10):
        other = layer(x)
    assert torch.equal(both, again)
    torch.testing.assert_close(second, both[1:], rtol=0, atol=1e-6)
    assert not torch.allclose(other, both)
    twin = DropoutStream(4)
    with_dropout(layer, twin, p=0.3, p_rank=0.5)
    with twin.batch(9):
        assert not torch.allclose(layer(x), both)  # another train.seed, other masks


def test_rows_of_a_long_caption_keep_their_masks_on_any_process_slice():
    """A text encoder reads a 150-token caption as 2 rows (windows) per sample, sample-major: the second sample's
    rows draw the same masks when a process computes that sample alone (slot 1, 1 sample) as when one process
    computes both samples."""
    layer, x = make_layer(decompose=False), inputs(n=4)  # 2 samples x 2 windows
    stream = DropoutStream(3)
    with_dropout(layer, stream, p=0.3, p_rank=0.5)
    with stream.batch(9, samples=2):
        both = layer(x)
    with stream.batch(9, slot_offset=1, samples=1):
        second = layer(x[2:])
    with stream.batch(9, slot_offset=0, samples=1):
        first = layer(x[:2])
    torch.testing.assert_close(second, both[2:], rtol=0, atol=1e-6)
    torch.testing.assert_close(first, both[:2], rtol=0, atol=1e-6)
    assert not torch.allclose(both[2:], both[:2])


@pytest.mark.parametrize("decompose", [False, True])
def test_gradient_checkpointing_recomputes_the_same_masks(decompose):
    layer, x = make_layer(decompose=decompose), inputs(n=3)
    stream = DropoutStream(2)
    with_dropout(layer, stream, p=0.2, p_rank=0.4)
    grads = []
    for checkpointed in (False, True):
        layer.zero_grad(set_to_none=True)
        with stream.batch(1):
            out = checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
            out.square().sum().backward()
        grads.append([p.grad.clone() for p in (layer.lora_down.weight, layer.lora_up.weight)])
    for plain, recomputed in zip(*grads):
        assert torch.equal(plain, recomputed)
