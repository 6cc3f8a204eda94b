"""Adapter injection into the tiny SD1.5 / SDXL models: selection, names, identity at init, freezing, removal.

Expected layers come from plain string rules over `named_modules()` written here, independent of the
structural rules in `sdtrain/adapters/presets.py`.
"""

from __future__ import annotations

import copy
import functools
import math
import re

import pytest
import torch
from torch import nn

from sdtrain.adapters.inject import NetworkSpec, count_trainable_params, inject_adapters, plan_injection
from sdtrain.errors import ConfigError, ModelLoadError
from sdtrain.models.tiny import build_tiny_pipeline

ATTN = r"\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
PROJ = r"\.attentions\.\d+\.proj_(in|out)$"
FF = r"\.transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)$"
RESNET = r"\.resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)$"
SAMPLER = r"\.(downsamplers|upsamplers)\.0\.conv$"
TEXT = r"\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))$"
RULES = {"attn": [ATTN], "attn-mlp": [ATTN, PROJ, FF], "full": [ATTN, PROJ, FF, RESNET, SAMPLER]}


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@functools.lru_cache(maxsize=None)
def _pipeline(arch):
    return build_tiny_pipeline(arch, seed=0)


def fresh(arch):
    """Independent copies of the tiny UNet and text encoders."""
    pipe = _pipeline(arch)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if arch == "sdxl" else [])
    return copy.deepcopy(pipe.unet), [copy.deepcopy(te) for te in encoders]


def expected(model, rules):
    """{module path: module} of the layers the string rules select."""
    return {n: m for n, m in model.named_modules() if any(re.search(r, n) for r in rules)}


def adapted_paths(adapters, component):
    return [path for comp, path in adapters.module_paths.values() if comp == component]


def naive_params(weight_shape, rank, dora=True):
    out_features, fan_in = weight_shape[0], math.prod(weight_shape[1:])
    return rank * fan_in + out_features * rank + (out_features if dora else 0)


@torch.no_grad()
def run_unet(unet, arch):
    g = torch.Generator().manual_seed(1)
    dtype = unet.dtype
    sample = torch.randn(1, 4, 8, 8, generator=g).to(dtype)
    context = torch.randn(1, 7, 96 if arch == "sdxl" else 32, generator=g).to(dtype)
    kwargs = {}
    if arch == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 64, generator=g).to(dtype),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]], dtype=dtype)}
    return unet(sample, torch.tensor([700]), context, **kwargs).sample


@torch.no_grad()
def run_text(encoder):
    ids = torch.tensor([[49406, 320, 1125, 539, 49407, 49407, 49407]])
    return encoder(ids).last_hidden_state


def is_adapter(module):
    return hasattr(module, "lora_down") and hasattr(module, "base")


# ------------------------------------------------------------------ selection per preset


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("preset", ["attn", "attn-mlp", "full"])
def test_preset_selects_exactly_the_expected_layers(arch, preset):
    unet, encoders = fresh(arch)
    want_unet = expected(unet, RULES[preset])
    want_text = [expected(te, [TEXT]) for te in encoders]
    spec = NetworkSpec(rank=2, preset=preset, train_text_encoder=True)
    adapters = inject_adapters(unet, encoders, arch, spec)

    assert set(adapted_paths(adapters, "unet")) == set(want_unet)
    for index, want in enumerate(want_text):
        assert set(adapted_paths(adapters, f"te{index + 1}")) == set(want)
    linear = sum(isinstance(m, nn.Linear) for m in want_unet.values())
    conv = sum(isinstance(m, nn.Conv2d) for m in want_unet.values())
    assert linear + conv == len(want_unet)
    assert f"{linear + conv} ({linear} / {conv})" in adapters.report().splitlines()[2]
    assert len(adapters.modules) == len(want_unet) + sum(len(w) for w in want_text)
    assert set(adapters.groups.values()) == {"unet", "te1"} | ({"te2"} if arch == "sdxl" else set())
    # the preset never touches layers outside its rules
    other = [n for n, m in unet.named_modules() if is_adapter(m) and n not in want_unet]
    assert other == []


