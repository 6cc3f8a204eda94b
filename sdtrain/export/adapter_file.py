"""The adapter file: kohya/LyCORIS layout in safetensors, written atomically, read back exactly.

Per adapted module `<name>` (kohya name, e.g. `lora_unet_..._to_q`, `lora_te1_...`):
- `<name>.lora_down.weight`: [r, in] (Linear) or [r, in, kh, kw] (Conv), in the save dtype;
- `<name>.lora_up.weight`: [out, r] or [out, r, 1, 1], in the save dtype, with the training
  alpha/rank folded in (so `alpha` = rank and every loader, A1111 1.9 included, gets scale 1);
- `<name>.alpha`: 0-d fp32, equal to the rank;
- `<name>.dora_scale` (DoRA only): fp32, always at least 2-D: output axis [out, 1] / [out, 1, 1, 1], input axis
  [1, in] / [1, in, 1, 1]. It holds the magnitude m, or for `save.target = "comfyui"` / `"forge"` the output-axis
  m·(‖W0‖ + ε)/‖W0 + ΔW‖ that those loaders need (`export/targets.py`; the rule is in the metadata and reading
  decodes it with the base weight).

Reading also accepts files written by kohya, LyCORIS and OneTrainer: a missing `alpha` (alpha = rank),
1-D `dora_scale`, fp16/bf16 tensors, `lora_te_` / `lora_te1_` / `lora_te2_` names, either axis. It refuses
malformed files and files holding NaN/inf, and saving refuses NaN/inf weights (`export/file_checks.py`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from sdtrain.files import atomic_write_bytes
from sdtrain.errors import ModelLoadError
from sdtrain.export import file_checks as checks
from sdtrain.export import metadata as md
from sdtrain.export import targets
from sdtrain.export.file_checks import MalformedAdapter, NonFiniteAdapter, SaveDtypeOverflow  # noqa: F401 (re-exported)

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "dora_scale": "dora_scale"}
_ROLE_SUFFIX = {role: suffix for suffix, role in _SUFFIXES.items()}
_GROUP_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te1"))


def group_of(name: str) -> str | None:
    """"unet", "te1" or "te2" from a kohya name's prefix (`lora_te_` is the single SD1.5 encoder)."""
    for prefix, group in _GROUP_PREFIXES:
        if name.startswith(prefix):
            return group
    return None


def magnitude_shape(axis: str, weight_shape) -> tuple[int, ...]:
    """The on-disk dora_scale shape: [out, 1(, 1, 1)] for the output axis, [1, in(, 1, 1)] for the input axis."""
    ones = [1] * (len(weight_shape) - 2)
    if axis == "output":
        return (weight_shape[0], 1, *ones)
    return (1, weight_shape[1], *ones)


def detect_axis(dora_scale: torch.Tensor, out_features: int, in_features: int, hint: str | None = None) -> tuple[str, bool]:
    """(axis, guessed) of a dora_scale: "output" for [out, 1, ...], "input" for [1, in, ...].

    A 1-D magnitude is read by its length; when out == in that is ambiguous and `hint` (from the
    file's metadata) or "input" (the DoRA paper's, kohya's and OneTrainer's convention) decides, with
    `guessed` = True. Raises ValueError for a shape that fits neither axis.
    """
    shape = tuple(dora_scale.shape)
    if len(shape) >= 2:
        if any(d != 1 for d in shape[2:]):
            raise ValueError(f"dora_scale shape {list(shape)} has non-1 trailing dims")
        fits_output = shape[0] == out_features and shape[1] == 1
        fits_input = shape[0] == 1 and shape[1] == in_features
    elif len(shape) == 1:
        fits_output = shape[0] == out_features
        fits_input = shape[0] == in_features
    else:
        raise ValueError("dora_scale is a scalar")
    if fits_output and fits_input:
        if len(shape) >= 2 and out_features == 1 and in_features == 1:
            return "input", True
        return (hint or "input"), True
    if fits_output:
        return "output", False
    if fits_input:
        return "input", False
    raise ValueError(f"dora_scale shape {list(shape)} fits neither [out={out_features}, 1] nor [1, in={in_features}]")


