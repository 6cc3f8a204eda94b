"""Single-file checkpoints: our LDM/SGM layout is checked against diffusers' own single-file converter.

diffusers' `from_single_file` has an independent LDM → diffusers converter: loading our file with it must give
back every parameter of the original pipeline unchanged.
"""


import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open

from sdtrain.errors import ModelLoadError
from sdtrain.models import ldm_layout
from sdtrain.models.single_file import detect_single_file_arch, read_state_dict_keys, save_single_file
from sdtrain.models.tiny import build_tiny_pipeline

PIPELINES = {"sd15": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def build_tiny_sd2():
    """SD2-like: the SD1.5 tiny pipeline with an OpenCLIP-style (gelu) text encoder."""
    from transformers import CLIPTextModel

    pipe = build_tiny_pipeline("sd15", seed=0)
    config = pipe.text_encoder.config
    config.hidden_act = "gelu"
    torch.manual_seed(1)
    pipe.text_encoder = CLIPTextModel(config)
    pipe.register_modules(text_encoder=pipe.text_encoder)
    return pipe


@pytest.fixture(scope="module")
def saved_by_arch(tmp_path_factory):
    cache = {}

    def get(arch):
        if arch not in cache:
            pipe = build_tiny_sd2() if arch == "sd2" else build_tiny_pipeline(arch, seed=0)
            root = tmp_path_factory.mktemp(arch)
            pipe.save_pretrained(root / "diffusers", safe_serialization=True)
            path = save_single_file(pipe, arch, root / "model.safetensors")
            cache[arch] = (arch, pipe, root / "diffusers", path)
        return cache[arch]

    return get


@pytest.fixture(params=["sd15", "sdxl", "sd2"])
def saved(request, saved_by_arch):
    return saved_by_arch(request.param)


def components(pipe):
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if hasattr(pipe, "text_encoder_2") else [])
    return {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}


def test_diffusers_loads_every_parameter_back(saved):
    arch, pipe, folder, path = saved
    loaded = PIPELINES[arch].from_single_file(str(path), config=str(folder), local_files_only=True)
    original, restored = components(pipe), components(loaded)
    assert set(original) == set(restored)
    for name, module in original.items():
        a, b = module.state_dict(), restored[name].state_dict()
        assert set(a) == set(b), name
        for key in a:
            assert b[key].device.type == "cpu", f"{name}.{key} was not in the file"
            assert torch.equal(a[key], b[key]), f"{name}.{key} differs after the round trip"


def test_file_is_a_plain_model_ema_free_safetensors(saved):
    arch, pipe, _, path = saved
    keys = read_state_dict_keys(path)
    assert not any(k.startswith("model_ema") for k in keys)
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.",
                             "betas", "alphas", "sqrt_", "log_", "posterior_")) for k in keys)
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata()["format"] == "pt"
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


# Hand-written expectations from the original LDM/SGM code (module names and storage shapes).
def test_known_keys_and_shapes(saved):
    arch, pipe, _, path = saved
    with safe_open(str(path), "pt") as handle:
        shape = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    unet = pipe.unet
    c0 = unet.config.block_out_channels[0]
    assert shape["model.diffusion_model.input_blocks.0.0.weight"] == tuple(unet.conv_in.weight.shape)
    assert shape["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"] == (c0, c0, 3, 3)
    assert shape["model.diffusion_model.input_blocks.3.0.op.weight"] == (c0, c0, 3, 3)
    assert shape["model.diffusion_model.out.2.weight"] == (4, c0, 3, 3)
    assert shape["model.diffusion_model.time_embed.0.weight"] == (4 * c0, c0)
    vae_c = pipe.vae.config.block_out_channels
    assert shape["first_stage_model.encoder.down.0.block.0.conv1.weight"] == (vae_c[0], vae_c[0], 3, 3)
    assert shape["first_stage_model.decoder.up.0.block.0.conv1.weight"] == (vae_c[0], vae_c[1], 3, 3)
    assert shape["first_stage_model.encoder.mid.attn_1.q.weight"] == (vae_c[-1], vae_c[-1], 1, 1)
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in shape
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in shape
    if arch == "sd15":
        assert "model.diffusion_model.output_blocks.2.1.conv.weight" in shape  # up-sampler after a plain ResNet
        assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in shape
        w = pipe.text_encoder.config.hidden_size
        assert shape["cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"] == (w, w)
        assert shape["alphas_cumprod"] == (1000,)
    if arch == "sdxl":
        assert "model.diffusion_model.output_blocks.2.2.conv.weight" in shape  # up-sampler after an attention
        assert "model.diffusion_model.input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight" in shape
        assert shape["model.diffusion_model.label_emb.0.0.weight"] == tuple(unet.add_embedding.linear_1.weight.shape)
        w1, w2 = pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size
        assert shape["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"] == (49408, w1)
        g = "conditioner.embedders.1.model."
        assert shape[g + "transformer.resblocks.0.attn.in_proj_weight"] == (3 * w2, w2)
        assert shape[g + "transformer.resblocks.2.attn.in_proj_bias"] == (3 * w2,)
        assert shape[g + "transformer.resblocks.0.mlp.c_fc.weight"] == (4 * w2, w2)
        assert shape[g + "positional_embedding"] == (77, w2)
        assert shape[g + "text_projection"] == (w2, pipe.text_encoder_2.config.projection_dim)
        assert not any(k.startswith("alphas") for k in shape)  # SGM files carry no DDPM buffers
    if arch == "sd2":
        w = pipe.text_encoder.config.hidden_size
        assert shape["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"] == (3 * w, w)
        assert shape["cond_stage_model.model.ln_final.weight"] == (w,)


