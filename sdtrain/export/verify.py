"""Check an adapter file against each UI's merge rule and against the base checkpoint's keys.

For every module, each loader's rule (`ui_rules`) rebuilds the merged weight from the file's tensors
and the base weight; the result is compared with sdtrain's own merge (`DoRAModule.merged_weight`).
Relative error of a module = max |W_loader − W_sdtrain| / max |W_sdtrain|; a loader's figure is the
largest over its modules.

Verdicts: "incompatible" when the loader cannot apply the file as trained (an axis it does not
support, DoRA at all for diffusers, a module it cannot rebuild, adapter keys the base checkpoint does not have, or an error
above 50%); "exact" when the error is within the loader's compute precision (1e-5 for fp32 rules,
4e-3 for A1111's fp16); "approximate" otherwise.

The report names the consumers that apply the file exactly and a one-line fix for each other one (sdtrain's
ComfyUI nodes or A1111/Forge extension, or `sdtrain export --target`); its exit code is 0 when every requested
consumer is exact. Requested by default: the consumers the file's export target is written for
(`export/targets.py`), or ComfyUI for files that record no target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sdtrain.export import targets as export_targets
from sdtrain.export import ui_rules


@dataclass(frozen=True)
class Loader:
    target: str
    label: str
    rule: object
    exact_tol: float
    axes: tuple[str, ...] = ("input", "output")  # DoRA axes the loader applies as trained


LOADERS: dict[str, Loader] = {
    loader.target: loader
    for loader in (
        Loader("comfyui", "ComfyUI v0.3.64 LoraLoader", ui_rules.comfyui_current, 1e-5),
        Loader("forge", "Forge built-in Lora", ui_rules.comfyui_current, 1e-5),
        Loader("comfyui-fixed", "ComfyUI with the output-axis fix (PR #15458)", ui_rules.comfyui_fixed, 1e-5),
        Loader("a1111", "A1111 1.10 (fp16)", ui_rules.a1111_110, 4e-3, axes=("input",)),
        Loader("a1111-1.9", "A1111 1.9 (fp16)", ui_rules.a1111_19, 4e-3, axes=("input",)),
        Loader("lycoris", "LyCORIS package / SD.Next", ui_rules.lycoris, 1e-5, axes=("output",)),
        Loader("diffusers", "diffusers load_lora_weights", ui_rules.diffusers_plain, 1e-5, axes=()),
    )
}
DEFAULT_TARGETS = ("comfyui",)  # requested for files that record no export target
INCOMPATIBLE_ABOVE = 0.5
VERDICTS = ("exact", "approximate", "incompatible")
EXTENSIONS = ('sdtrain\'s ComfyUI nodes ("Load DoRA (sdtrain, exact)", `sdtrain install-comfyui COMFYUI_DIR`) and '
              'A1111/Forge extension (`sdtrain install-webui WEBUI_DIR`) apply every sdtrain, kohya, LyCORIS and '
              'OneTrainer DoRA file exactly, either axis, any target')


def requested_targets(adapter_file, targets=None) -> list[str]:
    """The consumers that must be exact: `targets` when given, else those the file's export target claims."""
    if targets is not None:
        return list(targets)
    recorded = export_targets.TARGETS.get(adapter_file.target or "")
    return list(recorded.claims if recorded else DEFAULT_TARGETS)


def parse_targets(text: str | None) -> list[str] | None:
    """Targets from "comfyui,forge" ("all" = every loader; empty = None, the file's own); ValueError names the accepted values."""
    if not text:
        return None
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(LOADERS)
    unknown = [t for t in names if t not in LOADERS]
    if unknown:
        raise ValueError(f"unknown target(s) {unknown}; accepted: {', '.join(LOADERS)} or all")
    return list(dict.fromkeys(names))


@dataclass
class KeyCoverage:
    """Adapter module → single-file checkpoint key mapping."""

    matched: dict[str, str] = field(default_factory=dict)  # kohya name -> checkpoint key
    unmatched: dict[str, str] = field(default_factory=dict)  # kohya name -> reason

    @property
    def total(self) -> int:
        return len(self.matched) + len(self.unmatched)


