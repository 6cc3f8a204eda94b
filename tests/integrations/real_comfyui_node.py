"""Run "Load DoRA (sdtrain, exact)" inside a real ComfyUI on sdtrain's tiny SD1.5/SDXL checkpoints; print JSON.

    python tests/integrations/real_comfyui_node.py COMFYUI_CHECKOUT --out FILE

The tiny checkpoints are written in the single-file layout (sdtrain's `pipeline_to_single_file_state_dict`) and
loaded with ComfyUI's own `comfy.sd.load_checkpoint_guess_config`; only the model registry learns the tiny widths
(an SD15 / SDXL model config with the detected UNet config, and text encoders built by ComfyUI's `SDClipModel`
from the tiny CLIP configs), so key mapping, CLIP state-dict conversion (CLIP-G's fused in_proj), `ModelPatcher`
and LoRA patching are ComfyUI's. Per architecture, export target and strength, the node's MODEL and CLIP are
patched (`patch_model`), every adapted weight is compared with sdtrain's exact DoRA weight, the low-VRAM path
(`LowVramPatch` weight functions) is evaluated the same way, and `unpatch_model` must restore every weight bit for
bit. ComfyUI's stock LoraLoader path (`comfy.sd.load_lora_for_models`) is measured beside it.

Then "Train DoRA (sdtrain)" runs `sdtrain train` on the tiny SD1.5 model with ComfyUI's own progress bar, model
folders and interrupt flag: interrupted at step 2 through `comfy.model_management.interrupt_current_processing`,
then resumed to the end, returning the adapter path and the MODEL/CLIP with the adapter applied.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_loaders import CASES, STRENGTHS, load_node_package, rel  # noqa: E402


def build(arch: str, folder: Path):
    """Tiny checkpoint path, adapter files per case and sdtrain's exact weights per (case, strength, module)."""
    from safetensors.torch import save_file

    from helpers_adapters import encoders
    from real_loaders import adapters_for
    from sdtrain.models.ldm_layout import pipeline_to_single_file_state_dict
    from sdtrain.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(arch, seed=0)
    checkpoint = folder / f"tiny-{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in pipeline_to_single_file_state_dict(pipe, arch).items()}, str(checkpoint))
    text_configs = [te.config.to_dict() for te in encoders(pipe)]
    files, exact = {}, {}
    for axis, target in CASES:
        path, _, _, modules = adapters_for(arch, axis, target, folder)
        files[(axis, target)] = path
        for strength in STRENGTHS:
            exact[(axis, target, strength)] = {n: m.merged_weight(strength).detach() for n, m in modules.items()}
    return checkpoint, text_configs, files, exact


def comfy_setup(checkout: Path):
    sys.argv = [sys.argv[0], "--cpu", "--force-fp32", "--fp32-text-enc"]  # fp32 weights: the comparison sees the math, not storage
    sys.path.insert(0, str(checkout))
    try:
        import torchvision  # noqa: F401
    except ImportError:  # comfy.sd imports torchvision for models unrelated to SD1.5/SDXL
        for name in ("torchvision", "torchvision.transforms", "torchvision.models"):
            sys.modules[name] = types.ModuleType(name)
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    import comfy.options

    comfy.options.enable_args_parsing()
    load_node_package()


def tiny_model_config(arch: str, checkpoint: Path, text_configs: list[dict]):
    """Register an SD15/SDXL model config that matches the tiny UNet and builds tiny text encoders."""
    import comfy.model_detection
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.supported_models_base
    import comfy.utils

    state = comfy.utils.load_torch_file(str(checkpoint))
    unet_config = comfy.model_detection.detect_unet_config(state, "model.diffusion_model.")
    te_l = {**text_configs[0], "model_type": "clip_text_model"}

    if arch == "sd15":
        class TinyClip(comfy.sd1_clip.SD1ClipModel):
            def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
                torch.nn.Module.__init__(self)
                self.clip_name, self.clip = "l", "clip_l"
                self.clip_l = comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, textmodel_json_config=te_l,
                                                         model_options={**model_options, "model_name": "clip_l"})
                self.dtypes = {dtype}

        class Tiny(comfy.supported_models.SD15):
            def clip_target(self, state_dict={}):
                return comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, TinyClip)
    else:
        te_g = {**text_configs[1], "model_type": "clip_text_model"}

        class TinyClip(comfy.sdxl_clip.SDXLClipModel):
            def __init__(self, device="cpu", dtype=None, model_options={}):
                torch.nn.Module.__init__(self)
                self.clip_l = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                                         layer_norm_hidden_state=False, textmodel_json_config=te_l,
                                                         model_options=model_options)
                self.clip_g = comfy.sd1_clip.SDClipModel(
                    layer="hidden", layer_idx=-2, device=device, dtype=dtype, textmodel_json_config=te_g,
                    special_tokens={"start": 49406, "end": 49407, "pad": 0}, layer_norm_hidden_state=False,
                    return_projected_pooled=True, model_options={**model_options, "model_name": "clip_g"})
                self.dtypes = {dtype}

            def load_sd(self, sd):
                width = te_g["hidden_size"]
                if sd["text_model.embeddings.token_embedding.weight"].shape[1] == width:
                    return self.clip_g.load_sd(sd)
                return self.clip_l.load_sd(sd)

        class Tiny(comfy.supported_models.SDXL):
            def clip_target(self, state_dict={}):
                return comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, TinyClip)

    keys = ("model_channels", "context_dim", "transformer_depth", "adm_in_channels", "use_linear_in_transformer")
    Tiny.unet_config = {k: unet_config[k] for k in keys if k in unet_config}
    comfy.supported_models.models.insert(0, Tiny)


