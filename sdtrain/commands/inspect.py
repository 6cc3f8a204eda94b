"""`sdtrain inspect ADAPTER`: what an adapter file holds (modules per group, ranks, alphas, axis, dtypes, metadata).

A file holding NaN/inf values is shown with their counts and the command exits 1 (the other commands refuse such a
file); a malformed file is refused with exit code 2, like everywhere else.
"""

from __future__ import annotations

import json
from collections import Counter

NAME = "inspect"
HELP = ("Show an adapter file's modules per group, ranks, alphas, DoRA axis, dtypes and metadata; exit 1 when it "
        "holds NaN/inf values.")

_LONG_KEYS = ("ss_tag_frequency", "sdtrain_config", "ss_dataset_dirs", "ss_datasets")


def add_arguments(parser):
    parser.add_argument("adapter", help="adapter .safetensors file")
    parser.add_argument("--full-metadata", action="store_true", help="print long metadata values (tags, config) in full")
    parser.add_argument("--modules", action="store_true", help="list every module with its rank, alpha and axis")


def _counts(values) -> str:
    counts = Counter(values)
    return ", ".join(f"{value:g}×{n}" if isinstance(value, float) else f"{value}×{n}" for value, n in sorted(counts.items()))


def describe(adapter_file, *, full_metadata: bool = False, list_modules: bool = False) -> str:
    """The text `sdtrain inspect` prints."""
    lines = [
        f"file     {adapter_file.path}",
        f"source   {adapter_file.source}   arch {adapter_file.arch or 'unknown'}   "
        f"DoRA axis {adapter_file.axis or 'none (plain LoRA)'}",
        "dtypes   " + ", ".join(f"{role} {dtype}" for role, dtype in adapter_file.dtypes.items()),
    ]
    training_alpha = adapter_file.training_alpha
    if training_alpha is not None:
        lines.append(f"training alpha {training_alpha:g} (folded into lora_up; file alpha = rank)")
    if adapter_file.non_finite:
        from sdtrain.export.file_checks import describe_counts, module_of, totals

        counts = adapter_file.non_finite
        lines.append(f"NaN/inf  {len(counts)} of {adapter_file.tensor_count} tensors in "
                     f"{len({module_of(k) for k in counts})} of {len(adapter_file.modules)} modules hold NaN/inf "
                     f"({totals(counts)}): {describe_counts(counts)}")
        lines.append("         the adapter is corrupt: merge, verify, export, analyze and --init-from refuse it; use an "
                     "earlier save of the run")
    guessed = [m.name for m in adapter_file.modules.values() if m.axis_guessed]
    if guessed:
        lines.append(f"note     axis of {len(guessed)} module(s) guessed from a square 1-D dora_scale (e.g. {guessed[0]})")
    lines.append("")
    lines.append(f"{'group':<6} {'modules':>7} {'linear':>6} {'conv':>5}  ranks            alphas")
    for group, names in adapter_file.groups().items():
        modules = [adapter_file.modules[n] for n in names]
        convs = sum(m.kind == "conv" for m in modules)
        lines.append(
            f"{group:<6} {len(modules):>7} {len(modules) - convs:>6} {convs:>5}  "
            f"{_counts(m.rank for m in modules):<16} {_counts(m.alpha for m in modules)}"
        )
    if list_modules:
        lines.append("")
        from sdtrain.export.file_checks import module_of

        bad = {module_of(k) for k in adapter_file.non_finite}
        for name, module in adapter_file.modules.items():
            lines.append(f"  {name}  rank {module.rank}  alpha {module.alpha:g}  {module.kind} "
                         f"{list(module.weight_shape)}  axis {module.axis or '-'}" + ("  NaN/inf" if name in bad else ""))
    if adapter_file.other_keys:
        lines.append(f"ignored keys ({len(adapter_file.other_keys)}): {', '.join(adapter_file.other_keys[:5])}")
    lines.append("")
    lines.append(f"metadata ({len(adapter_file.metadata)} keys)")
    for key in sorted(adapter_file.metadata):
        value = adapter_file.metadata[key]
        if key in _LONG_KEYS and not full_metadata:
            value = _summarise(key, value)
        lines.append(f"  {key} = {value}")
    return "\n".join(lines)


def _summarise(key: str, value: str) -> str:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return value if len(value) <= 100 else value[:97] + "..."
    if key == "ss_tag_frequency" and isinstance(parsed, dict):
        tags = sum(len(v) for v in parsed.values() if isinstance(v, dict))
        return f"<{len(parsed)} folder(s), {tags} tag(s); --full-metadata to show>"
    return f"<JSON, {len(value)} characters; --full-metadata to show>"


def run(args) -> int:
    from sdtrain.export.adapter_file import load_adapter

    adapter_file = load_adapter(args.adapter, allow_non_finite=True)
    print(describe(adapter_file, full_metadata=args.full_metadata, list_modules=args.modules))
    return 1 if adapter_file.non_finite else 0