@dataclass
class LoaderResult:
    target: str
    label: str
    matched: int
    unmatched: int
    max_rel_error: float
    worst_module: str | None
    verdict: str
    remedy: str
    failures: dict[str, str] = field(default_factory=dict)  # module -> why the rule could not rebuild it

    def row(self) -> tuple[str, ...]:
        error = "-" if math.isnan(self.max_rel_error) else f"{self.max_rel_error:.2e}"
        return (self.target, f"{self.matched}", f"{self.unmatched}", error, self.verdict, self.remedy)


@dataclass
class VerifyReport:
    file: str
    base: str
    arch: str | None
    axis: str | None
    strength: float
    coverage: KeyCoverage
    results: list[LoaderResult]
    requested: list[str]
    notes: list[str] = field(default_factory=list)
    target: str | None = None  # the export target recorded in the file
    rule: str = export_targets.MAGNITUDE

    def result(self, target: str) -> LoaderResult:
        return next(r for r in self.results if r.target == target)

    def exact(self) -> list[str]:
        return [r.target for r in self.results if r.verdict == "exact"]

    def not_exact_requested(self) -> list[str]:
        return [r.target for r in self.results if r.target in self.requested and r.verdict != "exact"]

    def incompatible_requested(self) -> list[str]:
        return [r.target for r in self.results if r.target in self.requested and r.verdict == "incompatible"]

    def exit_code(self) -> int:
        """0 when every requested consumer applies the file exactly, else 1."""
        return 1 if self.not_exact_requested() else 0

    def format(self) -> str:
        written = "no target recorded (dora_scale holds the magnitude)"
        if self.target:
            written = f"{self.target} (dora_scale rule: {self.rule})"
        lines = [
            f"adapter  {self.file}",
            f"base     {self.base} ({self.arch or 'unknown arch'})",
            f"modules  {self.coverage.total} ({len(self.coverage.matched)} map to base checkpoint keys), "
            f"DoRA axis: {self.axis or 'none (plain LoRA)'}, strength {self.strength:g}",
            f"target   {written}",
        ]
        lines += [f"note     {note}" for note in self.notes]
        for name, reason in list(self.coverage.unmatched.items())[:5]:
            lines.append(f"  unmatched {name}: {reason}")
        if len(self.coverage.unmatched) > 5:
            lines.append(f"  ... {len(self.coverage.unmatched) - 5} more unmatched")
        rows = [("  loader", "matched", "unmatched", "max rel err", "verdict", "")]
        rows += [(("* " if r.target in self.requested else "  ") + r.row()[0], *r.row()[1:5], LOADERS[r.target].label)
                 for r in self.results]
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines.append("")
        lines += ["  ".join(f"{cell:<{widths[i]}}" for i, cell in enumerate(row[:5])) + "  " + row[5] for row in rows]
        lines.append("(* = requested)")
        lines.append("")
        lines += self.verdict_lines()
        return "\n".join(lines)

    def verdict_lines(self) -> list[str]:
        """Which consumers apply the file exactly, the fix for every other one, and the result."""
        exact = self.exact()
        lines = [f"exact in: {', '.join(exact) if exact else 'none of the UIs built-in loaders'}"]
        others = [r for r in self.results if r.verdict != "exact"]
        if others:
            lines.append("not exact:")
            lines += [f"  {r.target}: {r.verdict} ({r.row()[3]}) - {r.remedy}" for r in others]
        if self.axis:
            lines.append(f"with sdtrain's integrations: exact ({EXTENSIONS})")
        bad = self.not_exact_requested()
        if bad:
            lines.append(f"result: NOT exact in {', '.join(bad)} (requested); see the fixes above")
        else:
            lines.append(f"result: exact in every requested consumer ({', '.join(self.requested)})")
        return lines

    def summary(self) -> str:
        """One line per loader, for training logs."""
        return "; ".join(f"{r.target}: {r.verdict} ({r.row()[3]})" for r in self.results)