def test_sd15_proj_layers_are_conv_and_sdxl_proj_layers_are_linear():
    counts = {}
    for arch in ("sd15", "sdxl"):
        unet, encoders = fresh(arch)
        adapters = inject_adapters(unet, encoders, arch, NetworkSpec(rank=2, preset="attn-mlp"))
        counts[arch] = {type(m.base).__name__ for n, m in adapters.modules.items() if n.endswith(("proj_in", "proj_out"))}
    assert counts == {"sd15": {"Conv2d"}, "sdxl": {"Linear"}}


KOHYA_NAMES = {  # kohya name -> (component, diffusers/transformers module path)
    "sdxl": {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
            ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
        "lora_unet_input_blocks_1_0_in_layers_2": ("unet", "down_blocks.0.resnets.0.conv1"),
        "lora_unet_input_blocks_3_0_op": ("unet", "down_blocks.0.downsamplers.0.conv"),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ("te1", "encoder.layers.0.self_attn.q_proj"),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": ("te2", "text_model.encoder.layers.0.self_attn.q_proj"),
    },
    "sd15": {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
        "lora_unet_down_blocks_0_resnets_0_conv1": ("unet", "down_blocks.0.resnets.0.conv1"),
        "lora_te_text_model_encoder_layers_0_mlp_fc1": ("te1", "encoder.layers.0.mlp.fc1"),
    },
}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_kohya_names_map_to_the_right_layers(arch):
    unet, encoders = fresh(arch)
    roots = {"unet": unet, "te1": encoders[0], "te2": encoders[-1]}
    originals = {name: roots[c].get_submodule(p) for name, (c, p) in KOHYA_NAMES[arch].items()}
    adapters = inject_adapters(unet, encoders, arch, NetworkSpec(rank=2, preset="full", train_text_encoder=True))
    for name, (component, path) in KOHYA_NAMES[arch].items():
        assert adapters.module_paths[name] == (component, path)
        assert adapters.groups[name] == component
        assert adapters.modules[name] is roots[component].get_submodule(path)
        assert adapters.modules[name].base is originals[name]


def test_modules_are_in_model_order_with_unique_names():
    unet, encoders = fresh("sdxl")
    adapters = inject_adapters(unet, encoders, "sdxl", NetworkSpec(rank=2, preset="full", train_text_encoder=True))
    order = {("unet", n): i for i, (n, _) in enumerate(unet.named_modules())}
    for k, te in enumerate(encoders):
        order.update({(f"te{k + 1}", n): 10**6 * (k + 1) + i for i, (n, _) in enumerate(te.named_modules())})
    positions = [order[adapters.module_paths[name]] for name in adapters.modules]
    assert positions == sorted(positions)
    assert len(set(adapters.modules)) == len(adapters.modules)
    assert all(name.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for name in adapters.modules)


# ------------------------------------------------------------------ behaviour at init, freezing, removal


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_outputs_at_init_equal_base_in_float64(arch):
    unet, encoders = fresh(arch)
    unet.double()
    for te in encoders:
        te.double()
    base_unet, base_text = run_unet(unet, arch), [run_text(te) for te in encoders]
    inject_adapters(unet, encoders, arch, NetworkSpec(rank=4, preset="full", train_text_encoder=True))
    assert (run_unet(unet, arch) - base_unet).abs().max() <= 1e-6
    for te, base in zip(encoders, base_text):
        assert (run_text(te) - base).abs().max() <= 1e-6


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_outputs_at_init_equal_base_and_remove_restores_the_model(arch):
    unet, encoders = fresh(arch)
    base_unet = run_unet(unet, arch)
    base_text = [run_text(te) for te in encoders]
    originals = {n: m for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}

    adapters = inject_adapters(unet, encoders, arch, NetworkSpec(rank=4, preset="full", train_text_encoder=True))
    # float32: c = m / ||V|| is 1 only up to rounding; measured 1.1e-6 to 1.7e-6 on the text encoders
    assert (run_unet(unet, arch) - base_unet).abs().max() <= 1e-5
    for te, base in zip(encoders, base_text):
        assert (run_text(te) - base).abs().max() <= 1e-5

    # the adapters are live: a non-zero up projection changes the output
    with torch.no_grad():
        for module in adapters.modules.values():
            module.lora_up.weight.normal_(0, 0.5)
    assert (run_unet(unet, arch) - base_unet).abs().max() > 1e-3
    assert (run_text(encoders[0]) - base_text[0]).abs().max() > 1e-3

    adapters.merge_all(1.0)
    adapters.remove()
    assert not any(is_adapter(m) for model in [unet, *encoders] for m in model.modules())
    assert all(unet.get_submodule(n) is m for n, m in originals.items())
    assert torch.equal(run_unet(unet, arch), base_unet)
    for te, base in zip(encoders, base_text):
        assert torch.equal(run_text(te), base)
    assert all(p.requires_grad for model in [unet, *encoders] for p in model.parameters())


