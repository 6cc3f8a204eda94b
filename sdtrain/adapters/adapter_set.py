"""The adapters injected into a model, addressed by kohya name: parameters, merging, state, report, removal."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from sdtrain.errors import ModelLoadError


def format_report(rows) -> str:
    """A text table from rows of (group, linear count, conv count, trainable params), with a total row."""
    rows = list(rows)
    total = ("total", sum(r[1] for r in rows), sum(r[2] for r in rows), sum(r[3] for r in rows))
    header = ("group", "modules adapted (linear / conv)", "trainable params")
    body = [(g, f"{lin + conv} ({lin} / {conv})", f"{params:,}") for g, lin, conv, params in [*rows, total]]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}" for r in [header, *body]]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(-1, "-" * len(lines[0]))
    return "\n".join(lines)


def _trainable(module: nn.Module):
    """(name, parameter) of an adapter's own parameters (everything but the wrapped base layer)."""
    return [(n, p) for n, p in module.named_parameters() if not n.startswith("base.")]


@dataclass
class AdapterSet:
    """Injected adapters. `modules`, `groups` and `module_paths` are keyed by kohya name, in model order."""

    arch: str
    spec: object  # NetworkSpec
    modules: dict[str, nn.Module] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    module_paths: dict[str, tuple[str, str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    roots: dict[str, nn.Module] = field(default_factory=dict, repr=False)  # component -> model, for remove()
    saved_requires_grad: dict = field(default_factory=dict, repr=False)  # (component, param name) -> flag

    def add(self, name: str, component: str, module_path: str, module: nn.Module) -> None:
        self.modules[name] = module
        self.groups[name] = component
        self.module_paths[name] = (component, module_path)

    # ------------------------------------------------------------ parameters

    def named_parameters(self, group: str | None = None):
        """(kohya name + "." + parameter name, parameter) of the trainable adapter parameters."""
        for name, module in self.modules.items():
            if group is None or self.groups[name] == group:
                for pname, param in _trainable(module):
                    yield f"{name}.{pname}", param

    def parameters(self, group: str | None = None) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters(group)]

    def param_groups(self, lrs: dict[str, float], module_lrs: dict[str, tuple[str, float]] | None = None) -> list[dict]:
        """Optimizer parameter groups, one per adapted group ("unet", "te1", "te2"), in model order.

        `lrs` maps a group to its learning rate; "text_encoder" stands for te1 and te2 and "default"
        for any group not named. `module_lrs` maps kohya names to (label, learning rate): those modules go
        to a group of their own per label and component, named "<component>:<label>" (e.g.
        "unet:blocks.0"), after their component's group. Groups without parameters are left out.
        """
        module_lrs = module_lrs or {}
        result = []
        for group in dict.fromkeys(self.groups.values()):
            keys = [group, "text_encoder", "default"] if group.startswith("te") else [group, "default"]
            lr = next((lrs[k] for k in keys if k in lrs), None)
            if lr is None:
                raise ValueError(f"no learning rate for adapter group {group!r} in {sorted(lrs)}")
            names = [n for n, g in self.groups.items() if g == group]
            own: dict[str, tuple[float, list]] = {}
            default = []
            for name in names:
                params = [p for _, p in _trainable(self.modules[name])]
                if name in module_lrs:
                    label, block_lr = module_lrs[name]
                    own.setdefault(label, (block_lr, []))[1].extend(params)
                else:
                    default.extend(params)
            if default:
                result.append({"params": default, "lr": lr, "name": group})
            result.extend({"params": params, "lr": block_lr, "name": f"{group}:{label}"}
                          for label, (block_lr, params) in own.items())
        return result

    # ------------------------------------------------------------ strength and merging

    def set_multiplier(self, multiplier: float) -> None:
        """Scale every adapter's update by `multiplier` (1.0 = as trained, 0.0 = base model)."""
        for module in self.modules.values():
            module.multiplier = multiplier

    @torch.no_grad()
    def merge_all(self, strength: float = 1.0) -> None:
        for module in self.modules.values():
            if not module.merged:
                module.merge(strength)

    @torch.no_grad()
    def unmerge_all(self) -> None:
        for module in self.modules.values():
            if module.merged:
                module.unmerge()

    def compile(self, component: str = "unet", **options) -> nn.Module:
        """Compile one adapted model ("unet", "te1", "te2") in place with `torch.compile` (`options` go to it,
        e.g. mode="max-autotune"); returns the model. The DoRA/LoRA layers compile into its graphs (their
        channel norms too: see sdtrain.adapters.dora)."""
        model = self.roots[component]
        model.compile(**options)
        return model

    # ------------------------------------------------------------ state

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter tensors keyed "<kohya name>.<parameter>" (detached views, for training-state saves)."""
        return {name: param.detach() for name, param in self.named_parameters()}

    @torch.no_grad()
    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy tensors saved by `trainable_state_dict` back in; keys and shapes must match exactly."""
        own = dict(self.named_parameters())
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        wrong = sorted(k for k in own.keys() & state.keys() if tuple(own[k].shape) != tuple(state[k].shape))
        if missing or unexpected or wrong:
            raise ModelLoadError(
                f"saved adapter state does not fit this network (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                f"wrong shape {wrong[:3]}); resume with the same network.* settings and base model it was saved with"
            )
        for key, param in own.items():
            param.copy_(state[key])

    # ------------------------------------------------------------ report and removal

    def report(self) -> str:
        """Table: group, modules adapted (linear / conv), trainable parameters."""
        rows = []
        for group in dict.fromkeys(self.groups.values()):
            names = [n for n, g in self.groups.items() if g == group]
            convs = sum(isinstance(self.modules[n].base, nn.Conv2d) for n in names)
            params = sum(p.numel() for p in self.parameters(group))
            rows.append((group, len(names) - convs, convs, params))
        return format_report(rows)

    @torch.no_grad()
    def remove(self) -> None:
        """Put the original layers back (unmerging first) and restore their requires_grad flags."""
        for name, module in self.modules.items():
            component, path = self.module_paths[name]
            if module.merged:
                module.unmerge()
            parent_path, _, attr = path.rpartition(".")
            root = self.roots[component]
            setattr(root.get_submodule(parent_path) if parent_path else root, attr, module.base)
        for component, root in self.roots.items():
            for pname, param in root.named_parameters():
                param.requires_grad_(self.saved_requires_grad.get((component, pname), param.requires_grad))
        self.modules.clear()
        self.groups.clear()
        self.module_paths.clear()
