"""Adapter checks: malformed files and NaN/inf files are refused when read (with the keys, counted, and the fix);
saving never writes NaN/inf weights, nor weights that overflow save.dtype, and keeps the previous file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from helpers_adapters import encoders, randomize
from sdtrain.adapters.inject import NetworkSpec, inject_adapters
from sdtrain.errors import ModelLoadError, UserError
from sdtrain.export.adapter_file import (
    MalformedAdapter,
    NonFiniteAdapter,
    SaveDtypeOverflow,
    adapter_file_from_tensors,
    apply_adapter_file,
    load_adapter,
    save_adapter,
)
from sdtrain.models.tiny import build_tiny_pipeline

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # Linear 32 -> 32 in tiny SD1.5
K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"


def module(name=Q, rank=4, features=32, dora=True):
    gen = torch.Generator().manual_seed(0)
    tensors = {f"{name}.lora_down.weight": torch.randn(rank, features, generator=gen) * 0.1,
               f"{name}.lora_up.weight": torch.randn(features, rank, generator=gen) * 0.1,
               f"{name}.alpha": torch.tensor(float(rank))}
    if dora:
        tensors[f"{name}.dora_scale"] = torch.rand(features, 1, generator=gen) + 0.5
    return tensors


def good_file():
    return {**module(Q), **module(K)}


def malformed(tensors, metadata=None) -> str:
    with pytest.raises(MalformedAdapter) as err:
        adapter_file_from_tensors(tensors, metadata, "bad.safetensors")
    assert isinstance(err.value, ModelLoadError) and "bad.safetensors" in str(err.value)
    assert "re-export or re-download" in str(err.value)  # the fix
    return str(err.value)


def test_a_well_formed_file_loads():
    adapter = adapter_file_from_tensors(good_file())
    assert sorted(adapter.modules) == sorted([Q, K]) and not adapter.non_finite and adapter.tensor_count == 8


def test_alpha_with_two_elements_is_a_clear_error(tmp_path):
    tensors = good_file()
    tensors[f"{Q}.alpha"] = torch.tensor([4.0, 4.0])
    message = malformed(tensors)
    assert f"alpha holds more than one number: 1 key(s): {Q}.alpha [2]" in message
    path = tmp_path / "alpha2.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(MalformedAdapter, match="alpha holds more than one number"):
        load_adapter(path)


@pytest.mark.parametrize("change, expected", [
    (lambda t: t.update({f"{Q}.lora_up.weight": torch.zeros(32, 3)}), "lora_up and lora_down ranks differ"),
    (lambda t: t.update({f"{Q}.lora_up.weight": torch.zeros(32, 4, 3, 3)}), "lora_up and lora_down ranks differ"),
    (lambda t: t.update({f"{Q}.dora_scale": torch.ones(31, 1)}), "dora_scale fits neither axis"),
    (lambda t: t.update({f"{Q}.dora_scale": torch.tensor(1.0)}), "dora_scale fits neither axis"),
    (lambda t: t.update({f"{Q}.lora_down.weight": torch.zeros(4, 32, dtype=torch.int32)}), "not a float tensor"),
    (lambda t: t.update({f"{Q}.dora_scale": torch.ones(32, 1, dtype=torch.int64)}), "not a float tensor"),
    (lambda t: t.update({f"{Q}.alpha": torch.tensor(True)}), "alpha is not a real number"),
    (lambda t: t.update({f"{Q}.lora_up.weight": torch.zeros(32, 0)}), "empty tensor"),
    (lambda t: t.update({f"{Q}.alpha": torch.zeros(0)}), "empty tensor"),
    (lambda t: t.update({".alpha": torch.tensor(4.0)}), "key with no module name"),
    (lambda t: t.update({"lora_down.weight": torch.zeros(4, 32)}), "key with no module name"),
    (lambda t: t.pop(f"{Q}.lora_up.weight"), f"module has no lora_up.weight"),
])
def test_malformed_tensors_are_named(change, expected):
    tensors = good_file()
    change(tensors)
    assert expected in malformed(tensors)


@pytest.mark.parametrize("metadata, expected", [
    ({"ss_network_args": "{not json"}, "metadata is not valid JSON: 1 key(s): ss_network_args = '{not json'"),
    ({"ss_network_args": "[1, 2]"}, "metadata is not a JSON object"),
    ({"ss_network_args": '{"conv_alpha": "big"}'}, "ss_network_args conv_alpha = 'big'"),
    ({"ss_network_alpha": "nan"}, "ss_network_alpha = 'nan'"),
    ({"sdtrain_dora_scale": "future-rule"}, "a newer sdtrain wrote it: upgrade"),
])
def test_metadata_we_parse_must_parse(metadata, expected):
    assert expected in malformed(good_file(), metadata)


def test_metadata_that_may_be_absent_or_none_is_fine():
    for metadata in ({}, {"ss_network_args": "null", "ss_network_alpha": "None"}, {"ss_network_alpha": "8"}):
        adapter_file_from_tensors(good_file(), metadata)


def test_every_problem_is_reported_counted_with_the_first_keys_named():
    tensors = {}
    names = [f"lora_unet_layer_{i}" for i in range(6)]
    for name in names:
        tensors.update(module(name, dora=False))
        tensors[f"{name}.alpha"] = torch.tensor([1.0, 2.0, 3.0])
    tensors[f"{names[0]}.lora_up.weight"] = torch.zeros(32, 2)
    message = malformed(tensors, {"ss_network_args": "{"})
    assert "alpha holds more than one number: 6 key(s): " in message and "and 3 more" in message
    assert f"{names[0]}.alpha [3]" in message and names[4] + ".alpha" not in message
    assert f"ranks differ: 1 key(s): {names[0]}: lora_up [32, 2], lora_down [4, 32]" in message
    assert "ss_network_args" in message


def test_non_finite_file_is_refused_with_counts(tmp_path):
    tensors = good_file()
    tensors[f"{Q}.lora_up.weight"][0, :3] = float("nan")
    tensors[f"{K}.dora_scale"][5] = float("inf")
    tensors[f"{K}.alpha"] = torch.tensor(float("-inf"))
    path = tmp_path / "nan.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(NonFiniteAdapter) as err:
        load_adapter(path)
    message = str(err.value)
    assert message.startswith(f"{path}: 3 of 8 tensors in 2 module(s) hold NaN/inf (3 NaN, 2 inf)")
    assert f"{Q}.lora_up.weight (3 NaN)" in message and f"{K}.dora_scale (1 inf)" in message
    assert "use an earlier save" in message
    assert isinstance(err.value, UserError) and err.value.path == path
    assert err.value.counts == {f"{Q}.lora_up.weight": (3, 0), f"{K}.alpha": (0, 1), f"{K}.dora_scale": (0, 1)}
    assert sorted(err.value.modules) == sorted([Q, K])

    shown = load_adapter(path, allow_non_finite=True)  # what inspect uses
    assert shown.non_finite == err.value.counts
    pipe = build_tiny_pipeline("sd15", seed=0)
    adapters = inject_adapters(pipe.unet, [pipe.text_encoder], "sd15", NetworkSpec(rank=4, preset="attn"))
    with pytest.raises(NonFiniteAdapter):  # and it cannot be applied to a network
        apply_adapter_file(shown, adapters, strict=False)


def test_fp16_nan_and_fp8_values_are_counted():
    tensors = good_file()
    tensors[f"{Q}.lora_down.weight"] = tensors[f"{Q}.lora_down.weight"].half()
    tensors[f"{Q}.lora_down.weight"][1, 1] = float("nan")
    with pytest.raises(NonFiniteAdapter, match=r"lora_down.weight \(1 NaN\)"):
        adapter_file_from_tensors(tensors)
    if hasattr(torch, "float8_e5m2"):
        tensors = good_file()
        tensors[f"{K}.lora_up.weight"] = tensors[f"{K}.lora_up.weight"].to(torch.float8_e5m2)
        tensors[f"{K}.lora_up.weight"][0, 0] = float("inf")
        with pytest.raises(NonFiniteAdapter, match=r"lora_up.weight \(1 inf\)"):
            adapter_file_from_tensors(tensors)


# ---------------------------------------------------------------- saving


def adapter_set(axis="output"):
    pipe = build_tiny_pipeline("sd15", seed=0)
    spec = NetworkSpec(rank=4, alpha=4.0, decompose_axis=axis, preset="attn", train_text_encoder=True)
    adapters = inject_adapters(pipe.unet, encoders(pipe), "sd15", spec)
    torch.manual_seed(2)
    randomize(adapters.modules.values(), up_std=0.05, magnitude_spread=0.1)
    return adapters


def test_save_refuses_nan_and_keeps_the_previous_file(tmp_path):
    adapters = adapter_set()
    path = save_adapter(adapters, tmp_path / "run.safetensors")
    before = path.read_bytes()
    names = list(adapters.modules)
    with torch.no_grad():
        adapters.modules[names[1]].lora_up.weight[0, 0] = float("nan")
        adapters.modules[names[3]].magnitude[2] = float("inf")
    with pytest.raises(NonFiniteAdapter) as err:
        save_adapter(adapters, path)
    assert not isinstance(err.value, SaveDtypeOverflow)
    message = str(err.value)
    assert f"NaN/inf in 2 of {len(names)} module(s) (1 NaN, 1 inf)" in message
    assert f"{names[1]}.lora_up.weight (1 NaN)" in message and f"{names[3]}.magnitude (1 inf)" in message
    assert "optimizer.lr" in message and "previous file is kept" in message
    assert err.value.modules == [names[1], names[3]]
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["run.safetensors"]


@pytest.mark.parametrize("target", [None, "comfyui"])
def test_save_refuses_weights_that_overflow_fp16(tmp_path, target):
    """The issue's case: weights around 5e29 are finite in fp32 and become inf in fp16."""
    adapters = adapter_set()
    name = list(adapters.modules)[0]
    with torch.no_grad():
        adapters.modules[name].lora_down.weight.mul_(5e29)
    path = tmp_path / "big.safetensors"
    with pytest.raises(SaveDtypeOverflow) as err:
        save_adapter(adapters, path, dtype="fp16", target=target)
    message = str(err.value)
    assert f'overflow save.dtype = "fp16" (|w| above 65504 becomes inf): {name}.lora_down.weight' in message
    assert 'use "bf16" or "fp32"' in message
    assert isinstance(err.value, NonFiniteAdapter) and err.value.modules == [name]
    assert not path.exists() and not list(tmp_path.iterdir())
    # bf16 holds them: the file is written, finite, and reads back
    saved = load_adapter(save_adapter(adapters, path, dtype="bf16", target=target))
    assert saved.modules[name].down.dtype == torch.bfloat16 and not saved.non_finite


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
def test_non_finite_count_equals_counting_every_value(dtype):
    """The min/max fast path against a plain element count, around fp16's rounding edge (65519 stays finite,
    65520 rounds to inf) and with NaN and ±inf planted."""
    from sdtrain.export.file_checks import non_finite_count

    gen = torch.Generator().manual_seed(0)
    cases = [torch.randn(64, generator=gen), torch.full((3,), 65519.0), torch.full((3,), -65520.0),
             torch.tensor([1.0, 5e29, -5e29]), torch.tensor([3e38, 1.0]).double() * 10]
    for _ in range(20):
        t = torch.randn(50, generator=gen) * 10.0 ** torch.randint(0, 38, (1,), generator=gen).item()
        for value in (float("nan"), float("inf"), float("-inf")):
            if torch.rand(1, generator=gen).item() < 0.3:
                t[torch.randint(0, 50, (1,), generator=gen)] = value
        cases.append(t)
    for t in cases:
        cast = t if dtype is None else t.to(dtype)
        want = (int(torch.isnan(cast).sum()), int(torch.isinf(cast).sum()))
        assert non_finite_count(t, dtype) == want, (t, dtype)