@dataclass
class ModuleTensors:
    """One adapted module as stored in a file (tensors as on disk)."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float  # the file's alpha (rank when the file has none)
    dora_scale: torch.Tensor | None = None
    axis: str | None = None  # "output" | "input" for DoRA, None for plain LoRA
    axis_guessed: bool = False
    alpha_in_file: bool = True
    rule: str = targets.MAGNITUDE  # how dora_scale encodes the magnitude (the file's `sdtrain_dora_scale`)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def kind(self) -> str:
        return "conv" if self.down.dim() == 4 else "linear"

    @property
    def group(self) -> str | None:
        return group_of(self.name)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this module adapts: [out, in] or [out, in, kh, kw]."""
        return (int(self.up.shape[0]), int(self.down.shape[1]), *[int(d) for d in self.down.shape[2:]])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def magnitude(self, base_weight: torch.Tensor | None = None) -> torch.Tensor | None:
        """The magnitude as sdtrain holds it: 1-D fp32, [out] or [in].

        A dora_scale written for ComfyUI's ‖W0‖ rule is decoded with `base_weight` (W0), which it then needs.
        """
        if self.dora_scale is None:
            return None
        if self.rule == targets.MAGNITUDE or self.axis == "input":
            return self.dora_scale.detach().to(torch.float32).flatten().clone()
        if base_weight is None:
            raise ValueError(f"{self.name}: its dora_scale follows the {self.rule} rule; decoding needs the base weight")
        return targets.decode_magnitude(self.rule, self.dora_scale, base_weight.to(torch.float32),
                                        self.delta_weight().to(base_weight.device), self.axis)

    def delta_weight(self) -> torch.Tensor:
        """(alpha/rank)·up·down in fp32, shaped like the base weight."""
        product = self.up.to(torch.float32).flatten(1) @ self.down.to(torch.float32).flatten(1)
        return (product * self.scale).reshape(self.weight_shape)


