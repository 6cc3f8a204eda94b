"""Per-block settings (`[[network.blocks]]`): which adapted layers each entry matches, with what rank, alpha and
learning rate.

An entry's `pattern` is matched against kohya module names (glob over the whole name, or `re:` + a regular
expression); the first entry that matches a layer sets that layer's values, and what it leaves unset keeps the
network's (`network.rank`, `network.conv_rank`, their alphas; the model's learning rate: optimizer.unet_lr,
text_encoder_lr, text_encoder_2_lr). Ranks and alphas are applied when the adapters are made
(`NetworkSpec.rank_alpha`); learning rates become optimizer parameter groups of their own ("unet:blocks.0").
This is kohya's `block_dims` / `block_alphas` / `down_lr_weight` / `mid_lr_weight` / `up_lr_weight` expressed as
name patterns: kohya's 25 (SD1.5) or 23 (SDXL) block slots are patterns such as "lora_unet_down_blocks_1_*".
"""

from __future__ import annotations

from collections.abc import Iterable


def block_learning_rates(network, names: Iterable[str]) -> dict[str, tuple[str, float]]:
    """{kohya name: ("blocks.<i>", lr)} of the layers whose first matching entry sets `lr`."""
    from sdtrain.adapters.spec import NetworkSpec

    spec = NetworkSpec(blocks=list(getattr(network, "blocks", None) or []))
    rates = {}
    for name in names:
        found = spec.block_for(name)
        if found is not None and found[1].lr is not None:
            rates[name] = (f"blocks.{found[0]}", float(found[1].lr))
    return rates


def describe_blocks(plan, spec, group_lrs: dict[str, float]) -> list[str]:
    """Dry-run lines: per `blocks` entry, the layers it sets (count per model) and their rank / alpha / lr."""
    if not spec.blocks:
        return []
    lines = ["network.blocks (first matching entry wins):"]
    for index, block in enumerate(spec.blocks):
        mine = [e for e in plan if spec.block_for(e.kohya_name) == (index, block)]
        counts = {}
        for entry in mine:
            counts[entry.component] = counts.get(entry.component, 0) + 1
        where = ", ".join(f"{n} {c}" for c, n in counts.items()) or "no layer"
        ranks = sorted({spec.rank_alpha(e.kind, e.kohya_name) for e in mine})
        shown = ", ".join(f"rank {r} alpha {a:g}" for r, a in ranks) or "-"
        if block.lr is not None:
            lr = f"lr {block.lr:g}" + (" (frozen)" if block.lr == 0 else "")
        else:
            lr = "lr " + "/".join(f"{group_lrs[c]:g}" for c in counts) if counts else "lr -"
        example = f" (e.g. {mine[0].kohya_name})" if mine else ""
        lines.append(f'  {index}: "{block.pattern}" -> {where}: {shown}, {lr}{example}')
    return lines