def relative_error(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """max |candidate − reference| / max |reference| (inf for a non-finite candidate)."""
    candidate = candidate.to(torch.float32)
    reference = reference.to(torch.float32)
    diff = (candidate - reference).abs().max().item()
    if not math.isfinite(diff):
        return math.inf
    return diff / max(reference.abs().max().item(), 1e-30)


def _base_weight(module) -> torch.Tensor:
    """The unmerged base weight W0 of an adapter module (fp32)."""
    return module.original_weight().detach().to(torch.float32)


def _our_merged(module, strength: float) -> torch.Tensor:
    """sdtrain's merged weight W0 + k·(W' − W0) (fp32)."""
    return module.merged_weight(strength).detach().to(torch.float32)


def _unmerged_layer(module):
    """The base layer of an adapter module, or a stand-in holding W0 when the module is merged."""
    import copy

    layer = module.base
    if not getattr(module, "merged", False):
        return layer
    clone = copy.copy(layer)
    clone._parameters = dict(layer._parameters)
    clone._parameters["weight"] = torch.nn.Parameter(module.original_weight().detach(), requires_grad=False)
    return clone


def _remedy(loader: Loader, verdict: str, axis: str | None, rule: str, coverage_bad: bool, failures: dict,
            strength: float, file: str = "FILE", base: str = "MODEL") -> str:
    """The one-line fix for a loader that does not apply the file exactly ("-" when it does)."""
    target = loader.target
    export = f"`sdtrain export {file} --base {base} --target {{}}`"
    output = axis in ("output", "mixed")
    if coverage_bad:
        return "some modules have no key in the base checkpoint: verify against the base model it was trained for"
    if target == "lycoris" and axis in ("input", "mixed"):
        return ('LyCORIS builds output-axis modules only and refuses input-axis files: train with '
                'network.decompose_axis = "output" and save.target = "lycoris", or use sdtrain\'s integrations')
    if failures:
        name, why = next(iter(failures.items()))
        return f"{len(failures)} module(s) cannot be applied (e.g. {name}: {why})"
    if target == "diffusers" and axis:
        return (f"diffusers drops dora_scale and applies a plain LoRA: bake the exact weights with "
                f"`sdtrain merge {file} --base {base} --out merged.safetensors`")
    if verdict == "exact":
        return "-"
    if target.startswith("a1111") and output:
        return ("A1111 applies input-axis DoRA only: install the extension (`sdtrain install-webui WEBUI_DIR`), or "
                'train with network.decompose_axis = "input" and save.target = "portable"')
    if target in ("comfyui", "forge") and output and rule == export_targets.MAGNITUDE:
        plugin = ('install the nodes (`sdtrain install-comfyui COMFYUI_DIR`, "Load DoRA (sdtrain, exact)")'
                  if target == "comfyui" else "install the extension (`sdtrain install-webui FORGE_DIR`)")
        return f"it divides output-axis DoRA by |W0|: {plugin}, or re-encode: {export.format(target)}"
    if target in ("comfyui-fixed", "lycoris") and output and rule == export_targets.COMFYUI_W0_NORM:
        return (f"the file compensates the |W0| rule of ComfyUI v0.3.64/Forge, which this loader does not have: "
                f"re-encode with {export.format('lycoris')}, or use sdtrain's integrations (they read the rule)")
    if target == "lycoris" and strength != 1.0:
        return (f"LyCORIS applies the strength to the magnitude ratio (exact at 1): bake the strength with "
                f"`sdtrain merge {file} --base {base} --strength {strength:g} --out merged.safetensors`")
    if target.startswith("a1111"):
        return "A1111 computes in fp16; the difference is its rounding"
    return "differences beyond rounding: report this file to sdtrain"


def compare_loaders(adapter_file, modules: dict, *, targets=None, strength: float = 1.0,
                    coverage: KeyCoverage | None = None, base_label: str = "MODEL") -> list[LoaderResult]:
    """Each loader's rebuild of every file module vs sdtrain's merged weight of the matching module.

    `modules` maps kohya name → sdtrain adapter module holding the file's tensors (e.g. from
    `adapters_from_file`); file modules missing from it count as unmatched.
    """
    targets = list(targets or LOADERS)
    axis = adapter_file.axis
    names = [n for n in adapter_file.modules if n in modules]
    missing = {n: "no such layer in the base model" for n in adapter_file.modules if n not in modules}
    unmatched_keys = dict(missing)
    if coverage is not None:
        unmatched_keys.update(coverage.unmatched)
    references = {}
    bases = {}
    for name in names:
        bases[name] = _base_weight(modules[name])
        references[name] = _our_merged(modules[name], strength)
    results = []
    for target in targets:
        loader = LOADERS[target]
        worst, worst_name, failures = 0.0, None, {}
        for name in names:
            tensors = adapter_file.modules[name]
            try:
                rebuilt = loader.rule(bases[name], tensors.down, tensors.up, tensors.alpha, tensors.dora_scale, strength)
                if tuple(rebuilt.shape) != tuple(references[name].shape):
                    raise RuntimeError(f"rebuilt shape {list(rebuilt.shape)} != weight {list(references[name].shape)}")
                error = relative_error(rebuilt, references[name])
            except RuntimeError as err:
                failures[name] = str(err).splitlines()[0][:120]
                continue
            if error > worst or worst_name is None:
                worst, worst_name = error, name
        if not names:
            worst = math.nan
        unsupported = bool(axis) and (axis == "mixed" and len(loader.axes) < 2
                                      or axis != "mixed" and axis not in loader.axes)
        if unmatched_keys or failures or unsupported or not names or worst > INCOMPATIBLE_ABOVE:
            verdict = "incompatible"
        elif worst <= loader.exact_tol:
            verdict = "exact"
        else:
            verdict = "approximate"
        remedy = _remedy(loader, verdict, axis, adapter_file.rule, bool(unmatched_keys), failures, strength,
                         str(adapter_file.path or "FILE"), base_label)
        results.append(LoaderResult(target, loader.label, len(names) - len(failures),
                                    len(unmatched_keys) + len(failures), worst, worst_name, verdict, remedy, failures))
    return results


# ---------------------------------------------------------------- checkpoint key coverage


class _NoVAE:
    """Stands in for the VAE when only UNet / text-encoder keys are wanted."""

    config: dict = {}

    def state_dict(self):
        return {}


def checkpoint_shapes(arch: str, unet, text_encoders) -> dict[str, tuple[int, ...]]:
    """Key → shape of the single-file (LDM/SGM) checkpoint of these models (UNet and text encoders).

    Built from meta-device copies of the models (from their configs), so no weight is touched or copied.
    """
    from diffusers import UNet2DConditionModel

    from sdtrain.models.ldm_layout import components_to_single_file_state_dict

    with torch.device("meta"):
        meta_unet = UNet2DConditionModel.from_config(dict(unet.config))
        meta_encoders = [type(te)(te.config) for te in text_encoders]
    state = components_to_single_file_state_dict(arch, meta_unet, _NoVAE(), meta_encoders)
    return {key: tuple(value.shape) for key, value in state.items()}


def file_checkpoint_shapes(path) -> dict[str, tuple[int, ...]]:
    """Key → shape read from a single-file .safetensors checkpoint's header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def key_coverage(adapter_file, arch: str, shapes: dict[str, tuple[int, ...]], unet_config=None,
                 clip_widths: dict[str, int] | None = None) -> KeyCoverage:
    """Map every file module to its single-file checkpoint key and check the shape it adapts.

    `clip_widths` gives the hidden size of OpenCLIP encoders ({"te2": 1280}) to slice fused q/k/v rows.
    A Linear update on a 1×1 convolution key (same element count) counts as matched, as the UIs reshape it.
    """
    from sdtrain.adapters.names import checkpoint_key
    from sdtrain.export.adapter_file import canonical_name

    coverage = KeyCoverage()
    for name, tensors in adapter_file.modules.items():
        canonical = canonical_name(arch, name)
        try:
            width = (clip_widths or {}).get(tensors.group or "")
            key, rows = checkpoint_key(arch, canonical, unet_config, clip_width=width)
        except (KeyError, ValueError) as err:
            coverage.unmatched[name] = str(err).strip("'\"")
            continue
        if key not in shapes:
            coverage.unmatched[name] = f"checkpoint has no key {key}"
            continue
        shape = shapes[key]
        if rows is not None:
            shape = (rows.stop - rows.start, *shape[1:])
        expected = tensors.weight_shape
        same = tuple(shape) == tuple(expected)
        reshaped = math.prod(shape) == math.prod(expected) and shape[0] == expected[0]
        if same or reshaped:
            coverage.matched[name] = key if rows is None else f"{key}[{rows.start}:{rows.stop}]"
        else:
            coverage.unmatched[name] = f"{key} has shape {list(shape)}, the adapter expects {list(expected)}"
    return coverage


# ---------------------------------------------------------------- verification entry points


def file_modules_on_layers(adapter_file, layers: dict) -> dict:
    """Standalone sdtrain adapter modules holding the file's tensors, wrapped around the given base layers.

    `layers` maps kohya name → base nn.Linear / nn.Conv2d; the models are not modified.
    """
    from sdtrain.adapters.dora import DoRAConv2d, DoRALinear
    from sdtrain.export.adapter_file import restore_module

    modules = {}
    for name, tensors in adapter_file.modules.items():
        layer = layers.get(name)
        if layer is None:
            continue
        wrapper = DoRAConv2d if isinstance(layer, torch.nn.Conv2d) else DoRALinear
        module = wrapper(layer, tensors.rank, tensors.alpha, decompose=tensors.dora_scale is not None,
                         axis=tensors.axis or "output")
        restore_module(module, tensors, name)
        modules[name] = module
    return modules


def layers_by_name(adapter_file, arch: str, unet, text_encoders) -> dict:
    from sdtrain.adapters.names import module_index
    from sdtrain.export.adapter_file import canonical_name

    index = module_index(arch, unet, list(text_encoders))
    roots = {"unet": unet, **{f"te{i + 1}": te for i, te in enumerate(text_encoders)}}
    layers = {}
    for name in adapter_file.modules:
        found = index.get(canonical_name(arch, name))
        if found is not None:
            component, path = found
            layers[name] = roots[component].get_submodule(path)
    return layers


def _clip_widths(text_encoders) -> dict[str, int]:
    return {f"te{i + 1}": int(te.config.hidden_size) for i, te in enumerate(text_encoders)}


@torch.no_grad()
def verify_adapter(adapter_file, base, *, targets=None, strength: float = 1.0, base_label: str | None = None,
                   checkpoint_path=None) -> VerifyReport:
    """Verify a file (AdapterFile or path) against a loaded base model (`load_base` result).

    The base models are left untouched. `checkpoint_path` (a single-file .safetensors) makes the key
    check read that file's header; otherwise the single-file layout is computed from the models.
    """
    from sdtrain.export.adapter_file import load_adapter

    if not hasattr(adapter_file, "modules"):
        adapter_file = load_adapter(adapter_file)
    requested = requested_targets(adapter_file, targets)
    arch = base.arch
    text_encoders = list(base.text_encoders)
    if checkpoint_path is not None:
        shapes = file_checkpoint_shapes(checkpoint_path)
    else:
        shapes = checkpoint_shapes(arch, base.unet, text_encoders)
    coverage = key_coverage(adapter_file, arch, shapes, base.unet.config, _clip_widths(text_encoders))
    layers = layers_by_name(adapter_file, arch, base.unet, text_encoders)
    modules = file_modules_on_layers(adapter_file, layers)
    label = base_label or str(getattr(base, "source", None) or getattr(base, "path", None) or arch)
    results = compare_loaders(adapter_file, modules, targets=list(LOADERS), strength=strength, coverage=coverage,
                              base_label=label)
    notes = []
    if adapter_file.arch and adapter_file.arch != arch:
        notes.append(f"the adapter was trained on {adapter_file.arch}, the base is {arch}")
    return VerifyReport(str(adapter_file.path or "adapter"), label, arch, adapter_file.axis, strength,
                        coverage, results, requested, notes, adapter_file.target, adapter_file.rule)


@torch.no_grad()
def verify_saved_adapter(path, adapters, *, targets=None, strength: float = 1.0,
                         base_label: str = "MODEL") -> VerifyReport:
    """The training run's check of its final save: the file vs the trained AdapterSet's base layers.

    The file is rebuilt on the same base layers the adapters wrap (unmerged for the check), so the
    comparison is the file's own merge per loader against sdtrain's merge of the file.
    """
    from sdtrain.export.adapter_file import load_adapter

    adapter_file = load_adapter(path)
    roots = getattr(adapters, "roots", {}) or {}
    unet = roots.get("unet")
    text_encoders = [roots[c] for c in ("te1", "te2") if c in roots]
    layers = {name: _unmerged_layer(adapters.modules[name]) for name in adapter_file.modules if name in adapters.modules}
    coverage = None
    if unet is not None:
        shapes = checkpoint_shapes(adapters.arch, unet, text_encoders)
        coverage = key_coverage(adapter_file, adapters.arch, shapes, unet.config, _clip_widths(text_encoders))
    modules = file_modules_on_layers(adapter_file, layers)
    results = compare_loaders(adapter_file, modules, targets=list(LOADERS), strength=strength, coverage=coverage,
                              base_label=base_label)
    return VerifyReport(str(path), f"{base_label} (the trained base)", adapters.arch, adapter_file.axis, strength,
                        coverage or KeyCoverage(matched={n: "" for n in modules}), results,
                        requested_targets(adapter_file, targets), target=adapter_file.target, rule=adapter_file.rule)
