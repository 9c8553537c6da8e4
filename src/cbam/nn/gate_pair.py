"""``GatePair``: a channel gate and a spatial gate built from one set of options (CBAM, ParallelCBAM)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor, nn

from ..validation import check_input
from .channel_attention import ChannelAttention
from .spatial_attention import SpatialAttention


class AttentionMaps(NamedTuple):
    """Two gates for one input: ``channel (B, C, 1, ...)`` and ``spatial (B, 1, *spatial)``."""

    channel: Tensor
    spatial: Tensor


class GatePair(nn.Module):
    """``.channel_att`` and ``.spatial_att`` from CBAM's options; subclasses decide how they combine."""

    def __init__(
        self,
        in_channels: int,
        reduction_ratio: int,
        kernel_size: int,
        *,
        preset: str | None,
        pool_types: Sequence[str] | None,
        mlp_bias: bool | None,
        spatial_norm: bool | None,
        spatial_pool: str | None,
        gate: str | None,
        spatial_conv: str,
        dims: int,
        device,
        dtype,
    ) -> None:
        super().__init__()
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
        check_input(x, f"{type(self).__name__}(in_channels={channels}, dims={dims})", dims=dims, channels=channels)
