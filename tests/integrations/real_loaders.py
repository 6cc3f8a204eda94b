"""Run a UI's own LoRA/DoRA merge code on sdtrain's tiny SD1.5/SDXL adapters; print JSON figures.

    python tests/integrations/real_loaders.py {comfyui,forge,a1111,lycoris} CHECKOUT [--integration] [--out FILE]

CHECKOUT is a checkout of the UI (Comfy-Org/ComfyUI, lllyasviel/stable-diffusion-webui-forge,
AUTOMATIC1111/stable-diffusion-webui, KohakuBlueleaf/LyCORIS); its code is imported from there, nothing of it is
copied here. For every case (architecture × DoRA axis × export target × strength) and module, the UI's merged
weight is compared with sdtrain's replay of that UI's rule (`sdtrain.export.ui_rules`, the contract `verify` uses)
and with the exact DoRA weight (sdtrain's merge of the file). With --integration, the same runs with sdtrain's
integration active (the ComfyUI node's patches; the A1111/Forge extension's wrappers) and only the exact
comparison counts. Output (to --out, else stdout, which some UIs also print to): one JSON object {case: {"rule": max rel err, "exact": max rel err, "modules": n,
"refused": n, "error": first refusal}}.

The A1111 Lora extension imports the WebUI's `modules` package; a few stand-ins (devices on the CPU in fp16, as
A1111 computes, and empty modules for metadata caching) are registered so that `network.py` and `network_lora.py`
import alone. Run by tests/integrations/test_real_loaders.py when SDTRAIN_<UI>_DIR is set.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CASES = [("output", "comfyui"), ("output", "lycoris"), ("input", "portable")]
STRENGTHS = (1.0, 0.5)
RULE_OF = {"comfyui": "comfyui", "forge": "forge", "a1111": "a1111", "lycoris": "lycoris"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max()).item()


def adapters_for(arch: str, axis: str, target: str, folder: Path):
    """(file path, AdapterFile, {name: W0 fp32}, {name: sdtrain module holding the file}) for one tiny case."""
    from helpers_adapters import CONVS, encoders, randomize
    from sdtrain.adapters.inject import NetworkSpec, inject_adapters
    from sdtrain.export.adapter_file import load_adapter, save_adapter
    from sdtrain.export.metadata import build_metadata
    from sdtrain.export.verify import file_modules_on_layers
    from sdtrain.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(arch, seed=0)
    spec = NetworkSpec(rank=4, alpha=3.0, decompose_axis=axis, preset="attn-mlp", include=[CONVS],
                       train_text_encoder=True)
    adapters = inject_adapters(pipe.unet, encoders(pipe), arch, spec)
    torch.manual_seed(7)
    randomize(adapters.modules.values(), up_std=0.03, magnitude_spread=0.05)
    path = save_adapter(adapters, folder / f"{arch}-{axis}-{target}.safetensors", dtype="fp16", target=target,
                        metadata=build_metadata(arch, spec, output_name=f"{arch}-{axis}-{target}"))
    adapter_file = load_adapter(path)
    layers = {name: module.base for name, module in adapters.modules.items()}
    modules = file_modules_on_layers(adapter_file, layers)
    bases = {name: module.original_weight().detach().float().clone() for name, module in modules.items()}
    return path, adapter_file, bases, modules


def module_state(adapter_file, name: str) -> dict[str, torch.Tensor]:
    """The file's tensors of one module, keyed as in the file."""
    tensors = adapter_file.modules[name]
    state = {f"{name}.lora_down.weight": tensors.down, f"{name}.lora_up.weight": tensors.up,
             f"{name}.alpha": torch.tensor(float(tensors.alpha))}
    if tensors.dora_scale is not None:
        state[f"{name}.dora_scale"] = tensors.dora_scale
    return state


def load_node_package(name: str = "sdtrain_comfyui"):
    """integrations/comfyui as ComfyUI loads a custom node folder: a package from its __init__.py."""
    import importlib.util

    folder = ROOT / "integrations" / "comfyui"
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return package


# ---------------------------------------------------------------- the UIs' own code


def _stand_in(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def comfyui_loader(checkout: Path, integration: bool):
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, str(checkout))
    try:
        import torchvision  # noqa: F401
    except ImportError:  # comfy.lora imports model code that imports torchvision for unrelated models
        vision = _stand_in("torchvision")
        vision.transforms = _stand_in("torchvision.transforms")
        vision.models = _stand_in("torchvision.models")
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.lora

    if integration:
        load_node_package()
        from sdtrain_comfyui import comfy_patches

    def merge(adapter_file, name, w0, strength):
        state = module_state(adapter_file, name)
        if integration:
            patches, _ = comfy_patches.exact_patches(state, adapter_file.metadata, {name: "w"}, [])
        else:
            patches = comfy.lora.load_lora(state, {name: "w"}, log_missing=False)
        return comfy.lora.calculate_weight([(strength, patches["w"], 1.0, None, None)], w0.clone(), "w")

    return merge


def forge_loader(checkout: Path, integration: bool):
    sys.argv = [sys.argv[0], "--always-cpu"]
    sys.path.insert(0, str(checkout))
    import backend.patcher.lora as forge_lora

    if integration:
        sys.path.insert(0, str(ROOT / "integrations" / "webui"))
        import sdtrain_dora_webui as extension

        forge_lora.weight_decompose = extension.forge_weight_decompose(forge_lora.weight_decompose)
        tag = extension.forge_tagging_loader(lambda *args, **kwargs: None)

    def merge(adapter_file, name, w0, strength):
        state = module_state(adapter_file, name)
        if integration:
            tag(None, None, state, strength, strength, filename=str(adapter_file.path))
        patches, _ = forge_lora.load_lora(state, {name: "w"})
        return forge_lora.merge_lora_to_weight([[strength, patches["w"], 1.0, None, None]], w0.clone(), "w",
                                               computation_dtype=torch.float32)

    return merge


