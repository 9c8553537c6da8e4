"""``SpatialAttention``: where to look, from channel-wise mean and max maps through a k x k conv."""

from __future__ import annotations

from torch import Tensor, nn

from .. import functional
from ..validation import check_bool, check_dims, check_gate, check_input, check_kernel_size, check_preset

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class SpatialAttention(nn.Module):
    """``x * gate(norm(conv([mean_c x, max_c x])))`` for ``x: (B, C, *spatial)``; output shaped like ``x``.

    Same constructor as the tutorial's class (``SpatialAttention(7)``), but any odd ``kernel_size``
    works, not only 3 and 7. ``conv`` holds the ``(1, 2, k, ..., k)`` weight (no bias); ``bn`` is a
    BatchNorm over its output when ``norm`` is on (timm and the official code), else ``None``.
    """

    def __init__(
        self,
        kernel_size: int = 7,
        *,
        preset: str | None = None,
        norm: bool | None = None,
        gate: str | None = None,
        dims: int = 2,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        options = check_preset(preset).override(spatial_norm=norm, gate=gate)
        self.kernel_size = check_kernel_size(kernel_size)
        self.gate = check_gate(options.gate)
        self.dims = check_dims(dims)
        factory = {"device": device, "dtype": dtype}
        self.conv = _CONV[self.dims](2, 1, self.kernel_size, padding=self.kernel_size // 2, bias=False, **factory)
        self.bn = None
        if check_bool("norm", options.spatial_norm):
            self.bn = _NORM[self.dims](1, eps=options.bn_eps, momentum=options.bn_momentum, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He (kaiming-normal, fan_out) conv weight; BatchNorm to weight 1, bias 0, fresh statistics."""
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.bn is not None:
            self.bn.reset_parameters()

    def attention(self, x: Tensor) -> Tensor:
        """The spatial gate alone: ``(B, 1, *spatial)`` with values in (0, 1) (sigmoid gate)."""
        check_input(x, f"SpatialAttention(dims={self.dims})", dims=self.dims)
        return functional.spatial_attention_map(x, self.conv.weight, norm=self.bn, gate_kind=self.gate)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.attention(x)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, gate={self.gate!r}, dims={self.dims}"