def module_keys(model, clip, names) -> dict[str, str]:
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return {name: key_map[name] for name in names if name in key_map}


def patched_weights(model, clip, keys: dict[str, str], lowvram: bool) -> dict[str, torch.Tensor]:
    """The weights ComfyUI computes for each module: patched in place, or through the low-VRAM weight functions."""
    import comfy.model_management
    import comfy.utils

    out = {}
    comfy.model_management.unload_all_models()  # as ComfyUI does before loading a clone (CLIP() loads the base)
    for patcher, root in ((model, model.model), (clip.patcher, clip.cond_stage_model)):
        patcher.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1 if lowvram else 0)
        for name, key in keys.items():
            try:
                weight = comfy.utils.get_attr(root, key)
            except AttributeError:
                continue
            weight = weight.detach().clone()
            if lowvram:
                layer = comfy.utils.get_attr(root, key.rsplit(".", 1)[0])
                for function in getattr(layer, "weight_function", []):
                    weight = function(weight)
            out[name] = weight
        patcher.unpatch_model(device_to=torch.device("cpu"))
    return out


def train_node(results: dict, folder: Path, model, clip) -> None:
    import shutil

    import comfy.model_management as mm
    import comfy.utils
    import folder_paths

    from sdtrain_comfyui.nodes import NODE_CLASS_MAPPINGS

    images = folder / "images"
    images.mkdir()
    for name in ("star_000", "star_001"):
        for suffix in (".png", ".txt"):
            shutil.copy(ROOT / "datasets" / "demo" / "4_star" / f"{name}{suffix}", images)
    folder_paths.add_model_folder_path("loras", str(folder / "loras"), is_default=True)
    seen, stop_at = [], [2]

    def hook(value, total, preview, node_id=None, **kwargs):
        seen.append((value, total))
        if stop_at and value >= stop_at[0]:
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    fast = ("data.resolution=64\ndata.min_bucket_side=64\ndata.max_bucket_side=64\ndata.num_workers=0\n"
            'train.mixed_precision="no"\nsample.every_n_steps=0\nlog.tensorboard=false\nsave.targets=[]\n'
            'optimizer.type="AdamW"\nnetwork.preset="attn"\nnetwork.train_text_encoder=true')
    fields = dict(base="builtin:tiny-sd15", images=str(images), output_name="shapes", rank=4, steps=5, resume=True,
                  extra_settings=fast, sdtrain_command=f"{sys.executable} -m sdtrain")
    node = NODE_CLASS_MAPPINGS["SdtrainTrainDoRA"]()
    try:
        node.train(**fields)
        results["train_interrupted"] = False
    except mm.InterruptProcessingException:
        results["train_interrupted"] = True
    results["train_stopped_at"] = seen[-1] if seen else None
    mm.interrupt_current_processing(False)
    stop_at.clear()
    seen.clear()
    new_model, new_clip, path = node.train(model=model, clip=clip, strength=1.0, **fields)
    results["train_resumed_from"] = seen[0] if seen else None
    results["train_last_progress"] = seen[-1] if seen else None
    results["train_adapter"] = path
    results["train_adapter_exists"] = Path(path).is_file()
    results["train_patches"] = [len(new_model.patches), len(new_clip.patcher.patches)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        built = {arch: build(arch, Path(folder)) for arch in ("sd15", "sdxl")}
        comfy_setup(args.checkout.resolve())
        import comfy.sd
        import comfy.utils

        from sdtrain_comfyui.comfy_patches import output_axis_rule
        from sdtrain_comfyui.nodes import NODE_CLASS_MAPPINGS

        results["output_axis_rule"] = output_axis_rule()
        for arch, (checkpoint, text_configs, files, exact) in built.items():
            tiny_model_config(arch, checkpoint, text_configs)
            model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False,
                                                                      embedding_directory=None)
            originals = {k: v.detach().clone() for k, v in {**model.model.state_dict(),
                                                             **clip.cond_stage_model.state_dict()}.items()}
            results[f"{arch}/dtypes"] = sorted({str(v.dtype) for v in originals.values()})
            for (axis, target), path in files.items():
                lora = comfy.utils.load_torch_file(str(path), safe_load=True)
                for strength in STRENGTHS:
                    reference = exact[(axis, target, strength)]
                    keys = module_keys(model, clip, reference)
                    row = {"modules": len(reference), "mapped": len(keys)}
                    node_model, node_clip = NODE_CLASS_MAPPINGS["SdtrainLoadDoRA"]().load_dora(
                        model, clip, "", strength, strength, adapter_path=str(path))
                    stock_model, stock_clip = comfy.sd.load_lora_for_models(model, clip, lora, strength, strength)
                    for label, (m, c), lowvram in (("node", (node_model, node_clip), False),
                                                   ("node_lowvram", (node_model, node_clip), True),
                                                   ("stock", (stock_model, stock_clip), False)):
                        weights = patched_weights(m, c, keys, lowvram)
                        row[f"{label}_patched"] = len(weights)
                        errors = {n: rel(weights[n], reference[n]) for n in weights}
                        row[label] = max(errors.values())
                        row[f"{label}_worst"] = max(errors, key=errors.get)
                    state = {**model.model.state_dict(), **clip.cond_stage_model.state_dict()}
                    changed = [k for k in originals if not torch.equal(state[k], originals[k])]
                    row["unpatched_bitwise"] = not changed
                    row["changed"] = changed[:3]
                    results[f"{arch}/{axis}/{target}/k={strength:g}"] = row
        train_node(results, Path(folder), *comfy.sd.load_checkpoint_guess_config(
            str(built["sd15"][0]), output_vae=False, embedding_directory=None)[:2])
    args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
