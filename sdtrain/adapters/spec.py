"""What a network is: the adapter types, the DoRA magnitude axes and `NetworkSpec`, which mirrors the `[network]`
config section. Imports nothing heavy, so the config schema takes its choices from here."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

TYPES = ("dora", "lora")
AXES = ("output", "input")  # DoRA magnitude: one per output channel (row) or per input channel (column)


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

    @classmethod
    def from_config(cls, network) -> NetworkSpec:
        """From the resolved `config.network` section (any object with these attribute names)."""
        return cls(**{f.name: getattr(network, f.name) for f in fields(cls) if hasattr(network, f.name)})

    def rank_alpha(self, kind: str) -> tuple[int, float]:
        """(rank, alpha) of an adapter on a "linear" or "conv" layer."""
        alpha = float(self.alpha if self.alpha is not None else self.rank)
        if kind != "conv" or (self.conv_rank is None and self.conv_alpha is None):
            return self.rank, alpha
        conv_rank = self.conv_rank if self.conv_rank is not None else self.rank
        conv_alpha = self.conv_alpha if self.conv_alpha is not None else conv_rank * alpha / self.rank
        return conv_rank, float(conv_alpha)