def _a1111_stand_ins() -> None:
    """The WebUI modules A1111's Lora extension imports, as stand-ins (devices: CPU, fp16 compute)."""
    module = _stand_in

    class QkvLinear(torch.nn.Linear):
        pass

    modules = module("modules")
    for name in ("sd_models", "cache", "errors", "hashes", "shared"):
        setattr(modules, name, module(f"modules.{name}"))
    modules.devices = module("modules.devices", cpu=torch.device("cpu"), device=torch.device("cpu"),
                             dtype=torch.float16)
    modules.models = module("modules.models")
    modules.models.sd3 = module("modules.models.sd3")
    modules.models.sd3.mmdit = module("modules.models.sd3.mmdit", QkvLinear=QkvLinear)


def a1111_loader(checkout: Path, integration: bool):
    _a1111_stand_ins()
    sys.path.insert(0, str(checkout / "extensions-builtin" / "Lora"))
    import network
    import network_lora

    if integration:
        sys.path.insert(0, str(ROOT / "integrations" / "webui"))
        import sdtrain_dora_webui as extension

        network.NetworkModule.apply_weight_decompose = extension.a1111_apply_weight_decompose(
            network.NetworkModule.apply_weight_decompose)

    def merge(adapter_file, name, w0, strength):
        net = network.Network(name, types.SimpleNamespace(metadata=dict(adapter_file.metadata)))
        net.te_multiplier = net.unet_multiplier = strength
        if w0.dim() == 4:
            layer = torch.nn.Conv2d(w0.shape[1], w0.shape[0], w0.shape[2:], padding=w0.shape[2] // 2, bias=False)
        else:
            layer = torch.nn.Linear(w0.shape[1], w0.shape[0], bias=False)
        layer = layer.half()
        with torch.no_grad():
            layer.weight.copy_(w0)
        state = {key.split(".", 1)[1]: value for key, value in module_state(adapter_file, name).items()}
        sd_key = ("transformer_" if name.startswith("lora_te") else "diffusion_model_") + name
        weights = network.NetworkWeights(network_key=name, sd_key=sd_key, w=state, sd_module=layer)
        lora_module = network_lora.ModuleTypeLora().create_module(net, weights)
        with torch.no_grad():
            updown, _ = lora_module.calc_updown(layer.weight)
            return (layer.weight.to(updown.dtype) + updown).float()

    return merge


def lycoris_loader(checkout: Path, integration: bool):
    sys.path.insert(0, str(checkout))
    from lycoris.modules import get_module, make_module

    def merge(adapter_file, name, w0, strength):
        state = {key: value.float() for key, value in module_state(adapter_file, name).items()}
        if w0.dim() == 4:
            layer = torch.nn.Conv2d(w0.shape[1], w0.shape[0], w0.shape[2:], padding=w0.shape[2] // 2)
        else:
            layer = torch.nn.Linear(w0.shape[1], w0.shape[0])
        with torch.no_grad():
            layer.weight.copy_(w0)
        kind, params = get_module(state, name)  # what lycoris.utils.merge does per module
        module = make_module(kind, params, name, layer)
        module.merge_to(strength)
        return layer.weight.detach().float()

    return merge


LOADERS = {"comfyui": comfyui_loader, "forge": forge_loader, "a1111": a1111_loader, "lycoris": lycoris_loader}


def main(argv=None) -> int:
    import tempfile

    from sdtrain.export import ui_rules

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ui", choices=list(LOADERS))
    parser.add_argument("checkout", type=Path)
    parser.add_argument("--integration", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rule = ui_rules.RULES[RULE_OF[args.ui]]
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        cases = {(arch, axis, target): adapters_for(arch, axis, target, Path(folder))
                 for arch in ("sd15", "sdxl") for axis, target in CASES}
        merge = LOADERS[args.ui](args.checkout.resolve(), args.integration)  # after sdtrain's imports
        for (arch, axis, target), (_, adapter_file, bases, modules) in cases.items():
            for strength in STRENGTHS:
                row = {"rule": 0.0, "exact": 0.0, "modules": 0, "refused": 0, "error": None}
                for name, w0 in bases.items():
                    tensors = adapter_file.modules[name]
                    exact = modules[name].merged_weight(strength).detach()
                    try:
                        ours = rule(w0, tensors.down, tensors.up, tensors.alpha, tensors.dora_scale, strength)
                    except RuntimeError as err:
                        ours = err
                    try:
                        theirs = merge(adapter_file, name, w0, strength)
                    except RuntimeError as err:
                        row["refused"] += 1
                        row["error"] = row["error"] or str(err).splitlines()[0][:160]
                        row["rule_refuses_too"] = isinstance(ours, RuntimeError)
                        continue
                    row["modules"] += 1
                    row["exact"] = max(row["exact"], rel(theirs, exact))
                    if not isinstance(ours, RuntimeError):
                        row["rule"] = max(row["rule"], rel(theirs, ours))
                results[f"{arch}/{axis}/{target}/k={strength:g}"] = row
    text = json.dumps(results, indent=1)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
