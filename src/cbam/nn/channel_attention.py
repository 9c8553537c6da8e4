"""``ChannelAttention``: which channels matter, from spatially pooled descriptors through a shared MLP."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .. import functional
from ..validation import (
    check_bool,
    check_dims,
    check_gate,
    check_input,
    check_int,
    check_pool_types,
    check_preset,
)


class ChannelAttention(nn.Module):
    """``x * gate(sum_p MLP(pool_p(x)))`` for ``x: (B, C, *spatial)``; output shaped like ``x``.

    Same constructor and behaviour as the tutorial's class (``ChannelAttention(64, 16)``). The shared
    MLP is two ``nn.Linear`` layers (``fc1``: C -> hidden, ``fc2``: hidden -> C) where the tutorial
    uses 1x1 ``Conv2d``: the math is identical and one module serves 1-D, 2-D and 3-D inputs.
    Options not given come from ``preset`` (see ``cbam.presets``).
    """

    def __init__(
        self,
        in_channels: int,
        reduction_ratio: int = 16,
        *,
        preset: str | None = None,
        pool_types: Sequence[str] | None = None,
        mlp_bias: bool | None = None,
        gate: str | None = None,
        dims: int = 2,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        options = check_preset(preset).override(pool_types=pool_types, mlp_bias=mlp_bias, gate=gate)
        self.in_channels = check_int("in_channels", in_channels)
        self.reduction_ratio = check_int("reduction_ratio", reduction_ratio)
        self.pool_types = check_pool_types(options.pool_types)
        self.gate = check_gate(options.gate)
        self.dims = check_dims(dims)
        bias = check_bool("mlp_bias", options.mlp_bias)
        self.hidden_channels = options.hidden_channels(self.in_channels, self.reduction_ratio)
        factory = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(self.in_channels, self.hidden_channels, bias=bias, **factory)
        self.fc2 = nn.Linear(self.hidden_channels, self.in_channels, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He (kaiming-normal, fan_out) weights as the tutorial recommends; zero biases."""
        for fc in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(fc.weight, mode="fan_out", nonlinearity="relu")
            if fc.bias is not None:
                nn.init.zeros_(fc.bias)

    def logits(self, x: Tensor) -> Tensor:
        """The channel gate's input, before ``gate``: ``(B, C, 1, ...)``."""
        check_input(x, f"ChannelAttention(in_channels={self.in_channels}, dims={self.dims})",
                    dims=self.dims, channels=self.in_channels)
        return functional.channel_attention_logits(
            x, self.fc1.weight, self.fc2.weight, self.fc1.bias, self.fc2.bias, pool_types=self.pool_types
        )

    def attention(self, x: Tensor) -> Tensor:
        """The channel gate alone: ``(B, C, 1, ...)`` with values in (0, 1) (sigmoid gate)."""
        return functional.gate(self.logits(x), self.gate)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.attention(x).to(x.dtype)  # a float32 gate (CUDA autocast) keeps x's dtype

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, reduction_ratio={self.reduction_ratio}, "
                f"hidden_channels={self.hidden_channels}, pool_types={self.pool_types}, "
                f"gate={self.gate!r}, dims={self.dims}")
