"""The one table of CBAM defaults: the paper/tutorial form and the timm and official-code forms.

A module built with ``preset=NAME`` takes every option it is not given explicitly from this table, so
``CBAM(64, preset="official")`` has an MLP bias and a spatial BatchNorm while ``CBAM(64,
preset="official", mlp_bias=False)`` keeps the BatchNorm and drops the bias.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

POOL_TYPES = ("avg", "max", "lp", "lse", "mix")  # mix: (avg + max) / 2, timm's light form
GATES = ("sigmoid", "hard-sigmoid")
ORDERS = ("channel-spatial", "spatial-channel")  # CBAM: which gate comes first
COMBINES = ("average", "logits")  # ParallelCBAM: mean of the two gated maps, or one gate over summed logits
SPATIAL_CONVS = ("full", "factorized", "separable")  # SpatialAttention's k x k conv and its light forms
SPATIAL_POOLS = ("concat", "mix")  # [mean, max] as two maps (paper), or one map (mean + max) / 2 (timm light)


@dataclass(frozen=True)
class Preset:
    """Options a CBAM module takes when the caller does not set them.

    ``hidden_rounding`` turns ``in_channels / reduction_ratio`` into the MLP's hidden width:
    ``"floor"`` as the paper, tutorial and official code (``C // r``), ``"nearest"`` as timm
    (round half up). Either way the width is at least 1, so ``CBAM(8)`` has a hidden unit.
    """

    pool_types: tuple[str, ...] = ("avg", "max")
    mlp_bias: bool = False
    spatial_norm: bool = False
    spatial_pool: str = "concat"
    gate: str = "sigmoid"
    hidden_rounding: str = "floor"
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5

    def override(self, **options) -> Preset:
        """This preset with every option that is not ``None`` replaced."""
        return dataclasses.replace(self, **{k: v for k, v in options.items() if v is not None})

    def hidden_channels(self, in_channels: int, reduction_ratio: int) -> int:
        """Width of the channel MLP's hidden layer, never below 1."""
        if self.hidden_rounding == "nearest":
            width = math.floor(in_channels / reduction_ratio + 0.5)
        else:
            width = in_channels // reduction_ratio
        return max(1, width)


PAPER = Preset()

PRESETS: dict[str | None, Preset] = {
    None: PAPER,
    "paper": PAPER,  # Woo et al. 2018 and the tutorial in shared/seed/: no MLP bias, no spatial BN
    "seed": PAPER,
    "timm": Preset(spatial_norm=True, hidden_rounding="nearest"),  # timm.layers.CbamModule
    "official": Preset(mlp_bias=True, spatial_norm=True, bn_momentum=0.01),  # Jongchan/attention-module
}
PRESET_NAMES = tuple(name for name in PRESETS if name is not None)  # what preset= and --preset accept by name
