"""Export targets: the dora_scale encodings, what each consumer makes of them, and the config checks.

`targets.EXACT_IN` is the contract (which consumer rebuilds which axis/rule exactly at strength 1); here every
export target × consumer is measured with `verify` on the tiny SD1.5 and SDXL models (UNet attention, MLP and
convolutions, both text encoders) and must give the verdict the contract names. The loaders' rules are the
replays in `ui_rules`, checked against the loaders' own code in tests/integrations/test_real_loaders.py.
"""

from __future__ import annotations

import types

import pytest
import torch

from helpers_adapters import CONVS, encoders, randomize
from sdtrain.adapters.inject import NetworkSpec, inject_adapters
from sdtrain.config import load_config
from sdtrain.errors import ConfigError
from sdtrain.export import targets, ui_rules
from sdtrain.export.adapter_file import apply_adapter_file, load_adapter, save_adapter
from sdtrain.export.metadata import build_metadata
from sdtrain.export.verify import LOADERS, verify_adapter
from sdtrain.models.tiny import build_tiny_pipeline

# (network type, axis) -> targets: every target with each axis it can hold, and a plain LoRA
CASES = {("dora", "output"): ("comfyui", "forge", "lycoris"), ("dora", "input"): ("portable", "a1111", "comfyui"),
         ("lora", "output"): ("comfyui",)}


def trained(arch, kind, axis, seed=3):
    """Adapters on the tiny model's attention layers, a few convolutions and every text encoder."""
    pipe = build_tiny_pipeline(arch, seed=0)
    spec = NetworkSpec(type=kind, rank=4, alpha=3.0, decompose_axis=axis, preset="attn", include=[CONVS],
                       train_text_encoder=True)
    adapters = inject_adapters(pipe.unet, encoders(pipe), arch, spec)
    torch.manual_seed(seed)
    randomize(adapters.modules.values(), up_std=0.03, magnitude_spread=0.05)
    return adapters, spec


def trained_file(folder, arch, kind, axis, target):
    adapters, spec = trained(arch, kind, axis)
    return save(adapters, spec, folder, arch, target), adapters


def save(adapters, spec, folder, arch, target):
    return save_adapter(adapters, folder / f"{arch}-{spec.type}-{spec.decompose_axis}-{target}.safetensors",
                        dtype="fp16", target=target, metadata=build_metadata(arch, spec, output_name="t"))


def base_of(arch):
    pipe = build_tiny_pipeline(arch, seed=0)
    return types.SimpleNamespace(arch=arch, unet=pipe.unet, text_encoders=encoders(pipe), source=f"tiny {arch}")


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """verify reports at strength 1 (and 0.5 for SDXL) for every case on both tiny architectures."""
    folder = tmp_path_factory.mktemp("targets")
    found = {}
    for arch in ("sd15", "sdxl"):
        base = base_of(arch)
        for (kind, axis), names in CASES.items():
            adapters, spec = trained(arch, kind, axis)
            for target in names:
                path = save(adapters, spec, folder, arch, target)
                for strength in (1.0, 0.5) if arch == "sdxl" and target != "forge" else (1.0,):
                    found[(arch, kind, axis, target, strength)] = verify_adapter(path, base, strength=strength)
    return found


def test_every_target_and_consumer_gives_the_contracted_verdict(reports):
    lines = [f"{'case':<36}" + "".join(f"{name:>14}" for name in LOADERS)]
    for (arch, kind, axis, target, strength), report in reports.items():
        file_axis = axis if kind == "dora" else None
        rule = targets.TARGETS[target].rule
        assert report.axis == file_axis and report.target == target and report.rule == rule
        assert report.requested == list(targets.TARGETS[target].claims)
        cells = ["refused" if report.result(name).failures else f"{report.result(name).max_rel_error:.1e}"
                 for name in LOADERS]
        lines.append(f"{arch}/{kind}/{axis}/{target}/k={strength:g}".ljust(36) + "".join(f"{c:>14}" for c in cells))
        for name in LOADERS:
            result = report.result(name)
            expected = targets.expected_exact(name, file_axis, rule)
            if strength != 1.0 and name == "lycoris" and file_axis:
                expected = False  # LyCORIS applies the strength to the magnitude ratio
            if kind == "lora" and name != "diffusers" or expected:
                assert result.verdict == "exact", (arch, axis, target, strength, name, result.max_rel_error)
            else:
                assert result.verdict != "exact", (arch, axis, target, strength, name, result.max_rel_error)
                assert result.remedy != "-"
        lycoris_strength = target == "lycoris" and strength != 1.0
        assert report.exit_code() == (1 if lycoris_strength else 0)  # every consumer a target claims is exact
    print("\nmax relative error per consumer (tiny models, fp16 up/down):\n" + "\n".join(lines))


