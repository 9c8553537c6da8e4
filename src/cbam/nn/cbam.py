"""``CBAM``: channel attention, then spatial attention on the channel-refined features."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..hooks import parts_watched
from ..ops import IMPLS, CbamWeights, FusedSpec, calibration, folds_input_norm, fused_applies, library
from ..ops.engines import is_channels_last_view
from ..ops.fused import autocast_off, checked_fused_cbam
from ..presets import ORDERS
from ..validation import check_bool, check_callable, check_choice, check_residual
from .gate_pair import AttentionMaps, GatePair


class CBAM(GatePair):
    """Convolutional Block Attention Module (Woo et al., ECCV 2018) for ``x: (B, C, *spatial)``.

    ``y = x * Mc(x)``, then ``out = y * Ms(y)`` (``order="spatial-channel"`` swaps the two, the
    paper's arrangement ablation). Tutorial-compatible: ``CBAM(in_channels,
    reduction_ratio=16, kernel_size=7)`` with ``.channel_att`` and ``.spatial_att``. Options not
    given come from ``preset`` (``None``/``"paper"``, ``"timm"``, ``"official"``; see
    ``cbam.presets``). ``spatial_conv`` picks the spatial conv: ``"full"`` k x k, or the tutorial's
    lightweight ``"factorized"`` / ``"separable"`` forms (see ``SpatialAttention``). ``dims`` picks
    1-D, 2-D or 3-D inputs. ``impl`` selects the implementation (see ``cbam.ops``): ``"reference"``,
    the eager composition of ``cbam.functional``; ``"fused"``, one autograd.Function with a
    hand-derived backward; ``"auto"`` (default), fused wherever it computes the same function.

    ``cbam(x, residual)`` is a residual block's tail, ``relu(cbam(x) + residual)``; the fused path
    computes it in its output pass instead of two more passes over memory (``cbam.models`` uses it
    where ``fuses(x)``).
    """

    def __init__(
        self,
        in_channels: int,
        reduction_ratio: int = 16,
        kernel_size: int = 7,
        *,
        preset: str | None = None,
        pool_types: Sequence[str] | None = None,
        mlp_bias: bool | None = None,
        spatial_norm: bool | None = None,
        spatial_pool: str | None = None,
        gate: str | None = None,
        order: str = "channel-spatial",
        spatial_conv: str = "full",
        dims: int = 2,
        impl: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            in_channels, reduction_ratio, kernel_size, preset=preset, pool_types=pool_types, mlp_bias=mlp_bias,
            spatial_norm=spatial_norm, spatial_pool=spatial_pool, gate=gate, spatial_conv=spatial_conv, dims=dims,
            device=device, dtype=dtype,
        )
        self.impl = check_choice("impl", impl, IMPLS)
        self.order = check_choice("order", order, ORDERS)
        if impl == "fused" and self.order != "channel-spatial":
            raise ValueError(f"impl='fused' computes order='channel-spatial' only, got order={order!r}")

    def attention(self, x: Tensor) -> AttentionMaps:
        """Both gates as applied: the first gate of ``x``, the second of ``x`` times the first."""
        self._check(x)
        if self.order == "channel-spatial":
            channel = self.channel_att.attention(x)
            return AttentionMaps(channel, self.spatial_att.attention(x * channel))
        spatial = self.spatial_att.attention(x)
        return AttentionMaps(self.channel_att.attention(x * spatial), spatial)

    def forward(self, x: Tensor, residual: Tensor | None = None, input_norm: Callable | None = None, *,
                inplace: bool = False) -> Tensor:
        """``(B, C, *spatial) -> (B, C, *spatial)``; with ``residual`` (shaped like ``x``),
        ``relu(cbam(x) + residual)``; with ``input_norm`` (a module), CBAM of ``input_norm(x)``.

        ``input_norm`` is the layer before CBAM, usually a BatchNorm: where it is a plain one that no
        hook watches (``cbam.ops.folds_input_norm``), the fused passes apply it as they read ``x``
        (on running statistics, or on batch statistics taken in the pooling pass, updating the
        running ones as its forward would; its backward comes with CBAM's) and its output is never
        written; otherwise it is called first.
        ``inplace=True`` lets the fused path write its output over ``x`` where no gradient is
        recorded (as ``nn.ReLU(inplace=True)``: for an ``x`` nothing else reads later).
        """
        self._check(x)
        check_bool("inplace", inplace)
        fused = self._fused_inputs() if self.fuses(x, residual, input_norm) else None
        if input_norm is not None:
            check_callable("input_norm", input_norm)
            if not (fused and folds_input_norm(input_norm, x, *fused)):
                x, input_norm, inplace = input_norm(x), None, False  # its hooks may have kept its output
                self._check(x)
                fused = self._fused_inputs() if self.fuses(x, residual) else None
        if residual is not None:
            check_residual(residual, x, f"{type(self).__name__}(in_channels={self.channel_att.in_channels})")
        if fused:
            return self._fused(x, residual, input_norm, inplace, *fused)
        if self.order == "channel-spatial":
            out = self.spatial_att(self.channel_att(x))
        else:
            out = self.channel_att(self.spatial_att(x))
        return out if residual is None else torch.relu(out + residual)

    def fuses(self, x: Tensor, residual: Tensor | None = None, input_norm: Callable | None = None) -> bool:
        """Whether ``forward(x, residual, input_norm)`` runs the fused implementation (see ``impl``); under
        ``torch.compile`` ``"auto"`` takes it where the ``torch.library`` ops cover this CBAM
        (``cbam.ops.library``). Elsewhere, on the C++ engine, ``"auto"`` takes the path that the one-time
        calibration found faster for this call's shape, dtype, mode (gradients recorded or not), residual
        and folded ``input_norm`` (``cbam.ops.calibration``; ``CBAM_CALIBRATE=0``: always fused there).
        Never where a hook watches one of CBAM's parts: the fused path calls none of them, so the reference
        runs (which calls ``channel_att``, ``spatial_att`` and its BatchNorm), even for ``impl="fused"``."""
        if not fused_applies(self.impl, self.order, x) or parts_watched(self):
            return False
        if self.impl == "fused":
            return True
        if torch.compiler.is_compiling():
            return library.covers(*self._fused_inputs())
        return self._calibrated(x, residual, input_norm)

    def _calibrated(self, x: Tensor, residual: Tensor | None, input_norm: Callable | None) -> bool:
        """``calibration.decide`` for a call like ``forward(x, residual, input_norm)``: fused unless timing
        found the reference faster (or the call is not calibrated: ``calibration.applies``; a residual
        unlike ``x`` is left to ``forward``'s check; an ``x`` of another dtype than the weights outside autocast,
        bfloat16 into a float32 CBAM, the reference cannot compute at all). Looked up by what the call cheaply
        tells; the key, the fold check and the runs are built only the first time."""
        if not calibration.applies(x) or (residual is not None and not (
                isinstance(residual, Tensor) and residual.shape == x.shape and residual.dtype == x.dtype)):
            return True
        if x.dtype != self.channel_att.fc1.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            return True  # the reference cannot run it (torch's linear refuses mixed dtypes): nothing to time
        grad = torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad)
                                            or self.channel_att.fc1.weight.requires_grad)
        quick = (x.shape, x.stride(), x.dtype, grad, residual is not None, type(input_norm),
                 getattr(input_norm, "training", None), self.training, torch.get_num_threads())
        return calibration.decide(self, quick, lambda: self._calibration_call(x, residual, input_norm))

    def _calibration_call(self, x: Tensor, residual: Tensor | None, input_norm: Callable | None) -> tuple:
        """``calibration.choose``'s arguments for a call like ``forward(x, residual, input_norm)``."""
        spec, weights = self._fused_inputs()
        norm = input_norm if input_norm is not None and folds_input_norm(input_norm, x, spec, weights) else None
        tensors = (x, residual, *weights.flat(), *(() if norm is None else (norm.weight, norm.bias)))
        training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        ca, sa = self.channel_att, self.spatial_att
        config = (type(self).__name__, ca.hidden_channels, ca.pool_types, ca.gate, ca.fc1.bias is not None, sa.pool,
                  sa.gate, sa.conv_kind, sa.kernel_size, sa.bn is not None, self.training,
                  norm is not None and norm.training)
        key = calibration.Key(tuple(x.shape), x.dtype, training, residual is not None, norm is not None, config,
                              torch.get_num_threads(), channels_last=is_channels_last_view(x))

        def reference(x: Tensor, residual: Tensor | None) -> Tensor:
            out = self.spatial_att.forward(self.channel_att.forward(x if norm is None else norm(x)))
            return out if residual is None else torch.relu(out + residual)

        def fused(x: Tensor, residual: Tensor | None) -> Tensor:
            return self._fused(x, residual, norm, False, spec, weights)

        params = [t for t in tensors[2:] if t is not None]
        buffers = [*self.buffers(), *(() if norm is None else norm.buffers())]
        return key, fused, reference, x, residual, params, buffers

    def _fused_inputs(self) -> tuple[FusedSpec, CbamWeights]:
        """The fused function's spec and weights."""
        ca, sa = self.channel_att, self.spatial_att
        fc1, fc2, bn = ca.fc1, ca.fc2, sa.bn  # each submodule looked up once (nn.Module.__getattr__ is slow)
        bn_weight, bn_bias = (None, None) if bn is None else (bn.weight, bn.bias)
        weights = CbamWeights(fc1.weight, fc1.bias, fc2.weight, fc2.bias, bn_weight, bn_bias, tuple(sa.conv_weights()))
        return FusedSpec(ca.pool_types, ca.gate, sa.pool, bn), weights

    def _fused(self, x: Tensor, residual: Tensor | None, input_norm: nn.Module | None, inplace: bool,
               spec: FusedSpec, weights: CbamWeights) -> Tensor:
        device = x.device.type  # under autocast: gates in float32 (float64 for float64 x), output in x's dtype
        with autocast_off(device):
            if torch.compiler.is_compiling() and library.covers(spec, weights):  # no graph break: the custom ops
                return library.fused_cbam_op(x, residual, spec, weights, input_norm)
            return checked_fused_cbam(x, spec, weights, residual, input_norm, inplace)  # forward checked the norm

    def extra_repr(self) -> str:
        return f"order={self.order!r}, impl={self.impl!r}"
