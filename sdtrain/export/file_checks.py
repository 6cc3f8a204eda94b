"""Checks on adapter tensors before they are used or written: malformed layout and metadata, NaN/inf, overflow.

Reading (`adapter_file.load_adapter`, before any model loads) refuses a file whose tensors or metadata do not
follow the kohya/LyCORIS layout (`MalformedAdapter`) and one that holds NaN/inf values (`NonFiniteAdapter`;
`sdtrain inspect` shows such a file instead). Saving (`adapter_file.save_adapter`, `write_adapter_tensors`) and
merging (`merge.merge_into_base`, `merge.save_merged`) check what they are about to write: NaN/inf weights are
refused, and so are finite weights that become inf in the dtype they are written in (`SaveDtypeOverflow`, e.g.
|w| > 65504 in fp16). Nothing is written then, so the previous file stays. Every message names the file, the
offending keys (counted, the first few listed) and the fix.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping

import torch

from sdtrain.errors import ModelLoadError, UserError

SHOWN = 3  # keys named per problem; the rest are counted
_CHECKED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
DIVERGED_FIX = ("training diverged: resume from an earlier training state with a lower optimizer.lr (and "
                "train.max_grad_norm on), or use an earlier save")


class MalformedAdapter(ModelLoadError):
    """An adapter file's tensors or metadata do not follow the kohya/LyCORIS layout."""


class NonFiniteAdapter(UserError):
    """An adapter (a file being read, weights about to be saved, or a merge of it) holds NaN/inf values.

    `counts` maps each offending key (a tensor key, or a module name) to its (NaN count, inf count);
    `path` is the file read or written.
    """

    def __init__(self, message: str, counts: Mapping[str, tuple[int, int]] | None = None, path=None):
        super().__init__(message)
        self.counts = dict(counts or {})
        self.path = path

    @property
    def modules(self) -> list[str]:
        """The kohya module names of the offending keys, in order."""
        return list(dict.fromkeys(module_of(key) for key in self.counts))


class SaveDtypeOverflow(NonFiniteAdapter):
    """Finite weights that become inf when cast to the dtype they are saved in (fp16 above 65504)."""


def module_of(key: str) -> str:
    """The module part of a tensor key (`lora_unet_x.lora_up.weight` → `lora_unet_x`)."""
    for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha", ".dora_scale", ".magnitude"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key


def listed(items: list[str], shown: int = SHOWN) -> str:
    """"a, b, c and 4 more"."""
    head = ", ".join(items[:shown])
    return head + (f" and {len(items) - shown} more" if len(items) > shown else "")


# ---------------------------------------------------------------- malformed files


class Problems:
    """Layout and metadata problems of one file, grouped by what is wrong, raised together."""

    def __init__(self, where: str):
        self.where = where
        self.found: dict[str, list[str]] = {}

    def add(self, problem: str, item: str) -> None:
        self.found.setdefault(problem, []).append(item)

    def raise_if_any(self) -> None:
        if not self.found:
            return
        parts = [f"{problem}: {len(items)} key(s): {listed(items)}" for problem, items in self.found.items()]
        raise MalformedAdapter(
            f"{self.where}: not a well-formed LoRA/DoRA file ({'; '.join(parts)}); the file is damaged or was "
            f"edited, or another tool wrote it outside the kohya/LyCORIS layout: re-export or re-download it"
        )


def check_tensor(problems: Problems, key: str, role: str, tensor: torch.Tensor) -> None:
    """dtype, emptiness and (for alpha) element count of one layout tensor (`role`: down, up, alpha, dora_scale)."""
    shape = list(tensor.shape)
    if tensor.numel() == 0:
        problems.add("empty tensor", f"{key} {shape}")
        return
    if role == "alpha":
        if tensor.is_complex() or tensor.dtype == torch.bool:
            problems.add("alpha is not a real number", f"{key} ({_dtype_name(tensor)})")
        elif tensor.numel() != 1:
            problems.add("alpha holds more than one number", f"{key} {shape}")
    elif not tensor.is_floating_point():
        problems.add("not a float tensor", f"{key} ({_dtype_name(tensor)})")


def check_metadata(problems: Problems, metadata: Mapping[str, str], rules: Iterable[str]) -> None:
    """The metadata values sdtrain parses: `ss_network_args` (JSON object, numeric conv_alpha),
    `ss_network_alpha` (a finite number) and `sdtrain_dora_scale` (a rule this version knows)."""
    from sdtrain.export import metadata as md

    text = metadata.get("ss_network_args")
    if text not in (None, ""):
        try:
            args = json.loads(text)
        except (json.JSONDecodeError, TypeError):
            args = None
            problems.add("metadata is not valid JSON", f"ss_network_args = {_short(text)}")
        else:
            if args is not None and not isinstance(args, dict):
                problems.add("metadata is not a JSON object", f"ss_network_args = {_short(text)}")
            elif isinstance(args, dict) and "conv_alpha" in args and not _finite_number(args["conv_alpha"]):
                problems.add("metadata number is not a finite number", f"ss_network_args conv_alpha = "
                                                                       f"{_short(str(args['conv_alpha']))}")
    alpha = metadata.get("ss_network_alpha")
    if alpha not in (None, "", "None") and not _finite_number(alpha):
        problems.add("metadata number is not a finite number", f"ss_network_alpha = {_short(alpha)}")
    rule = md.dora_scale_rule(metadata)
    rules = list(rules)
    if rule not in rules:
        problems.add(f"metadata names a dora_scale rule this sdtrain does not know (one of {rules}; a newer "
                     f"sdtrain wrote it: upgrade)", f"{md.RULE_KEY} = {_short(rule)}")


