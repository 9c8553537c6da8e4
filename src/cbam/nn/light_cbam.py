"""``LightCBAM``: timm's light CBAM, pooling avg and max into one descriptor for each gate."""

from __future__ import annotations

from .cbam import CBAM


class LightCBAM(CBAM):
    """CBAM whose gates each see one pooled descriptor, ``(avg + max) / 2``: a variant, not the paper.

    Channel gate: one MLP pass on ``(avg_pool x + max_pool x) / 2`` instead of two passes summed.
    Spatial gate: a k x k conv over the one map ``(mean_c x + max_c x) / 2`` instead of two maps:
    half the conv weights. ``LightCBAM(C, preset="timm")`` computes as timm's ``LightCbamModule``.
    Every ``CBAM`` option is accepted; ``pool_types`` and ``spatial_pool`` default to ``"mix"``.
    """

    def __init__(self, in_channels: int, reduction_ratio: int = 16, kernel_size: int = 7, **options) -> None:
        if options.get("pool_types") is None:  # None is "not given", as everywhere
            options["pool_types"] = ("mix",)
        if options.get("spatial_pool") is None:
            options["spatial_pool"] = "mix"
        super().__init__(in_channels, reduction_ratio, kernel_size, **options)