@dataclass
class AdapterFile:
    """An adapter file read into memory."""

    path: Path | None
    modules: dict[str, ModuleTensors]
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "unknown"  # "sdtrain" | "kohya" | "lycoris" | "onetrainer" | "unknown"
    other_keys: list[str] = field(default_factory=list)  # keys outside the layout (ignored)
    dtypes: dict[str, str] = field(default_factory=dict)  # role ("down", "up", ...) -> dtype names seen
    non_finite: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (NaN, inf) counts (inspect only)

    @property
    def arch(self) -> str | None:
        """"sdxl" / "sd2" / "sd15" from the metadata, else from the UNet / text-encoder names, else None."""
        version = self.metadata.get("ss_base_model_version", "")
        if version.startswith("sdxl_"):
            return "sdxl"
        if version.startswith("sd_v2") or self.metadata.get("ss_v2") == "True":
            return "sd2"
        if version.startswith("sd_v1"):
            return "sd15"
        names = self.modules.keys()
        # UNet names first: SD1.5 files use diffusers paths, SDXL files LDM/SGM paths
        if any(n.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_te2_")) for n in names):
            return "sdxl"
        if any(n.startswith(("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_te_")) for n in names):
            return "sd15"
        return None

    @property
    def tensor_count(self) -> int:
        """Layout tensors in the file (lora_down, lora_up, alpha and dora_scale of every module)."""
        return sum(2 + m.alpha_in_file + (m.dora_scale is not None) for m in self.modules.values())

    @property
    def axis(self) -> str | None:
        """The DoRA axis shared by all modules, "mixed", or None (plain LoRA)."""
        axes = {m.axis for m in self.modules.values() if m.axis}
        return None if not axes else axes.pop() if len(axes) == 1 else "mixed"

    @property
    def target(self) -> str | None:
        """The export target recorded by sdtrain (None for other files)."""
        return self.metadata.get(md.TARGET_KEY) or None

    @property
    def rule(self) -> str:
        """How dora_scale encodes the magnitude: "magnitude" (the default) or "comfyui-w0-norm"."""
        return md.dora_scale_rule(self.metadata)

    @property
    def training_alpha(self) -> float | None:
        """The training alpha recorded in the metadata (sdtrain folds alpha/rank into lora_up)."""
        return md.training_alpha(self.metadata)

    def groups(self) -> dict[str, list[str]]:
        """Module names per group, in the order unet, te1, te2 (then anything unrecognised)."""
        result: dict[str, list[str]] = {group: [] for group in ("unet", "te1", "te2")}
        for name, module in self.modules.items():
            result.setdefault(module.group or "?", []).append(name)
        return {group: names for group, names in result.items() if names}


# ---------------------------------------------------------------- writing


def module_tensors(name: str, module, dtype: torch.dtype, rule: str = targets.MAGNITUDE) -> dict[str, torch.Tensor]:
    """The file entries of one sdtrain adapter module (alpha/rank folded into lora_up, alpha = rank).

    `rule` ("magnitude" | "comfyui-w0-norm") is how dora_scale encodes the magnitude; the encoding uses the
    update of the rounded tensors as written, which is what a loader rebuilds.
    """
    down = module.lora_down.weight.detach().to(torch.float32)
    up = module.lora_up.weight.detach().to(torch.float32)
    rank = int(down.shape[0])
    down_saved = down.to(dtype).contiguous()
    up_saved = (up * float(module.scale)).to(dtype).contiguous()
    entries = {
        f"{name}.lora_down.weight": down_saved,
        f"{name}.lora_up.weight": up_saved,
        f"{name}.alpha": torch.tensor(float(rank), dtype=torch.float32),
    }
    if module.magnitude is not None:
        w0 = module.original_weight().detach()
        weight_shape = tuple(w0.shape)
        magnitude = module.magnitude.detach().to(torch.float32)
        if rule != targets.MAGNITUDE:
            delta = (up_saved.to(torch.float32).flatten(1) @ down_saved.to(torch.float32).flatten(1)).reshape(weight_shape)
            magnitude = targets.encode_magnitude(rule, magnitude, w0, delta, module.axis)
        entries[f"{name}.dora_scale"] = magnitude.reshape(magnitude_shape(module.axis, weight_shape)).clone().contiguous()
    return entries


def adapter_tensors(adapters, dtype="fp16", rule: str = targets.MAGNITUDE) -> dict[str, torch.Tensor]:
    """Every file entry of an AdapterSet, in model order."""
    torch_dtype = _save_dtype(dtype)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in adapters.modules.items():
        tensors.update(module_tensors(name, module, torch_dtype, rule))
    return {k: v.cpu() for k, v in tensors.items()}


def _save_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in SAVE_DTYPES.values():
            raise ValueError(f"save dtype {dtype} is not one of {list(SAVE_DTYPES)}")
        return dtype
    if dtype not in SAVE_DTYPES:
        raise ValueError(f'save dtype "{dtype}" is not one of {list(SAVE_DTYPES)}')
    return SAVE_DTYPES[dtype]


def serialize_with_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    """safetensors bytes whose metadata carries `sshs_model_hash` / `sshs_legacy_hash` of these very bytes.

    The tensor section does not depend on the metadata, and the hash placeholders have the final length,
    so the header length (and every offset) is the same before and after the hashes are filled in.
    """
    import safetensors.torch

    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    metadata[md.MODEL_HASH_KEY] = "0" * 64
    metadata[md.LEGACY_HASH_KEY] = "0" * 8
    draft = safetensors.torch.save(tensors, metadata)
    metadata[md.MODEL_HASH_KEY] = md.model_hash(draft)
    metadata[md.LEGACY_HASH_KEY] = md.legacy_hash(draft)
    data = safetensors.torch.save(tensors, metadata)
    if len(data) != len(draft) or md.model_hash(data) != metadata[md.MODEL_HASH_KEY]:
        raise RuntimeError("safetensors layout changed when the hashes were filled in")
    return data


def write_adapter_tensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> Path:
    """Write plain tensors + metadata (with sshs hashes) atomically as a safetensors file.

    Tensors holding NaN/inf are refused and nothing is written (`NonFiniteAdapter`; `SaveDtypeOverflow` when only
    fp16/bf16 tensors hold inf: finite values that overflowed save.dtype).
    """
    checks.check_finite_to_save(tensors, path)
    return atomic_write_bytes(path, serialize_with_hashes(tensors, metadata))


def save_adapter(adapters, path, *, dtype="fp16", metadata: dict[str, str] | None = None,
                 target: str | None = None) -> Path:
    """Save an AdapterSet as a kohya/LyCORIS-layout safetensors file; returns the path.

    `dtype` ("fp16" | "bf16" | "fp32") applies to lora_down/lora_up; alpha and dora_scale are fp32.
    `metadata` (see `metadata.build_metadata`) is written with the sshs hashes added. `target` (a
    `save.target` value) picks how dora_scale encodes the magnitude and is recorded in the metadata;
    None writes the magnitude itself and records nothing.

    Never writes NaN/inf: adapter weights holding them raise `NonFiniteAdapter` naming the modules, weights that
    overflow `dtype` raise `SaveDtypeOverflow` (a `NonFiniteAdapter`); the previous file at `path` is kept.
    """
    checks.check_finite_modules(adapters, path)
    rule = targets.MAGNITUDE
    if target is not None:
        spec = targets.get_target(target)
        for module in adapters.modules.values():
            targets.check_axis(spec, module.axis if module.magnitude is not None else None, "save.target")
        rule = spec.rule
        metadata = {**(metadata or {}), **targets.metadata_for(spec)}
    return write_adapter_tensors(adapter_tensors(adapters, dtype, rule), path, metadata)


# ---------------------------------------------------------------- reading


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES.items():
        if key == suffix or key.endswith("." + suffix):  # a bare suffix splits into no module name ("")
            return key[: -len(suffix) - 1], role
    return None


def _guess_source(metadata: dict[str, str], modules: dict[str, ModuleTensors]) -> str:
    if md.FOLDING_KEY in metadata or md.CONFIG_KEY in metadata:
        return "sdtrain"
    network_module = metadata.get("ss_network_module", "")
    if "lycoris" in network_module:
        return "lycoris"
    if any(k.startswith("ot_") or k.startswith("onetrainer") for k in metadata):
        return "onetrainer"
    if network_module:
        return "kohya"
    if any(m.dora_scale is not None and m.dora_scale.dim() == 1 for m in modules.values()):
        return "onetrainer"
    return "unknown"


def _axis_hint(metadata: dict[str, str]) -> str | None:
    value = str(md.parsed_network_args(metadata).get("wd_on_output", "")).lower()
    return {"true": "output", "false": "input"}.get(value)


def _check_layout(parts: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str], problems) -> None:
    """Add every layout problem of the grouped tensors and the parsed metadata to `problems`."""
    hint = _axis_hint(metadata)
    for name, found in parts.items():
        for role, tensor in found.items():
            checks.check_tensor(problems, f"{name}.{_ROLE_SUFFIX[role]}", role, tensor)
        if not name:
            for role in found:
                problems.add("key with no module name before the suffix", f".{_ROLE_SUFFIX[role]}")
            continue
        if "down" not in found or "up" not in found:
            missing = "lora_down.weight" if "down" not in found else "lora_up.weight"
            problems.add(f"module has no {missing} (the file is incomplete or not a LoRA/DoRA file)",
                         f"{name}.{missing}")
            continue
        down, up = found["down"], found["up"]
        if down.numel() == 0 or up.numel() == 0:
            continue
        if up.dim() < 2 or down.dim() < 2 or up.shape[1] != down.shape[0] or any(d != 1 for d in up.shape[2:]):
            problems.add("lora_up and lora_down ranks differ", f"{name}: lora_up {list(up.shape)}, "
                                                               f"lora_down {list(down.shape)}")
            continue
        dora_scale = found.get("dora_scale")
        if dora_scale is not None and dora_scale.numel():
            try:
                detect_axis(dora_scale, int(up.shape[0]), int(down.shape[1]), hint)
            except ValueError as err:
                problems.add("dora_scale fits neither axis of its lora_up/lora_down", f"{name}.dora_scale: {err}")
    checks.check_metadata(problems, metadata, targets.RULES)


