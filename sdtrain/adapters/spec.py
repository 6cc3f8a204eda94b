"""What a network is: the adapter types, the DoRA magnitude axes and `NetworkSpec`, which mirrors the `[network]`
config section. Imports nothing heavy, so the config schema takes its choices from here."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, fields

TYPES = ("dora", "lora")
AXES = ("output", "input")  # DoRA magnitude: one per output channel (row) or per input channel (column)


@dataclass
class BlockSpec:
    """One `[[network.blocks]]` entry: layers whose kohya name matches `pattern` (a glob over the whole name, or
    `re:` + a regular expression searched in it) get this rank / alpha / learning rate (None: the network's)."""

    pattern: str
    rank: int | None = None
    alpha: float | None = None
    lr: float | None = None

    @classmethod
    def from_config(cls, block) -> BlockSpec:
        if isinstance(block, BlockSpec):
            return block
        get = block.get if isinstance(block, dict) else (lambda k: getattr(block, k, None))
        return cls(pattern=get("pattern"), rank=get("rank"), alpha=get("alpha"), lr=get("lr"))

    def matches(self, name: str) -> bool:
        if self.pattern.startswith("re:"):
            return re.search(self.pattern[3:], name) is not None
        return fnmatch.fnmatchcase(name, self.pattern)


@dataclass
class NetworkSpec:
    """What to inject; mirrors the `[network]` config keys (see `sdtrain/config/schema.py`)."""

    type: str = "dora"
    rank: int = 16
    alpha: float | None = None  # None: rank (scale 1)
    conv_rank: int | None = None  # None: rank
    conv_alpha: float | None = None  # None: conv_rank * alpha / rank (same scale as linear layers)
    decompose_axis: str = "output"
    detach_norm: bool = True
    preset: str = "attn-mlp"
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    train_unet: bool = True
    train_text_encoder: bool = False
    dropout: float = 0.0  # kohya network_dropout: on the down projection's output, per element
    rank_dropout: float = 0.0  # kohya rank_dropout: whole ranks
    module_dropout: float = 0.0  # kohya module_dropout: the whole adapter of a layer for one forward
    blocks: list[BlockSpec] = field(default_factory=list)

    def __post_init__(self):
        self.blocks = [BlockSpec.from_config(b) for b in self.blocks or []]

    @classmethod
    def from_config(cls, network) -> NetworkSpec:
        """From the resolved `config.network` section (any object with these attribute names)."""
        return cls(**{f.name: getattr(network, f.name) for f in fields(cls) if hasattr(network, f.name)})

    def block_for(self, name: str | None) -> tuple[int, BlockSpec] | None:
        """(index, entry) of the first `blocks` entry whose pattern matches the kohya name, or None."""
        if name is None:
            return None
        return next(((i, b) for i, b in enumerate(self.blocks) if b.matches(name)), None)

    def rank_alpha(self, kind: str, name: str | None = None) -> tuple[int, float]:
        """(rank, alpha) of an adapter on a "linear" or "conv" layer (named `name`: its `blocks` entry applies).

        A block's rank without its own alpha keeps the layer's scale alpha / rank."""
        alpha = float(self.alpha if self.alpha is not None else self.rank)
        rank = self.rank
        if kind == "conv" and (self.conv_rank is not None or self.conv_alpha is not None):
            rank = self.conv_rank if self.conv_rank is not None else self.rank
            alpha = float(self.conv_alpha if self.conv_alpha is not None else rank * alpha / self.rank)
        found = self.block_for(name)
        if found is not None:
            block = found[1]
            if block.rank is not None:
                rank, alpha = block.rank, alpha * block.rank / rank
            if block.alpha is not None:
                alpha = float(block.alpha)
        return rank, float(alpha)
