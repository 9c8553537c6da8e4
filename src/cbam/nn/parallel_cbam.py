"""``ParallelCBAM``: the channel and spatial gates computed side by side from the same input."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .. import functional
from ..presets import COMBINES
from ..validation import check_choice
from .gate_pair import AttentionMaps, GatePair


class ParallelCBAM(GatePair):
    """Both gates from ``x: (B, C, *spatial)``; output shaped like ``x``.

    ``combine="average"`` is the tutorial's section-6 module: ``(x * Mc(x) + x * Ms(x)) / 2``.
    ``combine="logits"`` gates once with the summed logits, ``x * gate(a_c + a_s)`` (the BAM
    arrangement): a variant, not the paper's CBAM. The paper found the sequential, channel-first
    arrangement best. Options as ``cbam.CBAM``; ``.channel_att``/``.spatial_att`` are kept.
    """

    def __init__(
        self,
        in_channels: int,
        reduction_ratio: int = 16,
        kernel_size: int = 7,
        *,
        combine: str = "average",
        preset: str | None = None,
        pool_types: Sequence[str] | None = None,
        mlp_bias: bool | None = None,
        spatial_norm: bool | None = None,
        spatial_pool: str | None = None,
        gate: str | None = None,
        spatial_conv: str = "full",
        dims: int = 2,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            in_channels, reduction_ratio, kernel_size, preset=preset, pool_types=pool_types, mlp_bias=mlp_bias,
            spatial_norm=spatial_norm, spatial_pool=spatial_pool, gate=gate, spatial_conv=spatial_conv, dims=dims,
            device=device, dtype=dtype,
        )
        self.combine = check_choice("combine", combine, COMBINES)

    def attention(self, x: Tensor) -> AttentionMaps:
        """Both gates of the same ``x``: channel ``(B, C, 1, ...)``, spatial ``(B, 1, *spatial)``. With
        ``combine="logits"`` each is its branch's gate alone: the one applied, ``gate(a_c + a_s)``, is a
        ``(B, C, *spatial)`` map that does not split into the two."""
        self._check(x)
        return AttentionMaps(self.channel_att.attention(x), self.spatial_att.attention(x))

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        ca, sa = self.channel_att, self.spatial_att
        return functional.parallel_cbam(
            x, ca.fc1.weight, ca.fc2.weight, sa.conv_weights(), ca.fc1.bias, ca.fc2.bias,
            pool_types=ca.pool_types, norm=sa.bn, spatial_pool=sa.pool, gate_kind=ca.gate, combine=self.combine,
        )

    def extra_repr(self) -> str:
        return f"combine={self.combine!r}"