def adapter_file_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                              path=None, *, allow_non_finite: bool = False) -> AdapterFile:
    """Group raw tensors by module, check them, detect axes.

    Raises `MalformedAdapter` (a `ModelLoadError`) listing every layout or metadata problem (ranks that disagree,
    a dora_scale that fits neither axis, an alpha of several numbers, non-float or empty tensors, keys with no
    module, unparsable metadata), and `NonFiniteAdapter` when the layout tensors hold NaN/inf, unless
    `allow_non_finite` (then their counts are in `AdapterFile.non_finite`).
    """
    metadata = dict(metadata or {})
    where = str(path) if path else "adapter"
    parts: dict[str, dict[str, torch.Tensor]] = {}
    other: list[str] = []
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None:
            other.append(key)
        else:
            parts.setdefault(split[0], {})[split[1]] = tensor
    if not parts:
        raise MalformedAdapter(
            f"{where}: no '<name>.lora_down.weight' / '<name>.lora_up.weight' keys; this is not a kohya/LyCORIS "
            f"LoRA or DoRA file (keys look like {sorted(tensors)[:3]})"
        )
    problems = checks.Problems(where)
    _check_layout(parts, metadata, problems)
    problems.raise_if_any()
    layout = {f"{name}.{_ROLE_SUFFIX[role]}": tensor for name, found in parts.items() for role, tensor in found.items()}
    non_finite = checks.non_finite_counts(layout)
    if non_finite and not allow_non_finite:
        raise NonFiniteAdapter(checks.non_finite_file_message(where, non_finite, len(layout)), non_finite, path)

    hint = _axis_hint(metadata)
    rule = md.dora_scale_rule(metadata)
    modules: dict[str, ModuleTensors] = {}
    dtypes: dict[str, set] = {}
    for name, found in parts.items():
        down, up = found["down"], found["up"]
        if "alpha" in found:
            alpha, alpha_in_file = float(found["alpha"].to(torch.float32).item()), True
        else:
            alpha, alpha_in_file = float(down.shape[0]), False
        if alpha == 0.0:
            alpha = float(down.shape[0])  # kohya/LyCORIS: alpha 0 means alpha = rank
        module = ModuleTensors(name, down, up, alpha, alpha_in_file=alpha_in_file, rule=rule)
        if "dora_scale" in found:
            module.dora_scale = found["dora_scale"]
            module.axis, module.axis_guessed = detect_axis(module.dora_scale, module.weight_shape[0],
                                                           module.weight_shape[1], hint)
        modules[name] = module
        for role, tensor in found.items():
            dtypes.setdefault(role, set()).add(str(tensor.dtype).replace("torch.", ""))
    adapter = AdapterFile(Path(path) if path else None, modules, metadata, other_keys=sorted(other),
                          dtypes={role: ", ".join(sorted(v)) for role, v in dtypes.items()}, non_finite=non_finite)
    adapter.source = _guess_source(metadata, modules)
    return adapter