def test_claims_are_consistent_with_the_contract():
    for target in targets.TARGETS.values():
        for axis in target.axes:
            for consumer in target.claims:
                assert targets.expected_exact(consumer, axis, target.rule), (target.name, axis, consumer)
    assert targets.targets_exact_in("comfyui", "output") == ["comfyui", "forge"]
    assert targets.targets_exact_in("lycoris", "output") == ["lycoris"]
    assert targets.targets_exact_in("a1111", "output") == [] and targets.targets_exact_in("lycoris", "input") == []


@pytest.mark.parametrize("shape", [(40, 24), (24, 16, 3, 3)])
def test_comfyui_encoding_makes_the_w0_norm_rule_exact(shape):
    torch.manual_seed(0)
    w0 = torch.randn(shape, dtype=torch.float64)
    down = torch.randn(4, *shape[1:], dtype=torch.float64) * 0.2
    up = torch.randn(shape[0], 4, *[1] * (len(shape) - 2), dtype=torch.float64) * 0.2
    delta = (up.flatten(1) @ down.flatten(1)).reshape(shape)
    v = w0 + delta
    m = v.flatten(1).norm(dim=1) * (1 + 0.1 * torch.randn(shape[0], dtype=torch.float64))
    exact = v * (m / v.flatten(1).norm(dim=1)).reshape(-1, *[1] * (len(shape) - 1))
    stored = targets.encode_magnitude(targets.COMFYUI_W0_NORM, m, w0, delta, "output")
    dora_scale = stored.reshape(shape[0], *[1] * (len(shape) - 1))
    rebuilt = ui_rules.comfyui_current(w0.float(), down.float(), up.float(), 4.0, dora_scale)
    assert ((rebuilt.double() - exact).abs().max() / exact.abs().max()).item() < 2e-6
    decoded = targets.decode_magnitude(targets.COMFYUI_W0_NORM, stored, w0, delta, "output")
    torch.testing.assert_close(decoded.double(), m, rtol=1e-6, atol=0)
    assert torch.equal(targets.encode_magnitude(targets.COMFYUI_W0_NORM, m[:24], w0, delta, "input"), m[:24].float())


@pytest.mark.parametrize("target", ["comfyui", "lycoris"])
def test_reading_a_file_restores_the_trained_magnitudes(tmp_path, target):
    path, trained = trained_file(tmp_path, "sd15", "dora", "output", target)
    adapter_file = load_adapter(path)
    assert adapter_file.target == target and adapter_file.rule == targets.TARGETS[target].rule
    pipe = build_tiny_pipeline("sd15", seed=0)
    fresh = inject_adapters(pipe.unet, encoders(pipe), "sd15",
                            NetworkSpec(rank=4, alpha=3.0, preset="attn", include=[CONVS], train_text_encoder=True))
    apply_adapter_file(adapter_file, fresh)
    for name, module in trained.modules.items():
        torch.testing.assert_close(fresh.modules[name].magnitude, module.magnitude, rtol=2e-6, atol=0)


def test_a_target_that_cannot_hold_the_axis_is_refused(tmp_path):
    pipe = build_tiny_pipeline("sd15", seed=0)
    adapters = inject_adapters(pipe.unet, encoders(pipe), "sd15", NetworkSpec(rank=4, preset="attn"))
    with pytest.raises(ConfigError, match='decompose_axis = "input"'):
        save_adapter(adapters, tmp_path / "x.safetensors", target="a1111")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.fixture
def config(tmp_path):
    (tmp_path / "images").mkdir()
    path = tmp_path / "run.toml"
    path.write_text('[model]\npath = "builtin:tiny-sd15"\n[[data.subsets]]\npath = "images"\n[train]\nmax_steps = 2\n')
    return path


@pytest.mark.parametrize("overrides,fragments", [
    (['save.target="a1111"'], ["'save.target'", 'cannot hold output-axis DoRA', 'decompose_axis = "input"']),
    (['save.target="lycoris"', 'network.decompose_axis="input"'], ["'save.target'", "output-axis modules only"]),
    (['save.targets=["a1111"]'], ["'save.targets'", "a1111 does not apply output-axis DoRA", "sdtrain's ComfyUI nodes"]),
    (['save.targets=["lycoris"]'], ["'save.targets'", 'set save.target = "lycoris"']),
    (['save.target="portable"', 'network.decompose_axis="input"', 'save.targets=["lycoris"]'],
     ["'save.targets'", 'train with network.decompose_axis = "output"']),
])
def test_config_refuses_targets_that_cannot_be_exact(config, overrides, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(config, overrides)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_config_accepts_consistent_targets(config):
    cfg = load_config(config, ['save.target="portable"', 'network.decompose_axis="input"',
                               'save.targets=["comfyui", "forge", "a1111", "comfyui-fixed"]'])
    assert (cfg.save.target, cfg.save.targets) == ("portable", ["comfyui", "forge", "a1111", "comfyui-fixed"])
    assert load_config(config, ['network.type="lora"', 'save.target="a1111"', 'save.targets=["diffusers"]'])
    assert load_config(config, ["save.targets=[]"]).save.targets == []