def test_only_adapter_parameters_require_grad():
    unet, encoders = fresh("sdxl")
    adapters = inject_adapters(unet, encoders, "sdxl", NetworkSpec(rank=2, preset="attn-mlp"))
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    want = {f"{path}.{p}" for path in expected(unet, RULES["attn-mlp"])
            for p in ("lora_down.weight", "lora_up.weight", "magnitude")}
    assert trainable == want
    # text encoders untouched (train_text_encoder is false) but frozen
    assert not any(p.requires_grad for te in encoders for p in te.parameters())
    assert not any(is_adapter(m) for te in encoders for m in te.modules())
    assert {id(p) for p in adapters.parameters()} == {id(p) for p in unet.parameters() if p.requires_grad}


def test_lora_type_has_no_magnitude():
    unet, encoders = fresh("sd15")
    adapters = inject_adapters(unet, encoders, "sd15", NetworkSpec(type="lora", rank=2, preset="attn"))
    trainable = {n.rsplit(".", 2)[-2] if n.endswith(".weight") else n.rsplit(".", 1)[-1]
                 for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable == {"lora_down", "lora_up"}
    assert all(m.magnitude is None and not m.decompose for m in adapters.modules.values())


def test_conv_rank_and_alpha_apply_to_conv_layers_and_param_counts_match_shapes():
    unet, encoders = fresh("sd15")
    want = expected(unet, RULES["full"])
    spec = NetworkSpec(rank=4, alpha=8, conv_rank=2, preset="full")
    adapters = inject_adapters(unet, encoders, "sd15", spec)
    for name, module in adapters.modules.items():
        if isinstance(module.base, nn.Conv2d):
            assert (module.rank, module.alpha) == (2, 4.0)  # conv_alpha defaults to conv_rank * alpha / rank
        else:
            assert (module.rank, module.alpha) == (4, 8.0)
        assert math.isclose(module.scale, 2.0)
    naive = sum(naive_params(tuple(m.weight.shape), 2 if isinstance(m, nn.Conv2d) else 4) for m in want.values())
    assert sum(p.numel() for p in adapters.parameters()) == naive
    assert f"{naive:,}" in adapters.report()

    unet, encoders = fresh("sd15")
    adapters = inject_adapters(unet, encoders, "sd15", NetworkSpec(rank=4, conv_rank=2, conv_alpha=1.0, preset="full"))
    conv = [m for m in adapters.modules.values() if isinstance(m.base, nn.Conv2d)]
    assert conv and all((m.rank, m.alpha) == (2, 1.0) for m in conv)


# ------------------------------------------------------------------ include / exclude


def test_exclude_removes_layers_by_kohya_name():
    unet, encoders = fresh("sdxl")
    spec = NetworkSpec(rank=2, preset="attn", exclude=["lora_unet_*attn2*"])
    adapters = inject_adapters(unet, encoders, "sdxl", spec)
    want = {n for n in expected(unet, [ATTN]) if ".attn1." in n}
    assert set(adapted_paths(adapters, "unet")) == want
    assert adapters.warnings == []


def test_include_adds_layers_and_exclude_wins():
    unet, encoders = fresh("sd15")
    spec = NetworkSpec(rank=2, preset="attn", include=[r"re:_resnets_\d+_conv1$", "lora_unet_*ff_net_2"],
                       exclude=["re:ff_net"])
    adapters = inject_adapters(unet, encoders, "sd15", spec)
    want = set(expected(unet, [ATTN, r"\.resnets\.\d+\.conv1$"]))
    assert set(adapted_paths(adapters, "unet")) == want
    assert adapters.warnings == []

    unet, encoders = fresh("sdxl")  # SDXL names follow the LDM layout
    spec = NetworkSpec(rank=2, preset="attn", include=["lora_unet_input_blocks_3_0_op"])
    adapters = inject_adapters(unet, encoders, "sdxl", spec)
    assert set(adapted_paths(adapters, "unet")) == set(expected(unet, [ATTN])) | {"down_blocks.0.downsamplers.0.conv"}


def test_patterns_that_match_nothing_warn():
    unet, encoders = fresh("sd15")
    spec = NetworkSpec(rank=2, preset="attn", include=["lora_unet_*nothing*"], exclude=["re:^zzz"])
    adapters = inject_adapters(unet, encoders, "sd15", spec)
    assert len(adapters.modules) == len(expected(unet, [ATTN]))
    assert len(adapters.warnings) == 2
    assert "network.include" in adapters.warnings[0] and "lora_unet_*nothing*" in adapters.warnings[0]
    assert "network.exclude" in adapters.warnings[1] and "re:^zzz" in adapters.warnings[1]


def test_empty_selection_and_unknown_preset_are_config_errors():
    unet, encoders = fresh("sd15")
    with pytest.raises(ConfigError, match=r"network\.preset/include/exclude"):
        inject_adapters(unet, encoders, "sd15", NetworkSpec(preset="attn", exclude=["*"]))
    with pytest.raises(ConfigError, match=r'network\.preset.*"attn", "attn-mlp", "full"'):
        inject_adapters(unet, encoders, "sd15", NetworkSpec(preset="attention"))
    with pytest.raises(ConfigError, match=r"network\.include"):
        inject_adapters(unet, encoders, "sd15", NetworkSpec(include=["re:(unclosed"]))
    assert not any(is_adapter(m) for m in unet.modules())


# ------------------------------------------------------------------ dry run on the meta device


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_meta_device_plan_matches_real_injection(arch):
    from diffusers import UNet2DConditionModel

    unet, encoders = fresh(arch)
    spec = NetworkSpec(rank=4, conv_rank=2, preset="full", train_text_encoder=True, exclude=["*attn2_to_k"])
    from_configs = plan_injection(dict(unet.config), [te.config for te in encoders], arch, spec)
    with torch.device("meta"):
        meta_unet = UNet2DConditionModel.from_config(unet.config)
    from_meta_module = plan_injection(meta_unet, [te.config for te in encoders], arch, spec)

    adapters = inject_adapters(unet, encoders, arch, spec)
    real = [(*adapters.module_paths[n], "conv" if isinstance(m.base, nn.Conv2d) else "linear", n)
            for n, m in adapters.modules.items()]
    assert [tuple(e[:4]) for e in from_configs] == real
    assert from_meta_module == from_configs
    assert count_trainable_params(from_configs, spec) == sum(p.numel() for p in adapters.parameters())


# ------------------------------------------------------------------ AdapterSet helpers


def test_param_groups_state_dict_and_multiplier():
    unet, encoders = fresh("sdxl")
    base = run_unet(unet, "sdxl")
    adapters = inject_adapters(unet, encoders, "sdxl", NetworkSpec(rank=2, preset="attn", train_text_encoder=True))
    groups = adapters.param_groups({"unet": 1e-4, "text_encoder": 5e-5})
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-4), ("te1", 5e-5), ("te2", 5e-5)]
    assert sum(len(g["params"]) for g in groups) == len(adapters.parameters())
    torch.optim.AdamW(groups)  # accepted by an optimizer as is

    with torch.no_grad():
        for module in adapters.modules.values():
            module.lora_up.weight.normal_(0, 0.5)
    trained = run_unet(unet, "sdxl")
    assert (trained - base).abs().max() > 1e-3
    adapters.set_multiplier(0.0)  # no update: magnitude * W / ||W|| = W
    assert (run_unet(unet, "sdxl") - base).abs().max() <= 1e-5
    adapters.set_multiplier(1.0)
    assert (run_unet(unet, "sdxl") - trained).abs().max() <= 1e-6

    state = adapters.trainable_state_dict()
    want = {f"{name}.{p}" for name in adapters.modules for p in ("lora_down.weight", "lora_up.weight", "magnitude")}
    assert set(state) == want
    saved = {k: torch.randn_like(v) for k, v in state.items()}
    adapters.load_trainable_state_dict(saved)
    assert all(torch.equal(adapters.trainable_state_dict()[k], v) for k, v in saved.items())
    with pytest.raises(ModelLoadError, match="network"):
        adapters.load_trainable_state_dict({k: v for k, v in list(saved.items())[1:]})


