"""kohya adapter names: a table of names as they appear in kohya/LyCORIS files, plus completeness checks."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from sdtrain.adapters import names
from sdtrain.models import ldm_layout
from sdtrain.models.ldm_layout import pipeline_to_single_file_state_dict
from sdtrain.models.tiny import build_tiny_pipeline

# (arch, component, module path in our model, name written by kohya sd-scripts / LyCORIS)
EXPECTED = [
    ("sdxl", "unet", "down_blocks.0.downsamplers.0.conv", "lora_unet_input_blocks_3_0_op"),
    ("sdxl", "unet", "down_blocks.0.resnets.0.conv1", "lora_unet_input_blocks_1_0_in_layers_2"),
    ("sdxl", "unet", "down_blocks.1.resnets.0.conv2", "lora_unet_input_blocks_4_0_out_layers_3"),
    ("sdxl", "unet", "down_blocks.1.resnets.0.conv_shortcut", "lora_unet_input_blocks_4_0_skip_connection"),
    ("sdxl", "unet", "down_blocks.1.resnets.1.time_emb_proj", "lora_unet_input_blocks_5_0_emb_layers_1"),
    ("sdxl", "unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
     "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
    ("sdxl", "unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
     "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_out_0"),
    ("sdxl", "unet", "down_blocks.2.attentions.1.transformer_blocks.1.ff.net.0.proj",
     "lora_unet_input_blocks_8_1_transformer_blocks_1_ff_net_0_proj"),
    ("sdxl", "unet", "down_blocks.2.attentions.0.proj_in", "lora_unet_input_blocks_7_1_proj_in"),
    ("sdxl", "unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
     "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2"),
    ("sdxl", "unet", "mid_block.resnets.1.conv1", "lora_unet_middle_block_2_in_layers_2"),
    ("sdxl", "unet", "up_blocks.0.attentions.2.proj_out", "lora_unet_output_blocks_2_1_proj_out"),
    ("sdxl", "unet", "up_blocks.0.upsamplers.0.conv", "lora_unet_output_blocks_2_2_conv"),
    ("sdxl", "unet", "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
     "lora_unet_output_blocks_3_1_transformer_blocks_0_attn2_to_k"),
    ("sdxl", "unet", "up_blocks.2.resnets.2.conv2", "lora_unet_output_blocks_8_0_out_layers_3"),
    ("sdxl", "unet", "time_embedding.linear_1", "lora_unet_time_embed_0"),
    ("sdxl", "unet", "add_embedding.linear_2", "lora_unet_label_emb_0_2"),
    ("sd15", "unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
    ("sd15", "unet", "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0",
     "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0"),
    ("sd15", "unet", "mid_block.attentions.0.proj_in", "lora_unet_mid_block_attentions_0_proj_in"),
    ("sd15", "unet", "down_blocks.0.downsamplers.0.conv", "lora_unet_down_blocks_0_downsamplers_0_conv"),
    ("sd15", "te1", "encoder.layers.11.self_attn.q_proj", "lora_te_text_model_encoder_layers_11_self_attn_q_proj"),
    ("sd2", "te1", "encoder.layers.22.mlp.fc2", "lora_te_text_model_encoder_layers_22_mlp_fc2"),
    ("sdxl", "te1", "encoder.layers.0.mlp.fc1", "lora_te1_text_model_encoder_layers_0_mlp_fc1"),
    ("sdxl", "te2", "text_model.encoder.layers.31.self_attn.out_proj",
     "lora_te2_text_model_encoder_layers_31_self_attn_out_proj"),
    ("sdxl", "te2", "text_model.encoder.layers.5.self_attn.v_proj", "lora_te2_text_model_encoder_layers_5_self_attn_v_proj"),
]


@pytest.mark.parametrize("arch, component, path, expected", EXPECTED)
def test_expected_names(arch, component, path, expected):
    assert names.kohya_name(arch, component, path) == expected


@pytest.fixture(scope="module")
def real_unet_indexes():
    """Released-size UNets on the meta device (structure only, no memory)."""
    out = {}
    for arch in ("sd15", "sdxl"):
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(ldm_layout.REFERENCE_UNET_CONFIGS[arch])
        out[arch] = names.module_index(arch, unet)
    return out


def test_released_unets_name_counts(real_unet_indexes):
    # kohya sd-scripts reports 192 (SD1.5) and 722 (SDXL) U-Net LoRA modules for attention layers
    # (transformer-block Linear layers plus proj_in / proj_out).
    for arch, count in (("sd15", 192), ("sdxl", 722)):
        attention = [n for n in real_unet_indexes[arch] if "transformer_blocks" in n or n.endswith(("proj_in", "proj_out"))]
        assert len(attention) == count
    for arch, component, path, expected in EXPECTED:
        if component == "unet" and arch in real_unet_indexes:
            assert real_unet_indexes[arch][expected] == ("unet", path)


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def tiny(request):
    arch = request.param
    pipe = build_tiny_pipeline(arch, seed=0)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if arch == "sdxl" else [])
    return arch, pipe, encoders


def test_every_layer_gets_a_unique_name(tiny):
    arch, pipe, encoders = tiny
    index = names.module_index(arch, pipe.unet, encoders)
    layers = [(c, p) for c, model in zip(("unet", "te1", "te2"), [pipe.unet, *encoders])
              for p, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len(index) == len(layers) and set(index.values()) == set(layers)
    for name, (component, path) in index.items():
        assert name.startswith(names.PREFIXES[arch][component]) and "." not in name
        assert names.diffusers_module_for(arch, name, index) == (component, path)
        assert names.diffusers_module_for(arch, name + ".lora_down.weight", index) == (component, path)
        assert names.parse_kohya_name(name)[0] == component
    if arch == "sdxl":
        assert not any(n.startswith("lora_unet_down_blocks") for n in index)  # SDXL uses LDM paths
    with pytest.raises(KeyError):
        names.diffusers_module_for(arch, "lora_unet_no_such_layer", index)


def test_checkpoint_key_covers_every_layer(tiny):
    arch, pipe, encoders = tiny
    state = pipeline_to_single_file_state_dict(pipe, arch)
    index = names.module_index(arch, pipe.unet, encoders)
    width = encoders[-1].config.hidden_size
    modules = {"unet": pipe.unet, "te1": encoders[0], "te2": encoders[-1]}
    checked = 0
    for name, (component, path) in index.items():
        if path == "text_projection":
            with pytest.raises(ValueError):
                names.checkpoint_key(arch, name, pipe.unet.config, clip_width=width)
            continue
        key, rows = names.checkpoint_key(arch, name, pipe.unet.config, clip_width=width)
        weight = modules[component].get_submodule(path).weight
        stored = state[key] if rows is None else state[key][rows]
        assert stored.shape == weight.shape, name
        assert torch.equal(stored, weight), name
        checked += 1
    assert checked == len(index) - (arch == "sdxl")


def test_checkpoint_key_for_released_models():
    assert names.checkpoint_key("sdxl", "lora_unet_output_blocks_2_2_conv") == (
        "model.diffusion_model.output_blocks.2.2.conv.weight", None)
    assert names.checkpoint_key("sd15", "lora_unet_up_blocks_0_upsamplers_0_conv") == (
        "model.diffusion_model.output_blocks.2.1.conv.weight", None)
    assert names.checkpoint_key("sd15", "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_out_0") == (
        "model.diffusion_model.input_blocks.5.1.transformer_blocks.0.attn2.to_out.0.weight", None)
    assert names.checkpoint_key("sd15", "lora_te_text_model_encoder_layers_0_self_attn_k_proj") == (
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight", None)
    assert names.checkpoint_key("sdxl", "lora_te1_text_model_encoder_layers_10_mlp_fc2") == (
        "conditioner.embedders.0.transformer.text_model.encoder.layers.10.mlp.fc2.weight", None)
    g = "conditioner.embedders.1.model.transformer.resblocks.7."
    assert names.checkpoint_key("sdxl", "lora_te2_text_model_encoder_layers_7_self_attn_q_proj") == (
        g + "attn.in_proj_weight", slice(0, 1280))
    assert names.checkpoint_key("sdxl", "lora_te2_text_model_encoder_layers_7_self_attn_v_proj") == (
        g + "attn.in_proj_weight", slice(2560, 3840))
    assert names.checkpoint_key("sdxl", "lora_te2_text_model_encoder_layers_7_mlp_fc1") == (g + "mlp.c_fc.weight", None)
    assert names.checkpoint_key("sd2", "lora_te_text_model_encoder_layers_3_self_attn_k_proj") == (
        "cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight", slice(1024, 2048))


def test_parse_kohya_name():
    assert names.parse_kohya_name("lora_te_text_model_encoder_layers_0_mlp_fc1") == ("te1", "text_model_encoder_layers_0_mlp_fc1")
    assert names.parse_kohya_name("lora_te1_text_model_x") == ("te1", "text_model_x")
    assert names.parse_kohya_name("lora_te2_text_model_x.alpha") == ("te2", "text_model_x")
    assert names.parse_kohya_name("lora_unet_input_blocks_3_0_op.lora_down.weight") == ("unet", "input_blocks_3_0_op")
    with pytest.raises(ValueError):
        names.parse_kohya_name("unet.down_blocks.0")


def test_groups_and_bad_components():
    assert names.GROUPS == {"sd15": ("unet", "te1"), "sd2": ("unet", "te1"), "sdxl": ("unet", "te1", "te2")}
    with pytest.raises(ValueError):
        names.kohya_name("sd15", "te2", "encoder.layers.0.mlp.fc1")
    with pytest.raises(ValueError):
        names.kohya_name("sd3", "unet", "conv_in")
