"""Put DoRA/LoRA adapters into a diffusers UNet and the CLIP text encoders.

`plan_injection` decides which layers get adapters (preset, then `include` adds and `exclude` removes
layers by kohya name) from module structure alone, so it also works on models built on the `meta`
device for a dry run; `inject_adapters` carries a plan out on real models and returns an `AdapterSet`.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from sdtrain.adapters.adapter_set import AdapterSet, format_report
from sdtrain.adapters.names import ADAPTABLE_TYPES
from sdtrain.adapters.presets import PRESETS, layer_kind, text_encoder_paths, unet_preset_paths
from sdtrain.adapters.spec import AXES, TYPES, NetworkSpec
from sdtrain.errors import ConfigError



class PlannedAdapter(NamedTuple):
    """One layer that gets an adapter."""

    component: str  # "unet" | "te1" | "te2"
    module_path: str  # diffusers/transformers module path inside that component
    kind: str  # "linear" | "conv"
    kohya_name: str
    weight_shape: tuple[int, ...]  # the base layer's weight shape


class InjectionPlan(list):
    """A list of `PlannedAdapter`, in model order, plus `warnings` (patterns that matched nothing)."""

    def __init__(self, entries=(), warnings=()):
        super().__init__(entries)
        self.warnings: list[str] = list(warnings)


# ---------------------------------------------------------------- building models from configs (meta device)


def _meta_unet(config: Mapping) -> nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(dict(config))


def _meta_text_encoder(config, arch: str, index: int) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if isinstance(config, Mapping):
        config = CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    names = getattr(config, "architectures", None) or []
    with_projection = "CLIPTextModelWithProjection" in names or (not names and arch == "sdxl" and index == 1)
    with torch.device("meta"):
        return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _as_module(model, build) -> nn.Module:
    return model if isinstance(model, nn.Module) else build(model)


# ---------------------------------------------------------------- include / exclude patterns


def _compile(patterns: Sequence[str], key: str):
    """(pattern text, match function) per pattern: glob over the whole name, or `re:` + regex (re.search)."""
    compiled = []
    for text in patterns:
        if text.startswith("re:"):
            try:
                regex = re.compile(text[3:])
            except re.error as err:
                raise ConfigError(
                    f'{key}: "{text}" is not a valid regular expression ({err}); fix the pattern after "re:" '
                    f'or write a glob such as "lora_unet_*attn2*"'
                ) from None
            compiled.append((text, lambda name, regex=regex: regex.search(name) is not None))
        else:
            compiled.append((text, lambda name, text=text: fnmatch.fnmatchcase(name, text)))
    return compiled


def _unmatched_warning(key: str, pattern: str, example: str) -> str:
    return (
        f'{key} pattern "{pattern}" matches no layer; names look like "{example}" '
        f"(glob, or re: + regular expression)"
    )


# ---------------------------------------------------------------- planning


def _component_roots(unet, text_encoders, arch: str, spec: NetworkSpec) -> list[tuple[str, nn.Module]]:
    roots = []
    if spec.train_unet:
        if unet is None:
            raise ValueError("network.train_unet is true but no UNet was given")
        roots.append(("unet", _as_module(unet, _meta_unet)))
    if spec.train_text_encoder:
        expected = 2 if arch == "sdxl" else 1
        text_encoders = list(text_encoders or [])
        if len(text_encoders) != expected:
            raise ValueError(f"{arch} has {expected} text encoder(s), got {len(text_encoders)}")
        for index, encoder in enumerate(text_encoders):
            module = _as_module(encoder, lambda cfg, i=index: _meta_text_encoder(cfg, arch, i))
            roots.append((f"te{index + 1}", module))
    return roots


def _check_spec(spec: NetworkSpec) -> None:
    if spec.preset not in PRESETS:
        allowed = ", ".join(f'"{p}"' for p in PRESETS)
        raise ConfigError(f'network.preset = "{spec.preset}" is not a preset; use one of {allowed}')
    if spec.type not in TYPES:
        raise ConfigError(f'network.type = "{spec.type}" is unknown; use one of ' + ", ".join(f'"{t}"' for t in TYPES))
    if spec.decompose_axis not in AXES:
        raise ConfigError(f'network.decompose_axis = "{spec.decompose_axis}" is unknown; use one of '
                          + ", ".join(f'"{a}"' for a in AXES))


def plan_injection(unet, text_encoders, arch: str, spec: NetworkSpec) -> InjectionPlan:
    """The layers that get adapters, in model order (UNet, then te1, te2).

    `unet` is a UNet2DConditionModel (real or on the meta device) or its config; each text encoder a CLIP
    text model or its CLIPTextConfig (or dict). Configs are instantiated on the meta device, so this never
    loads or allocates weights. Selection: the preset's layers, plus any Linear/Conv2d layer (of a trained
    component) whose kohya name matches an `include` pattern, minus those matching an `exclude` pattern
    (exclude wins). Patterns that match nothing are listed in `.warnings`; an unknown preset or an empty
    selection raises ConfigError.
    """
    from sdtrain.adapters.names import kohya_name

    _check_spec(spec)
    includes = _compile(spec.include, "network.include")
    excludes = _compile(spec.exclude, "network.exclude")
    roots = _component_roots(unet, text_encoders, arch, spec)

    candidates: list[PlannedAdapter] = []  # preset layers, plus every nameable layer when include is used
    in_preset: set[str] = set()
    for component, root in roots:
        unet_config = root.config if component == "unet" else None
        chosen = unet_preset_paths(root, spec.preset) if component == "unet" else text_encoder_paths(root)
        in_preset.update((component, path) for path in chosen)
        paths = set(chosen)
        if includes:
            paths.update(path for path, layer in root.named_modules() if isinstance(layer, ADAPTABLE_TYPES))
        for path, layer in root.named_modules():
            if path not in paths or not layer_kind(layer):
                continue
            try:
                name = kohya_name(arch, component, path, unet_config=unet_config)
            except (KeyError, ValueError):
                if (component, path) in in_preset:
                    raise
                continue  # a layer with no kohya name cannot be included
            candidates.append(PlannedAdapter(component, path, layer_kind(layer), name, tuple(layer.weight.shape)))

    warnings: list[str] = []
    example = candidates[0].kohya_name if candidates else "lora_unet_..."
    included = set()
    for text, matches in includes:
        hits = {c.kohya_name for c in candidates if matches(c.kohya_name)}
        if not hits:
            warnings.append(_unmatched_warning("network.include", text, example))
        included |= hits
    selected = [c for c in candidates if (c.component, c.module_path) in in_preset or c.kohya_name in included]
    excluded = set()
    for text, matches in excludes:
        hits = {c.kohya_name for c in selected if matches(c.kohya_name)}
        if not hits:
            warnings.append(_unmatched_warning("network.exclude", text, example))
        excluded |= hits
    selected = [c for c in selected if c.kohya_name not in excluded]

    if not selected:
        raise ConfigError(
            f'network.preset/include/exclude select no layer (preset "{spec.preset}", include {spec.include}, '
            f"exclude {spec.exclude}, train_unet {spec.train_unet}, train_text_encoder {spec.train_text_encoder}); "
            f"loosen network.exclude or pick another network.preset"
        )
    names = [c.kohya_name for c in selected]
    if len(set(names)) != len(names):
        raise RuntimeError("two adapted layers got the same kohya name; sdtrain.adapters.names is wrong")
    return InjectionPlan(selected, warnings)


# ---------------------------------------------------------------- parameter counts from shapes


def adapter_param_count(entry: PlannedAdapter, spec: NetworkSpec) -> int:
    """Trainable parameters of one adapter: down (rank x fan-in), up (out x rank) and the DoRA magnitude."""
    rank, _ = spec.rank_alpha(entry.kind)
    out_features, fan_in = entry.weight_shape[0], 1
    for size in entry.weight_shape[1:]:
        fan_in *= size
    count = rank * fan_in + out_features * rank
    if spec.type == "dora":
        count += out_features if spec.decompose_axis == "output" else entry.weight_shape[1]
    return count


def count_trainable_params(plan: Sequence[PlannedAdapter], spec: NetworkSpec, component: str | None = None) -> int:
    """Trainable parameters of the adapters a plan would create (all components, or one)."""
    return sum(adapter_param_count(e, spec) for e in plan if component is None or e.component == component)


def plan_report(plan: Sequence[PlannedAdapter], spec: NetworkSpec) -> str:
    """The `AdapterSet.report()` table for a plan, computed from shapes (for dry runs)."""
    rows = []
    for component in dict.fromkeys(e.component for e in plan):
        kinds = [e.kind for e in plan if e.component == component]
        rows.append((component, kinds.count("linear"), kinds.count("conv"), count_trainable_params(plan, spec, component)))
    return format_report(rows)


# ---------------------------------------------------------------- injection


def _wrap(layer: nn.Module, entry: PlannedAdapter, spec: NetworkSpec) -> nn.Module:
    from sdtrain.adapters.dora import DoRAConv2d, DoRALinear

    rank, alpha = spec.rank_alpha(entry.kind)
    wrapper = DoRALinear if entry.kind == "linear" else DoRAConv2d
    return wrapper(layer, rank, alpha, decompose=spec.type == "dora", axis=spec.decompose_axis,
                   detach_norm=spec.detach_norm)


def _parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), attr


def inject_adapters(unet, text_encoders, arch: str, spec: NetworkSpec) -> AdapterSet:
    """Replace the planned layers in place with DoRA/LoRA wrappers; freeze every other parameter.

    Text encoders get adapters only when `spec.train_text_encoder`; all given models are frozen.
    """
    from sdtrain.adapters.dora import DoRAModule
    from sdtrain.adapters.norm_batch import batch_channel_norms

    roots = {"unet": unet, **{f"te{i + 1}": te for i, te in enumerate(text_encoders or [])}}
    roots = {component: root for component, root in roots.items() if root is not None}
    for component, root in roots.items():
        if not isinstance(root, nn.Module):
            raise TypeError(f"inject_adapters needs loaded models; got {type(root).__name__} for {component}")
        if any(isinstance(m, DoRAModule) for m in root.modules()):
            raise ValueError(f"the {component} already has adapters; call AdapterSet.remove() first")
    plan = plan_injection(unet, text_encoders, arch, spec)
    requires_grad = {(c, n): p.requires_grad for c, root in roots.items() for n, p in root.named_parameters()}
    for root in roots.values():
        root.requires_grad_(False)

    adapters = AdapterSet(arch=arch, spec=spec, warnings=list(plan.warnings), roots=roots,
                          saved_requires_grad=requires_grad)
    for entry in plan:
        parent, attr = _parent(roots[entry.component], entry.module_path)
        module = _wrap(getattr(parent, attr), entry, spec)
        setattr(parent, attr, module)
        adapters.add(entry.kohya_name, entry.component, entry.module_path, module)
    for param in adapters.parameters():
        param.requires_grad_(True)
    batch_channel_norms(adapters.modules.values())
    return adapters
