"""``ParallelCBAM``: the channel and spatial gates computed side by side from the same input."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .. import functional
from ..presets import COMBINES
from ..validation import check_choice, check_input
from .cbam import AttentionMaps
from .channel_attention import ChannelAttention
from .spatial_attention import SpatialAttention


class ParallelCBAM(nn.Module):
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
        super().__init__()
        self.combine = check_choice("combine", combine, COMBINES)
        factory = {"preset": preset, "gate": gate, "dims": dims, "device": device, "dtype": dtype}
        self.channel_att = ChannelAttention(
            in_channels, reduction_ratio, pool_types=pool_types, mlp_bias=mlp_bias, **factory
        )
        self.spatial_att = SpatialAttention(
            kernel_size, norm=spatial_norm, pool=spatial_pool, conv=spatial_conv, **factory
        )

    def reset_parameters(self) -> None:
        self.channel_att.reset_parameters()
        self.spatial_att.reset_parameters()

    def _check(self, x: Tensor) -> None:
        channels, dims = self.channel_att.in_channels, self.channel_att.dims
        check_input(x, f"ParallelCBAM(in_channels={channels}, dims={dims})", dims=dims, channels=channels)

    def attention(self, x: Tensor) -> AttentionMaps:
        """Both gates of the same ``x``: channel ``(B, C, 1, ...)``, spatial ``(B, 1, *spatial)``."""
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