def load_adapter(path, *, allow_non_finite: bool = False) -> AdapterFile:
    """Read and check an adapter file (sdtrain, kohya, LyCORIS or OneTrainer).

    Raises ModelLoadError with the reason for a missing or unreadable file, `MalformedAdapter` for a broken
    layout and `NonFiniteAdapter` for NaN/inf values unless `allow_non_finite` (see `adapter_file_from_tensors`).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: adapter file not found; pass the path of a .safetensors adapter")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises several error types for damaged files
        raise ModelLoadError(f"{path}: not a readable safetensors file ({err}); re-save or re-download it") from None
    return adapter_file_from_tensors(tensors, metadata, path, allow_non_finite=allow_non_finite)


# ---------------------------------------------------------------- restoring into sdtrain modules


@torch.no_grad()
def restore_module(module, tensors: ModuleTensors, name: str = "") -> None:
    """Copy one file module into an sdtrain adapter module so that its s·B·A and magnitude equal the file's.

    lora_down := down; lora_up := up · (file alpha/rank) / module.scale; magnitude := dora_scale (flattened).
    """
    label = name or tensors.name
    down_param, up_param = module.lora_down.weight, module.lora_up.weight
    if tuple(down_param.shape) != tuple(tensors.down.shape) or tuple(up_param.shape) != tuple(tensors.up.shape):
        raise ModelLoadError(
            f"{label}: file has lora_down {list(tensors.down.shape)} / lora_up {list(tensors.up.shape)} but the "
            f"network has {list(down_param.shape)} / {list(up_param.shape)}; use the same network.rank / "
            f"network.conv_rank and base model the adapter was trained with"
        )
    has_magnitude = getattr(module, "magnitude", None) is not None
    if has_magnitude != (tensors.dora_scale is not None):
        kind = "DoRA" if tensors.dora_scale is not None else "plain LoRA"
        wanted = "dora" if tensors.dora_scale is not None else "lora"
        raise ModelLoadError(f'{label}: the file holds a {kind} module; set network.type = "{wanted}" to load it')
    if has_magnitude and module.axis != tensors.axis:
        raise ModelLoadError(
            f'{label}: the file decomposes along the {tensors.axis} axis but the network uses {module.axis}; '
            f'set network.decompose_axis = "{tensors.axis}"'
        )
    down_param.copy_(tensors.down.to(torch.float32))
    up = tensors.up.to(torch.float32) * (tensors.alpha / tensors.rank) / float(module.scale)
    up_param.copy_(up)
    if has_magnitude:
        magnitude = tensors.magnitude(module.original_weight().detach())
        module.magnitude.copy_(magnitude.to(module.magnitude.device).reshape(module.magnitude.shape))


@dataclass
class RestoreReport:
    restored: list[str]
    missing_in_file: list[str]  # network modules the file does not hold (left as they were)
    unknown_in_network: list[str]  # file modules the network does not have


def apply_adapter_file(adapter_file: AdapterFile, adapters, *, strict: bool = True) -> RestoreReport:
    """Load a file's tensors into an AdapterSet's modules exactly (for sampling and continued training).

    With `strict`, every file module must exist in the network and vice versa (ModelLoadError otherwise).
    A file read with NaN/inf values (`load_adapter(..., allow_non_finite=True)`) raises `NonFiniteAdapter`.
    """
    if adapter_file.non_finite:
        where = adapter_file.path or "adapter"
        raise NonFiniteAdapter(checks.non_finite_file_message(where, adapter_file.non_finite, adapter_file.tensor_count),
                               adapter_file.non_finite, adapter_file.path)
    file_names, net_names = set(adapter_file.modules), set(adapters.modules)
    unknown = sorted(file_names - net_names)
    missing = sorted(net_names - file_names)
    if strict and (unknown or missing):
        where = adapter_file.path or "adapter"
        raise ModelLoadError(
            f"{where}: the file and the network adapt different layers ({len(unknown)} only in the file, e.g. "
            f"{unknown[:2]}; {len(missing)} only in the network, e.g. {missing[:2]}); use the network.preset / "
            f"include / exclude and base model the adapter was trained with"
        )
    restored = []
    for name, tensors in adapter_file.modules.items():
        if name in adapters.modules:
            restore_module(adapters.modules[name], tensors, name)
            restored.append(name)
    return RestoreReport(restored, missing, unknown)


load_into = apply_adapter_file


def file_network_spec(adapter_file: AdapterFile, *, detach_norm: bool = True):
    """A NetworkSpec that reproduces a file's modules (most common rank/alpha per kind, its axis).

    The training alpha recorded by sdtrain (`ss_network_alpha`, conv_alpha in `ss_network_args`) is used
    when present so that continued training keeps the trained learning-rate scale.
    """
    from sdtrain.adapters.inject import NetworkSpec

    modules = list(adapter_file.modules.values())
    linear = [m for m in modules if m.kind == "linear"] or modules
    conv = [m for m in modules if m.kind == "conv"]
    rank = Counter(m.rank for m in linear).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in linear if m.rank == rank).most_common(1)[0][0]
    conv_rank = conv_alpha = None
    if conv:
        conv_rank = Counter(m.rank for m in conv).most_common(1)[0][0]
        conv_alpha = Counter(m.alpha for m in conv if m.rank == conv_rank).most_common(1)[0][0]
    if adapter_file.source == "sdtrain" and adapter_file.training_alpha is not None:
        alpha = adapter_file.training_alpha
        args = md.parsed_network_args(adapter_file.metadata)
        conv_alpha = float(args["conv_alpha"]) if conv and "conv_alpha" in args else (
            None if not conv else conv_rank * alpha / rank)
    axes = Counter(m.axis for m in modules if m.axis)
    decompose = bool(axes)
    groups = {m.group for m in modules}
    return NetworkSpec(
        type="dora" if decompose else "lora",
        rank=rank,
        alpha=float(alpha),
        conv_rank=conv_rank,
        conv_alpha=None if conv_alpha is None else float(conv_alpha),
        decompose_axis=axes.most_common(1)[0][0] if decompose else "output",
        detach_norm=detach_norm,
        preset="attn",
        include=sorted(adapter_file.modules),
        exclude=[],
        train_unet="unet" in groups,
        train_text_encoder=bool(groups & {"te1", "te2"}),
    )


# ---------------------------------------------------------------- building a network from a file alone


def canonical_name(arch: str | None, name: str) -> str:
    """The kohya name sdtrain uses for a file's module name (SD1/SD2's one encoder is `lora_te_`, not `lora_te1_`)."""
    if arch in ("sd15", "sd2") and name.startswith("lora_te1_"):
        return "lora_te_" + name[len("lora_te1_"):]
    return name


def _with_canonical_names(adapter_file: AdapterFile, arch: str) -> AdapterFile:
    renamed = {}
    for name, module in adapter_file.modules.items():
        new = canonical_name(arch, name)
        if new != name:
            module = replace(module, name=new)
        renamed[new] = module
    if renamed.keys() == adapter_file.modules.keys():
        return adapter_file
    return replace(adapter_file, modules=renamed)


def _rewrap(adapters, name: str, tensors: ModuleTensors, spec, detach_norm: bool) -> None:
    """Replace one injected module by a wrapper with the file's own rank/alpha/axis (mixed-rank files)."""
    from sdtrain.adapters.dora import DoRAConv2d, DoRALinear

    old = adapters.modules[name]
    base = old.base
    wrapper = DoRAConv2d if isinstance(base, torch.nn.Conv2d) else DoRALinear
    alpha = tensors.alpha
    new = wrapper(base, tensors.rank, alpha, decompose=tensors.dora_scale is not None,
                  axis=tensors.axis or spec.decompose_axis, detach_norm=detach_norm)
    component, path = adapters.module_paths[name]
    root = adapters.roots[component]
    parent_path, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, attr, new)
    adapters.modules[name] = new
    for param in new.parameters():
        param.requires_grad_(False)
    for pname, param in new.named_parameters():
        if not pname.startswith("base."):
            param.requires_grad_(True)