# ------------------------------------------------------------------ network.blocks


def test_blocks_set_rank_and_alpha_per_layer_first_match_wins():
    """[[network.blocks]]: the first entry whose pattern matches a kohya name sets that layer's rank / alpha; a rank
    without an alpha keeps the layer's scale; counts and the meta-device plan follow the shapes."""
    from sdtrain.adapters.spec import BlockSpec
    from sdtrain.train.blocks import block_learning_rates

    unet, encoders = fresh("sd15")
    blocks = [BlockSpec("lora_unet_up_blocks_*attn2*", rank=8),
              BlockSpec("lora_unet_up_blocks_*", rank=2, alpha=1.0, lr=0.0),
              BlockSpec("re:down_blocks_1_.*_to_q$", alpha=16.0, lr=5e-4),
              BlockSpec("lora_unet_nothing_*", rank=1)]
    spec = NetworkSpec(rank=4, alpha=2.0, preset="attn", blocks=blocks)
    plan = plan_injection(unet.config, [te.config for te in encoders], "sd15", spec)
    adapters = inject_adapters(unet, encoders, "sd15", spec)
    seen = set()
    for name, module in adapters.modules.items():
        if name.startswith("lora_unet_up_blocks_") and "attn2" in name:
            want = (8, 4.0)  # rank 8 at the network's scale 2/4
        elif name.startswith("lora_unet_up_blocks_"):
            want = (2, 1.0)
        elif re.search(r"down_blocks_1_.*_to_q$", name):
            want = (4, 16.0)
        else:
            want = (4, 2.0)
        assert (module.rank, module.alpha) == want, name
        assert tuple(module.lora_down.weight.shape)[0] == want[0]
        seen.add(want)
    assert seen == {(8, 4.0), (2, 1.0), (4, 16.0), (4, 2.0)}
    assert count_trainable_params(plan, spec) == sum(p.numel() for p in adapters.parameters())
    assert any('network.blocks.3.pattern "lora_unet_nothing_*" matches no adapted layer' in w for w in plan.warnings)

    rates = block_learning_rates(spec, adapters.modules)
    assert {n for n, (label, lr) in rates.items() if label == "blocks.1"} == {
        n for n in adapters.modules if n.startswith("lora_unet_up_blocks_") and "attn2" not in n}
    groups = adapters.param_groups({"unet": 1e-4}, rates)
    # model order: the component's own group, then the entries' groups as their first layer comes
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-4), ("unet:blocks.2", 5e-4), ("unet:blocks.1", 0.0)]
    assert sum(len(g["params"]) for g in groups) == len(adapters.parameters())
    assert len({id(p) for g in groups for p in g["params"]}) == len(adapters.parameters())


def test_an_entry_shadowed_by_an_earlier_one_warns():
    from sdtrain.adapters.spec import BlockSpec

    unet, encoders = fresh("sd15")
    spec = NetworkSpec(rank=4, preset="attn", blocks=[BlockSpec("lora_unet_*", lr=1e-4),
                                                      BlockSpec("lora_unet_up_*", rank=2)])
    plan = plan_injection(unet.config, [te.config for te in encoders], "sd15", spec)
    assert any("network.blocks.1" in w and "first match wins" in w for w in plan.warnings)