def test_openclip_fused_projection_rows(saved_by_arch):
    _, pipe, _, path = saved_by_arch("sdxl")
    layer = pipe.text_encoder_2.text_model.encoder.layers[1].self_attn
    with safe_open(str(path), "pt") as handle:
        fused = handle.get_tensor("conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight")
        projection = handle.get_tensor("conditioner.embedders.1.model.text_projection")
    assert torch.equal(fused, torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]))
    assert torch.equal(projection, pipe.text_encoder_2.text_projection.weight.T)


def test_detect_arch(saved):
    arch, _, _, path = saved
    assert detect_single_file_arch(path) == arch
    assert detect_single_file_arch(str(path)) == arch


def test_detect_arch_from_keys():
    assert detect_single_file_arch(["cond_stage_model.transformer.text_model.final_layer_norm.weight"]) == "sd15"
    assert detect_single_file_arch(["cond_stage_model.model.ln_final.weight"]) == "sd2"
    assert detect_single_file_arch(["conditioner.embedders.0.transformer.x", "conditioner.embedders.1.model.x"]) == "sdxl"
    with pytest.raises(ModelLoadError, match="refiner"):
        detect_single_file_arch(["conditioner.embedders.0.model.ln_final.weight"])
    with pytest.raises(ModelLoadError, match="model.arch"):
        detect_single_file_arch(["lora_unet_x.lora_down.weight"])


def test_read_keys_of_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="nope.safetensors"):
        read_state_dict_keys(tmp_path / "nope.safetensors")


# The LDM module layout of the released UNets (as named in the original checkpoints and kohya SDXL LoRAs).
@pytest.mark.parametrize(
    "arch, diffusers_path, ldm_path",
    [
        ("sd15", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
        ("sd15", "down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
        ("sd15", "down_blocks.3.resnets.1.conv2", "input_blocks.11.0.out_layers.3"),
        ("sd15", "mid_block.resnets.1.norm1", "middle_block.2.in_layers.0"),
        ("sd15", "mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
        ("sd15", "up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
        ("sd15", "up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
        ("sd15", "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2", "output_blocks.11.1.transformer_blocks.0.ff.net.2"),
        ("sd15", "up_blocks.1.resnets.0.conv_shortcut", "output_blocks.3.0.skip_connection"),
        ("sd15", "conv_norm_out", "out.0"),
        ("sdxl", "down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2"),
        ("sdxl", "down_blocks.0.resnets.1.time_emb_proj", "input_blocks.2.0.emb_layers.1"),
        ("sdxl", "down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
        ("sdxl", "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0", "input_blocks.8.1.transformer_blocks.9.attn2.to_out.0"),
        ("sdxl", "up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
        ("sdxl", "up_blocks.1.attentions.2.proj_out", "output_blocks.5.1.proj_out"),
        ("sdxl", "up_blocks.2.resnets.2.conv2", "output_blocks.8.0.out_layers.3"),
        ("sdxl", "add_embedding.linear_2", "label_emb.0.2"),
        ("sdxl", "time_embedding.linear_1", "time_embed.0"),
    ],
)
def test_released_unet_layout(arch, diffusers_path, ldm_path):
    config = ldm_layout.REFERENCE_UNET_CONFIGS[arch]
    assert ldm_layout.unet_to_ldm_module(diffusers_path, config) == ldm_path
    assert ldm_layout.ldm_to_unet_module(ldm_path, config) == diffusers_path


@pytest.mark.parametrize(
    "diffusers_path, ldm_path",
    [
        ("decoder.up_blocks.0.resnets.2.conv1", "decoder.up.3.block.2.conv1"),
        ("decoder.up_blocks.3.resnets.0.conv_shortcut", "decoder.up.0.block.0.nin_shortcut"),
        ("decoder.up_blocks.1.upsamplers.0.conv", "decoder.up.2.upsample.conv"),
        ("encoder.down_blocks.2.downsamplers.0.conv", "encoder.down.2.downsample.conv"),
        ("encoder.mid_block.resnets.1.norm2", "encoder.mid.block_2.norm2"),
        ("decoder.mid_block.attentions.0.to_out.0", "decoder.mid.attn_1.proj_out"),
        ("encoder.mid_block.attentions.0.group_norm", "encoder.mid.attn_1.norm"),
        ("encoder.conv_norm_out", "encoder.norm_out"),
    ],
)
def test_vae_layout(diffusers_path, ldm_path):
    config = {"up_block_types": ["UpDecoderBlock2D"] * 4}
    assert ldm_layout.vae_to_ldm_module(diffusers_path, config) == ldm_path


def test_unknown_modules_raise():
    config = ldm_layout.REFERENCE_UNET_CONFIGS["sdxl"]
    with pytest.raises(KeyError):
        ldm_layout.unet_to_ldm_module("down_blocks.0.attentions.0.proj_in", config)  # SDXL level 0 has none
    with pytest.raises(KeyError):
        ldm_layout.unet_to_ldm_module("up_blocks.2.upsamplers.0.conv", config)  # last level has no up-sampler