def _fits(module, tensors: ModuleTensors) -> bool:
    if tuple(module.lora_down.weight.shape) != tuple(tensors.down.shape):
        return False
    if tuple(module.lora_up.weight.shape) != tuple(tensors.up.shape):
        return False
    if (getattr(module, "magnitude", None) is not None) != (tensors.dora_scale is not None):
        return False
    return tensors.dora_scale is None or module.axis == tensors.axis


def adapters_from_file(adapter_file: AdapterFile, unet, text_encoders, arch: str, *, strict: bool = True,
                       detach_norm: bool = True):
    """Inject adapters shaped like the file's modules into the given models and load the file into them.

    Returns (AdapterSet, RestoreReport). Each module gets the file's rank and axis; the scale is the
    training alpha/rank recorded by sdtrain (else the file's), and the weights are restored exactly.
    With `strict=False`, file modules the models do not have are skipped and listed in the report.
    """
    from sdtrain.adapters.inject import inject_adapters, plan_injection

    adapter_file = _with_canonical_names(adapter_file, arch)
    spec = file_network_spec(adapter_file, detach_norm=detach_norm)
    if spec.train_text_encoder and not text_encoders:
        raise ModelLoadError(f"{adapter_file.path or 'adapter'}: the file adapts text encoders but none were given")
    plan = plan_injection(unet, text_encoders, arch, spec)
    spec.exclude = sorted({entry.kohya_name for entry in plan} - set(adapter_file.modules))
    adapters = inject_adapters(unet, text_encoders, arch, spec)
    for name, tensors in adapter_file.modules.items():
        module = adapters.modules.get(name)
        if module is not None and not _fits(module, tensors):
            _rewrap(adapters, name, tensors, spec, detach_norm)
    report = apply_adapter_file(adapter_file, adapters, strict=strict)
    return adapters, report
