"""`sdtrain doctor`: check the installation end to end without downloading anything."""

from __future__ import annotations

import importlib
import platform

NAME = "doctor"
HELP = "Check the installation: library versions, devices, tokenizer, a tiny model and the DoRA math."

LIBRARIES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "bitsandbytes", "PIL", "toml")


def add_arguments(parser):
    parser.add_argument("--skip-model", action="store_true", help="skip building the tiny model")


def _check(label: str, fn) -> bool:
    try:
        detail = fn()
    except Exception as exc:  # doctor reports every failure and carries on
        print(f"  FAIL  {label}: {type(exc).__name__}: {exc}")
        return False
    print(f"  ok    {label}{': ' + detail if detail else ''}")
    return True


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
    checks = [("libraries", _versions), ("devices", _devices), ("tokenizer", _tokenizer),
              ("bitsandbytes", _bitsandbytes), ("DoRA math", _dora)]
    if not args.skip_model:
        checks.append(("tiny model", _tiny_model))
    ok = all([_check(label, fn) for label, fn in checks])
    print("all checks passed" if ok else "some checks failed")
    return 0 if ok else 1
