"""Export targets: how the DoRA magnitude is written so that a chosen consumer rebuilds W' exactly.

A file's `dora_scale` follows one of two rules, recorded in its metadata (`sdtrain_dora_scale`):
- "magnitude": dora_scale = m, the trained magnitude. A loader that divides by ‖W0 + ΔW‖ (LyCORIS, A1111's
  input axis, ComfyUI's and Forge's input axis, ComfyUI with the output-axis fix) rebuilds W' = m·V/‖V‖.
- "comfyui-w0-norm": on the output axis dora_scale = m·(‖W0‖ + ε)/‖V‖ per output channel, with
  V = W0 + ΔW and ε = float32 eps. ComfyUI v0.3.64 and Forge divide output-axis files by ‖W0‖ + ε
  (the norm of the base weight, not of V), so they rebuild V·dora_scale/(‖W0‖ + ε) = m·V/‖V‖ exactly.
  Input-axis magnitudes stay m (those loaders already divide them by ‖V‖).

ΔW is the file's own update (its rounded lora_up/lora_down), W0 the base weight the adapter was trained on: a
"comfyui-w0-norm" file is exact on that base; on another checkpoint its factor ‖W0‖/‖V‖ is the trained base's.

`TARGETS` are the values of `save.target` / `sdtrain export --target`: the rule each writes, the DoRA axes it can
be written for, and the consumers it is written to be exact in (`claims`, the default of `save.targets`).
`EXACT_IN` is the contract `verify` measures: which (axis, rule) each consumer rebuilds exactly at strength 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdtrain.errors import ConfigError

MAGNITUDE = "magnitude"
COMFYUI_W0_NORM = "comfyui-w0-norm"
RULES = (MAGNITUDE, COMFYUI_W0_NORM)
FP32_EPS = 2.0 ** -23  # torch.finfo(torch.float32).eps, the ε ComfyUI and Forge add to the norm


@dataclass(frozen=True)
class Target:
    name: str
    rule: str
    axes: tuple[str, ...]  # DoRA axes a file for this target can hold
    claims: tuple[str, ...]  # consumers the file is written to be exact in
    why: str  # what the target is for (messages, docs)


TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        Target("comfyui", COMFYUI_W0_NORM, ("output", "input"), ("comfyui", "forge"),
               "today's ComfyUI and Forge LoraLoader (output-axis magnitudes compensate their ‖W0‖ norm)"),
        Target("forge", COMFYUI_W0_NORM, ("output", "input"), ("forge", "comfyui"),
               "Forge's built-in Lora (the same rule as ComfyUI)"),
        Target("lycoris", MAGNITUDE, ("output",), ("lycoris",),
               "the LyCORIS package and SD.Next (the true magnitude; output axis only)"),
        Target("a1111", MAGNITUDE, ("input",), ("a1111",),
               "AUTOMATIC1111's built-in Lora (input axis only)"),
        Target("portable", MAGNITUDE, ("input",), ("comfyui", "forge", "a1111"),
               "ComfyUI, Forge and A1111 without extensions (input axis, the true magnitude)"),
    )
}
DEFAULT_TARGET = "comfyui"

# consumer -> the modules it rebuilds exactly at strength 1: "input" (any rule: input magnitudes are always m)
# or "output/<rule>"; plain LoRA modules are exact everywhere.
EXACT_IN: dict[str, frozenset[str]] = {
    "comfyui": frozenset({"input", f"output/{COMFYUI_W0_NORM}"}),
    "forge": frozenset({"input", f"output/{COMFYUI_W0_NORM}"}),
    "comfyui-fixed": frozenset({"input", f"output/{MAGNITUDE}"}),
    "a1111": frozenset({"input"}),
    "a1111-1.9": frozenset({"input"}),
    "lycoris": frozenset({f"output/{MAGNITUDE}"}),
    "diffusers": frozenset(),
}


def expected_exact(consumer: str, axis: str | None, rule: str) -> bool:
    """Whether `consumer` rebuilds a file of this DoRA axis ("output", "input", "mixed" or None) and rule exactly."""
    if axis is None:
        return True
    axes = ("input", "output") if axis == "mixed" else (axis,)
    return all((a if a == "input" else f"output/{rule}") in EXACT_IN[consumer] for a in axes)


def exact_consumers(axis: str | None, rule: str) -> list[str]:
    return [consumer for consumer in EXACT_IN if expected_exact(consumer, axis, rule)]


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise ConfigError(f'unknown export target "{name}"; accepted: {", ".join(TARGETS)}') from None


def targets_exact_in(consumer: str, axis: str | None) -> list[str]:
    """The export targets that make a file of this DoRA axis exact in `consumer`."""
    return [t.name for t in TARGETS.values()
            if (axis is None or axis in t.axes) and expected_exact(consumer, axis, t.rule)]


def axis_problem(target: Target, axis: str | None) -> str | None:
    """Why a file of this DoRA axis cannot be written for `target`, with the fix (None when it can)."""
    if axis is None:
        return None
    axes = ("input", "output") if axis == "mixed" else (axis,)
    bad = [a for a in axes if a not in target.axes]
    if not bad:
        return None
    if target.axes == ("input",):
        fix = ('train with network.decompose_axis = "input", or keep the output axis with save.target = "comfyui" '
               'and load it in A1111/Forge through the sdtrain extension (sdtrain install-webui WEBUI_DIR)')
    else:
        fix = ('train with network.decompose_axis = "output" (LyCORIS builds output-axis modules only), or use '
               'save.target = "portable" for ComfyUI, Forge and A1111')
    return f'target "{target.name}" ({target.why}) cannot hold {bad[0]}-axis DoRA; {fix}'


def check_axis(target: Target, axis: str | None, where: str) -> None:
    """ConfigError (naming the fix) when a file of this DoRA axis cannot be written for `target`."""
    problem = axis_problem(target, axis)
    if problem:
        raise ConfigError(f"{where}: {problem}")


def metadata_for(target: Target) -> dict[str, str]:
    """The metadata keys that record the target and the dora_scale rule."""
    from sdtrain.export.metadata import RULE_KEY, TARGET_KEY

    return {TARGET_KEY: target.name, RULE_KEY: target.rule}


# ---------------------------------------------------------------- the magnitude on disk


def _channel_norm(weight, axis: str):
    if axis == "output":
        return weight.reshape(weight.shape[0], -1).norm(dim=1)
    return weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)


def _stored_per_magnitude(rule: str, w0, delta, axis: str):
    """dora_scale / m per channel (float64) under `rule`, or None where dora_scale is m itself.

    For "comfyui-w0-norm" on the output axis: (‖W0‖ + ε)/‖W0 + ΔW‖.
    """
    import torch

    if rule == MAGNITUDE or axis == "input":
        return None
    if rule != COMFYUI_W0_NORM:
        raise ValueError(f"unknown dora_scale rule {rule!r}; expected one of {RULES}")
    w0 = w0.detach().to(torch.float64)
    merged = w0 + delta.detach().to(device=w0.device, dtype=torch.float64)
    return (_channel_norm(w0, "output") + FP32_EPS) / _channel_norm(merged, "output")


def encode_magnitude(rule: str, magnitude, w0, delta, axis: str):
    """The 1-D fp32 dora_scale values that make a loader following `rule` rebuild the trained magnitude m."""
    import torch

    factor = _stored_per_magnitude(rule, w0, delta, axis)
    magnitude = magnitude.detach().flatten()
    if factor is None:
        return magnitude.to(torch.float32).clone()
    return (magnitude.to(torch.float64) * factor.to(magnitude.device)).to(torch.float32)


def decode_magnitude(rule: str, stored, w0, delta, axis: str):
    """The trained magnitude m (1-D fp32) from a file's dora_scale values (W0 and ΔW in the weight's shape)."""
    import torch

    factor = _stored_per_magnitude(rule, w0, delta, axis)
    stored = stored.detach().flatten()
    if factor is None:
        return stored.to(torch.float32).clone()
    return (stored.to(torch.float64) / factor.to(stored.device)).to(torch.float32)