def _finite_number(value) -> bool:
    if isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError, OverflowError):
        return False


def _short(text: str, limit: int = 40) -> str:
    text = repr(text)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).replace("torch.", "")


# ---------------------------------------------------------------- NaN / inf


def non_finite_count(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[int, int]:
    """(NaN count, inf count) of a float tensor, or of its values cast to `dtype`; (0, 0) for other tensors.

    The common case, a finite tensor, costs one min/max pass (`torch.aminmax` propagates NaN, and a cast is
    monotonic, so the values overflow `dtype` exactly when an extreme does); only a tensor that fails it is counted.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0, 0
    if tensor.dtype not in _CHECKED_DTYPES:  # fp8 and other narrow types: check their fp32 values
        tensor = tensor.to(torch.float32)
    extremes = torch.stack(torch.aminmax(tensor))
    if bool(torch.isfinite(extremes if dtype is None else extremes.to(dtype)).all()):
        return 0, 0
    if dtype is not None:
        tensor = tensor.to(dtype)
    finite = torch.isfinite(tensor)
    nan = int(torch.isnan(tensor).sum())
    return nan, int((~finite).sum()) - nan


def non_finite_counts(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, tuple[int, int]]:
    """{key: (NaN count, inf count)} of the tensors holding NaN/inf, in order; with `dtype`, of their values
    cast to it (float tensors only), as they would be written."""
    counts = {}
    for key, tensor in tensors.items():
        nan, inf = non_finite_count(tensor, dtype)
        if nan or inf:
            counts[key] = (nan, inf)
    return counts


def describe_counts(counts: Mapping[str, tuple[int, int]], shown: int = SHOWN) -> str:
    """"a.lora_up.weight (3 NaN), b.alpha (1 inf) and 4 more"."""
    return listed([f"{key} ({_nan_inf(*value)})" for key, value in counts.items()], shown)


def totals(counts: Mapping[str, tuple[int, int]]) -> str:
    """"120 NaN, 3 inf" over all keys."""
    return _nan_inf(sum(v[0] for v in counts.values()), sum(v[1] for v in counts.values()))


def _nan_inf(nan: int, inf: int) -> str:
    return ", ".join(part for part in (f"{nan} NaN" if nan else "", f"{inf} inf" if inf else "") if part)


def non_finite_file_message(where: str, counts: Mapping[str, tuple[int, int]], total_keys: int) -> str:
    """What is wrong with a file holding NaN/inf, and what to do."""
    modules = len({module_of(key) for key in counts})
    return (f"{where}: {len(counts)} of {total_keys} tensors in {modules} module(s) hold NaN/inf ({totals(counts)}): "
            f"{describe_counts(counts)}; the adapter is corrupt (a diverged run, or weights that overflowed fp16 "
            f"when saved): use an earlier save of the run, or retrain with a lower optimizer.lr and save.dtype = "
            f'"bf16" or "fp32"')


def check_finite_to_save(tensors: Mapping[str, torch.Tensor], where) -> None:
    """Refuse to write `tensors` (as they will be written) when any holds NaN/inf.

    Inf in fp16/bf16 tensors whose weights were finite before the cast (`save_adapter` checks that first; a file
    read by `load_adapter` is finite) means they overflowed `save.dtype`: `SaveDtypeOverflow`, naming those
    tensors (a dora_scale encoded from them may hold NaN in turn). Otherwise `NonFiniteAdapter`.
    """
    counts = non_finite_counts(tensors)
    if not counts:
        return
    overflow = {k: v for k, v in counts.items() if tensors[k].dtype in (torch.float16, torch.bfloat16) and v[0] == 0}
    if overflow:
        dtype = tensors[next(iter(overflow))].dtype
        raise SaveDtypeOverflow(
            f"{where}: not written: the weights of {len({module_of(k) for k in overflow})} module(s) overflow "
            f'save.dtype = "{DTYPE_NAMES[dtype]}" (|w| above {torch.finfo(dtype).max:.6g} becomes inf): '
            f'{describe_counts(overflow)}; use "bf16" or "fp32" (weights this large usually also mean the run '
            f"diverged); the previous file is kept", overflow, where)
    raise NonFiniteAdapter(
        f"{where}: not written: {len(counts)} tensor(s) of {len({module_of(k) for k in counts})} module(s) hold "
        f"NaN/inf ({totals(counts)}): {describe_counts(counts)}; the previous file is kept", counts, where)


def check_finite_modules(adapters, where) -> None:
    """Refuse an AdapterSet whose trainable tensors (lora_down, lora_up, magnitude) hold NaN/inf, naming the modules."""
    counts = {}
    for name, param in adapters.named_parameters():
        nan, inf = non_finite_count(param.detach())
        if nan or inf:
            counts[name] = (nan, inf)
    if counts:
        modules = list(dict.fromkeys(module_of(key) for key in counts))
        raise NonFiniteAdapter(
            f"{where}: not saved: the adapter holds NaN/inf in {len(modules)} of {len(adapters.modules)} module(s) "
            f"({totals(counts)}): {describe_counts(counts)}; {DIVERGED_FIX}; the previous file is kept", counts, where)
