"""`sdtrain doctor`: check the installation end to end without downloading anything.

Besides the required libraries it checks every optional package that a shipped config (`configs/*.toml`
next to the package, else the config defaults) or a command uses: a package a config needs (an 8-bit
optimizer's bitsandbytes, `log.tensorboard = true`) fails the check when missing; one that only turns a
feature off (`log.tensorboard = "auto"`, `analyze` plots) is a warning that says how to turn it on.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
from pathlib import Path

NAME = "doctor"
HELP = "Check the installation: library versions, devices, tokenizer, a tiny model and the DoRA math."

LIBRARIES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "PIL", "toml")


def add_arguments(parser):
    parser.add_argument("--skip-model", action="store_true", help="skip building the tiny model")


class FeatureOff(Exception):
    """An optional package is missing and only a feature is off: a warning, not a failure."""


class MissingPackage(Exception):
    """A package that a shipped config needs is not installed."""


def _check(label: str, fn) -> str:
    """Run one check and print its line; returns "ok", "warn" or "fail"."""
    try:
        detail = fn()
    except FeatureOff as exc:
        print(f"  warn  {label}: {exc}")
        return "warn"
    except MissingPackage as exc:
        print(f"  FAIL  {label}: {exc}")
        return "fail"
    except Exception as exc:  # doctor reports every failure and carries on
        print(f"  FAIL  {label}: {type(exc).__name__}: {exc}")
        return "fail"
    print(f"  ok    {label}{': ' + detail if detail else ''}")
    return "ok"


def shipped_configs(folder: Path | None = None) -> dict[str, dict]:
    """The raw tables of the example configs (`configs/*.toml` beside the package), by file name."""
    from sdtrain.config.load import read_toml

    folder = folder or Path(__file__).resolve().parents[2] / "configs"
    return {path.name: read_toml(str(path)) for path in sorted(folder.glob("*.toml"))} if folder.is_dir() else {}


def optional_needs(configs: dict[str, dict]) -> dict[str, dict[str, str]]:
    """{package: {config name: "required" | "auto"}} for the optional packages the configs use (the config
    defaults stand in when there are no configs)."""
    from dataclasses import fields

    from sdtrain.config.resolve import OPTIMIZER_PACKAGES
    from sdtrain.config.schema import LogConfig, OptimizerConfig, field_default

    defaults = {f.name: field_default(f) for cls in (LogConfig, OptimizerConfig) for f in fields(cls)
                if f.name in ("tensorboard", "type")}
    needs: dict[str, dict[str, str]] = {"tensorboard": {}, "matplotlib": {}}
    for name, raw in (configs or {"the config defaults": {}}).items():
        optimizer = (raw.get("optimizer") or {}).get("type", defaults["type"])
        package = OPTIMIZER_PACKAGES.get(optimizer)
        if package:
            needs.setdefault(package, {})[name] = "required"
        tensorboard = (raw.get("log") or {}).get("tensorboard", defaults["tensorboard"])
        if tensorboard is True:
            needs["tensorboard"][name] = "required"
        elif tensorboard == "auto":
            needs["tensorboard"][name] = "auto"
    return needs


_USES = {
    "bitsandbytes": ("8-bit optimizers (optimizer.type)", "pip install bitsandbytes"),
    "prodigyopt": ("the Prodigy optimizer (optimizer.type)", "pip install prodigyopt"),
    "tensorboard": ("TensorBoard logging (log.tensorboard)", "pip install tensorboard"),
    "matplotlib": ("the plots of `sdtrain analyze`", 'pip install "sdtrain[plots]"'),
}


def _optional(package: str, users: dict[str, str]):
    """A check of one optional package against what the configs need of it."""
    what, install = _USES.get(package, (package, f"pip install {package}"))

    def check() -> str:
        installed = importlib.util.find_spec(package) is not None
        version = ""
        if installed:
            try:
                version = getattr(importlib.import_module(package), "__version__", "?")
            except Exception as exc:  # installed but broken is a failure whoever uses it
                raise RuntimeError(f"{package} is installed but does not import ({type(exc).__name__}: {exc}); "
                                   f"reinstall it ({install})") from None
        required = [name for name, how in users.items() if how == "required"]
        auto = [name for name, how in users.items() if how == "auto"]
        if installed:
            used = f"; used by {', '.join(users)}" if users else ""
            return f"{version}; {what}{used}"
        if required:
            verb = "needs" if len(required) == 1 else "need"
            raise MissingPackage(f"{package} is not installed and {', '.join(required)} {verb} it for {what}; "
                                 f"{install}")
        if auto:
            raise FeatureOff(f"{package} is not installed: {what} is off in {', '.join(auto)}; {install} turns it on")
        raise FeatureOff(f"{package} is not installed: no {what}; {install}")

    return check


def _versions() -> str:
    found = []
    for name in LIBRARIES:
        module = importlib.import_module(name)
        found.append(f"{name} {getattr(module, '__version__', '?')}")
    return ", ".join(found)


def _devices() -> str:
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"CUDA: {', '.join(names)}; bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"
    return f"CPU only ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _tokenizer() -> str:
    from sdtrain.models.clip_tokenizer import build_clip_tokenizer

    ids = build_clip_tokenizer()("a photo of a cat").input_ids
    expected = [49406, 320, 1125, 539, 320, 2368, 49407]
    if ids != expected:
        raise RuntimeError(f"'a photo of a cat' encodes to {ids}, expected {expected}")
    return "CLIP BPE, 49408 tokens"


def _bitsandbytes() -> str:
    import bitsandbytes as bnb
    import torch

    param = torch.nn.Parameter(torch.randn(64, 64))
    optimizer = bnb.optim.AdamW8bit([param], lr=1e-3, min_8bit_size=0)
    param.sum().backward()
    optimizer.step()
    if optimizer.state[param]["state1"].dtype != torch.uint8:
        raise RuntimeError("AdamW8bit did not keep 8-bit state")
    return "AdamW8bit step with 8-bit state"


def _dora() -> str:
    import torch

    from sdtrain.adapters.dora import DoRALinear

    torch.manual_seed(0)
    base = torch.nn.Linear(24, 16)
    layer = DoRALinear(base, rank=4, alpha=4)
    torch.nn.init.normal_(layer.lora_up.weight, std=0.1)
    with torch.no_grad():
        layer.magnitude.mul_(1.1)
    x = torch.randn(3, 24)
    w0 = base.weight.detach()
    v = w0 + layer.scale * layer.lora_up.weight @ layer.lora_down.weight
    dense = layer.magnitude[:, None] * v / v.norm(dim=1, keepdim=True)
    err = (layer(x) - (x @ dense.T + base.bias)).abs().max().item()
    if err > 1e-5:
        raise RuntimeError(f"DoRA output differs from the dense formula by {err:.2e}")
    return f"DoRA output equals the dense formula (max error {err:.1e})"


def _tiny_model() -> str:
    import torch

    from sdtrain.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("sdxl")
    with torch.no_grad():
        image = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    return f"tiny SDXL pipeline sampled a {image.shape[1]}x{image.shape[0]} image"


def run(args) -> int:
    print("sdtrain doctor")
    checks = [("libraries", _versions), ("devices", _devices), ("tokenizer", _tokenizer)]
    configs = shipped_configs()
    for package, users in optional_needs(configs).items():
        checks.append((package, _optional(package, users)))
    checks.append(("8-bit optimizer", _bitsandbytes))
    checks.append(("DoRA math", _dora))
    if not args.skip_model:
        checks.append(("tiny model", _tiny_model))
    results = [_check(label, fn) for label, fn in checks]
    warnings = results.count("warn")
    if "fail" in results:
        print("some checks failed")
        return 1
    print("all checks passed" + (f" ({warnings} warning{'s' if warnings > 1 else ''})" if warnings else ""))
    return 0
