"""``SpatialAttention``: where to look, from channel-wise mean and max maps through a k x k conv."""

from __future__ import annotations

from torch import Tensor, nn

from .. import functional
from ..presets import SPATIAL_CONVS, SPATIAL_POOLS
from ..validation import check_bool, check_choice, check_dims, check_gate, check_input, check_kernel_size, check_preset

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _same_conv(dims: int, cin: int, kernel: tuple[int, ...], factory: dict) -> nn.Module:
    """A bias-free ``cin -> 1`` conv whose padding keeps the spatial size."""
    return _CONV[dims](cin, 1, kernel, padding=tuple(k // 2 for k in kernel), bias=False, **factory)


def _light_convs(kind: str, dims: int, cin: int, k: int, factory: dict) -> nn.Sequential:
    """The light forms of the ``2 -> 1`` k x k conv, as a chain of size-keeping convs.

    ``factorized``: 1 x k (2 -> 1), then k x 1 (1 -> 1); in 3-D one 1-D conv per axis, last axis
    first: ``(d + 1) k`` weights instead of ``2 k^d``. ``separable``: pointwise 1 x 1 (2 -> 1), then
    k x k on that one map: ``k^d + 2`` weights. Pointwise comes first on purpose: for one output map,
    depthwise-then-pointwise is only a re-parametrisation of the full conv (``2 k^d + 2`` weights);
    pointwise-then-depthwise is its rank-1 (channel x space) factorisation, which is what saves cost.
    """
    if kind == "separable":
        return nn.Sequential(_same_conv(dims, cin, (1,) * dims, factory), _same_conv(dims, 1, (k,) * dims, factory))
    if dims == 1:
        raise ValueError("conv='factorized' needs dims >= 2 (a 1-D kernel has nothing to factorise); got dims=1")
    axes = reversed(range(dims))
    return nn.Sequential(*(_same_conv(dims, cin if i == 0 else 1, tuple(k if a == axis else 1 for a in range(dims)),
                                      factory) for i, axis in enumerate(axes)))


class SpatialAttention(nn.Module):
    """``x * gate(norm(conv([mean_c x, max_c x])))`` for ``x: (B, C, *spatial)``; output shaped like ``x``.

    Same constructor as the tutorial's class (``SpatialAttention(7)``), but any odd ``kernel_size``
    works, not only 3 and 7. With ``conv="full"``, ``conv`` is the ``(1, 2, k, ..., k)`` conv (no
    bias); ``"factorized"`` and ``"separable"`` (the tutorial's lightweight forms) make ``conv`` an
    ``nn.Sequential`` of smaller convs (see ``_light_convs``). ``bn`` is a BatchNorm over the conv's
    output when ``norm`` is on (timm and the official code), else ``None``. ``pool="mix"`` feeds the
    conv one map, ``(mean + max) / 2``, instead of two (timm's light form).
    """

    def __init__(
        self,
        kernel_size: int = 7,
        *,
        preset: str | None = None,
        norm: bool | None = None,
        gate: str | None = None,
        pool: str | None = None,
        conv: str = "full",
        dims: int = 2,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        options = check_preset(preset).override(spatial_norm=norm, spatial_pool=pool, gate=gate)
        self.kernel_size = check_kernel_size(kernel_size)
        self.gate = check_gate(options.gate)
        self.pool = check_choice("pool", options.spatial_pool, SPATIAL_POOLS)
        self.conv_kind = check_choice("conv", conv, SPATIAL_CONVS)
        self.dims = check_dims(dims)
        factory = {"device": device, "dtype": dtype}
        maps = 2 if self.pool == "concat" else 1
        if self.conv_kind == "full":
            self.conv = _same_conv(self.dims, maps, (self.kernel_size,) * self.dims, factory)
        else:
            self.conv = _light_convs(self.conv_kind, self.dims, maps, self.kernel_size, factory)
        self.bn = None
        if check_bool("norm", options.spatial_norm):
            self.bn = _NORM[self.dims](1, eps=options.bn_eps, momentum=options.bn_momentum, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He (kaiming-normal, fan_out) conv weights; BatchNorm to weight 1, bias 0, fresh statistics."""
        for weight in self.conv_weights():
            nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")
        if self.bn is not None:
            self.bn.reset_parameters()

    def conv_weights(self) -> list[Tensor]:
        """The conv chain's weights in order: one for ``"full"``, two or more for the light forms."""
        return [self.conv.weight] if self.conv_kind == "full" else [layer.weight for layer in self.conv]

    def logits(self, x: Tensor) -> Tensor:
        """The spatial gate's input, before ``gate``: ``(B, 1, *spatial)``."""
        check_input(x, f"SpatialAttention(dims={self.dims})", dims=self.dims)
        return functional.spatial_attention_logits(x, self.conv_weights(), norm=self.bn, pool=self.pool)

    def attention(self, x: Tensor) -> Tensor:
        """The spatial gate alone: ``(B, 1, *spatial)`` with values in (0, 1) (sigmoid gate)."""
        return functional.gate(self.logits(x), self.gate)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.attention(x).to(x.dtype)  # a float32 gate (CUDA autocast) keeps x's dtype

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, pool={self.pool!r}, conv={self.conv_kind!r}, gate={self.gate!r}, "
                f"dims={self.dims}")
