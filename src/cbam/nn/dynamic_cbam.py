"""``DynamicCBAM``: a CBAM that learns its spatial kernel size and MLP width by gradient descent.

The tutorial's DynamicCBAM casts "learnable" ratio and kernel parameters with ``int()`` and builds a
fresh, randomly initialised CBAM inside every forward, so nothing it owns ever learns. Here the
choices are differentiable relaxations (as in DARTS-style architecture search):

- kernel: one conv whose weight is ``sum_i softmax(kernel_logits / T)_i * pad(w_i)``, the candidate
  kernels zero-padded to the largest, so it costs one conv of the largest kernel;
- width: one MLP of the largest candidate width whose hidden units are scaled by
  ``sum_j softmax(reduction_logits / T)_j * mask_j``, ``mask_j`` keeping the first ``h_j`` units
  (nested widths ``h_j = C / r_j``, rounded as the preset says).

Train the weights and the logits with their own optimisers, e.g.::

    weights = torch.optim.SGD(module.weight_parameters(), lr=0.1)
    arch = torch.optim.Adam(module.arch_parameters(), lr=3e-3)

then ``module.finalize()`` returns a plain ``CBAM`` with the most likely kernel and width.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional
from ..validation import (
    check_bool,
    check_dims,
    check_gate,
    check_input,
    check_int,
    check_kernel_size,
    check_pool_types,
    check_preset,
)
from .cbam import CBAM
from .gate_pair import AttentionMaps
from .spatial_attention import _NORM


def _distinct(name: str, values, check) -> tuple[int, ...]:
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise TypeError(f"{name} must be a non-empty sequence of ints, got {values!r}")
    checked = tuple(check(v) for v in values)
    if len(set(checked)) != len(checked):
        raise ValueError(f"{name} must hold distinct values, got {checked}")
    return checked


class DynamicCBAM(nn.Module):
    """CBAM over ``x: (B, C, *spatial)`` with a soft choice of kernel size and reduction ratio.

    ``arch_parameters()`` returns ``(kernel_logits, reduction_logits)``; ``weight_parameters()``
    everything else. ``temperature`` divides the logits before the softmax (lower: sharper).
    """

    def __init__(
        self,
        in_channels: int,
        kernel_sizes: Sequence[int] = (3, 5, 7),
        reduction_ratios: Sequence[int] = (8, 16, 32),
        *,
        temperature: float = 1.0,
        preset: str | None = None,
        pool_types: Sequence[str] | None = None,
        mlp_bias: bool | None = None,
        spatial_norm: bool | None = None,
        gate: str | None = None,
        dims: int = 2,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        options = check_preset(preset).override(
            pool_types=pool_types, mlp_bias=mlp_bias, spatial_norm=spatial_norm, gate=gate
        )
        self.preset = preset
        self.in_channels = check_int("in_channels", in_channels)
        self.kernel_sizes = _distinct("kernel_sizes", kernel_sizes, check_kernel_size)
        self.reduction_ratios = _distinct("reduction_ratios", reduction_ratios, partial(check_int, "reduction_ratios"))
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            kind = type(temperature).__name__
            raise TypeError(f"temperature must be a positive number, got {temperature!r} ({kind})")
        if not temperature > 0:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)
        self.pool_types = check_pool_types(options.pool_types)
        self.gate = check_gate(options.gate)
        self.mlp_bias = check_bool("mlp_bias", options.mlp_bias)
        self.spatial_norm = check_bool("spatial_norm", options.spatial_norm)
        self.dims = check_dims(dims)
        self.hidden_widths = tuple(options.hidden_channels(self.in_channels, r) for r in self.reduction_ratios)

        factory = {"device": device, "dtype": dtype}
        widest = max(self.hidden_widths)
        self.fc1 = nn.Linear(self.in_channels, widest, bias=self.mlp_bias, **factory)
        self.fc2 = nn.Linear(widest, self.in_channels, bias=self.mlp_bias, **factory)
        self.kernels = nn.ParameterList(
            nn.Parameter(torch.empty(1, 2, *[k] * self.dims, **factory)) for k in self.kernel_sizes
        )
        self.bn = None
        if self.spatial_norm:
            self.bn = _NORM[self.dims](1, eps=options.bn_eps, momentum=options.bn_momentum, **factory)
        self.kernel_logits = nn.Parameter(torch.zeros(len(self.kernel_sizes), **factory))
        self.reduction_logits = nn.Parameter(torch.zeros(len(self.reduction_ratios), **factory))
        self.register_buffer("width_masks", torch.empty(len(self.hidden_widths), widest, **factory), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He (fan_out) weights, zero biases, uniform choices (zero logits), the width masks (not saved)."""
        units = torch.arange(self.width_masks.shape[1], device=self.width_masks.device)
        self.width_masks.copy_(torch.stack([units < h for h in self.hidden_widths]))
        for weight in (self.fc1.weight, self.fc2.weight, *self.kernels):
            nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")
        for bias in (self.fc1.bias, self.fc2.bias):
            if bias is not None:
                nn.init.zeros_(bias)
        if self.bn is not None:
            self.bn.reset_parameters()
        nn.init.zeros_(self.kernel_logits)
        nn.init.zeros_(self.reduction_logits)

    def arch_parameters(self) -> tuple[nn.Parameter, nn.Parameter]:
        """``(kernel_logits, reduction_logits)``: the two choice vectors, in that order."""
        return self.kernel_logits, self.reduction_logits

    def weight_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter except the two choice vectors."""
        arch = {id(p) for p in self.arch_parameters()}
        return (p for p in self.parameters() if id(p) not in arch)

    def kernel_probabilities(self) -> Tensor:
        return torch.softmax(self.kernel_logits / self.temperature, 0)

    def width_probabilities(self) -> Tensor:
        return torch.softmax(self.reduction_logits / self.temperature, 0)

    def mixed_kernel(self) -> Tensor:
        """``sum_i p_i * pad(w_i)``: ``(1, 2, K, ..., K)`` with K the largest candidate kernel."""
        largest = max(self.kernel_sizes)
        padded = [F.pad(w, [(largest - w.shape[-1]) // 2] * (2 * self.dims)) for w in self.kernels]
        # A sum, not torch.stack: autocast's stack refuses a half dtype other than its own (bf16 module, fp16 autocast).
        return sum(p * w for p, w in zip(self.kernel_probabilities(), padded))

    def attention(self, x: Tensor) -> AttentionMaps:
        """The channel gate of ``x`` and the spatial gate of ``x * channel``, under the soft choices."""
        check_input(x, f"DynamicCBAM(in_channels={self.in_channels}, dims={self.dims})",
                    dims=self.dims, channels=self.in_channels)
        logits = functional.channel_attention_logits(
            x, self.fc1.weight, self.fc2.weight, self.fc1.bias, self.fc2.bias,
            pool_types=self.pool_types, hidden_mask=self.width_probabilities() @ self.width_masks,
        )
        channel = functional.gate(logits, self.gate)
        spatial = functional.spatial_attention_map(x * channel.to(x.dtype), self.mixed_kernel(), norm=self.bn,
                                                   gate_kind=self.gate)
        return AttentionMaps(channel, spatial)

    def forward(self, x: Tensor) -> Tensor:
        channel, spatial = self.attention(x)
        return x * channel.to(x.dtype) * spatial.to(x.dtype)  # float32 gates (CUDA autocast) keep x's dtype

    @torch.no_grad()
    def finalize(self) -> CBAM:
        """A plain ``CBAM`` with the most likely kernel and width, its weights the matching slices."""
        k = int(self.kernel_logits.argmax())
        r = int(self.reduction_logits.argmax())
        width = self.hidden_widths[r]
        weight = self.fc1.weight
        module = CBAM(
            self.in_channels, self.reduction_ratios[r], self.kernel_sizes[k], preset=self.preset,
            pool_types=self.pool_types, mlp_bias=self.mlp_bias, spatial_norm=self.spatial_norm, gate=self.gate,
            dims=self.dims, device=weight.device, dtype=weight.dtype,
        )
        ca, sa = module.channel_att, module.spatial_att
        ca.fc1.weight.copy_(self.fc1.weight[:width])
        ca.fc2.weight.copy_(self.fc2.weight[:, :width])
        if self.mlp_bias:
            ca.fc1.bias.copy_(self.fc1.bias[:width])
            ca.fc2.bias.copy_(self.fc2.bias)
        sa.conv.weight.copy_(self.kernels[k])
        if self.bn is not None:
            sa.bn.load_state_dict(self.bn.state_dict())
        return module.train(self.training)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, kernel_sizes={self.kernel_sizes}, "
                f"reduction_ratios={self.reduction_ratios} (widths {self.hidden_widths}), "
                f"temperature={self.temperature}, gate={self.gate!r}, dims={self.dims}")
