"""The large-tensor passes of the fused CBAM, in plain torch ops: the portable engine.

Every function works on ``x: (B, C, S)`` (spatial dims flattened) and per-channel ``(B, C)`` or
per-position ``(B, S)`` vectors. A compiled engine provides the same functions with fewer passes
over memory; this one is the definition they are tested against.

bfloat16/float16 tensors are widened to float32 as they are read (``wide``): the vectors come out in
float32, the large outputs (``apply``'s, ``input_grad``'s) in the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import functional


def wide(t: Tensor | None) -> Tensor | None:
    """``t`` in float32 where it is a half-precision tensor, else itself."""
    return t.float() if t is not None and t.dtype in (torch.bfloat16, torch.float16) else t


def normed(x: Tensor, input_affine: Tensor | None) -> Tensor:
    """``x (B, C, ...)`` through the per-channel map ``scale * x + shift`` of ``input_affine (2, C)`` (an
    eval-mode BatchNorm's, or one on batch statistics), or ``x`` itself without one."""
    x = wide(x)
    if input_affine is None:
        return x
    scale, shift = (t.view(1, -1, *[1] * (x.dim() - 2)) for t in input_affine)
    return x * scale + shift


def pool(x: Tensor, input_affine: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Spatial mean, max and arg-max of each channel of ``normed(x, input_affine)``: three ``(B, C)``."""
    x = normed(x, input_affine)
    peak, index = x.max(2)
    return x.mean(2), peak, index


def gated_stats(x: Tensor, mc: Tensor, input_affine: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Channel-wise mean, max and arg-max of ``y = normed(x, input_affine) * mc`` at each position: three
    ``(B, S)``."""
    x = normed(x, input_affine)
    mean = torch.bmm(mc.unsqueeze(1), x).squeeze(1) / x.shape[1]
    peak, index = (x * mc.unsqueeze(2)).max(1)
    return mean, peak, index


def apply(x: Tensor, mc: Tensor, ms: Tensor, residual: Tensor | None = None,
          input_affine: Tensor | None = None) -> Tensor:
    """``y * mc * ms`` for ``y = normed(x, input_affine)``, ``x: (B, C, *spatial)`` (not flattened: the
    output is no view), ``mc (B, C)``, ``ms (B, S)``; with a ``residual`` shaped like ``x``,
    ``relu(y * mc * ms + residual)``."""
    y = normed(x, input_affine)
    ones = [1] * (x.dim() - 2)
    out = y * mc.view(*mc.shape, *ones) * ms.view(ms.shape[0], 1, *x.shape[2:])
    out = out if residual is None else out.add_(residual).relu_()
    return out.to(x.dtype)


def _centred_sums(weights: Tensor, x: Tensor, centre: Tensor) -> Tensor:
    """``(B, 2, C)``: each row's sum of ``weights`` and of ``weights * (x - centre)``, ``weights`` shaped
    like ``x (B, C, S)`` or broadcasting to it, ``centre (C)``."""
    weights = weights.expand_as(x)
    return torch.stack([weights.sum(2), (weights * (x - centre.view(1, -1, 1))).sum(2)], 1)


def gate_grads(grad: Tensor, x: Tensor, mc: Tensor, ms: Tensor, rectified: Tensor | None, channel_index: Tensor,
               input_affine: Tensor | None = None, centre: Tensor | None = None):
    """Gradients of ``sum(grad * y * mc * ms)``, ``y = normed(x, input_affine)``, for ``ms (B, S)`` and
    ``mc (B, C)``, the ``grad`` used (with ``rectified``, the output ``relu(y * mc * ms + residual)`` of
    a residual tail, ``grad`` first goes through that ReLU), ``y`` at ``channel_index (B, C)`` (the
    maxima ``pool`` found, again) and, with ``centre (C)`` (a BatchNorm's batch mean), each row's sums
    of ``grad * ms`` and ``grad * ms * (x - centre)`` ``(B, 2, C)`` (else ``None``)."""
    y = normed(x, input_affine)
    if rectified is not None:
        grad = torch.ops.aten.threshold_backward(grad, rectified, 0)
    gy = wide(grad) * y
    peaks = y.gather(2, channel_index.unsqueeze(2)).squeeze(2)
    gated = None if centre is None else _centred_sums(wide(grad) * ms.unsqueeze(1), wide(x), centre)
    return torch.bmm(mc.unsqueeze(1), gy).squeeze(1), torch.bmm(gy, ms.unsqueeze(2)).squeeze(2), grad, peaks, gated


def stats_grad(x: Tensor, d_mean: Tensor, d_peak: Tensor, index: Tensor, input_affine: Tensor | None = None,
               centre: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Gradient for ``mc (B, C)`` of ``gated_stats`` (of ``normed(x, input_affine)``), given the gradients
    of its mean and peak ``(B, S)``; with ``centre (C)`` (a BatchNorm's batch mean) also each row's sums
    of ``d_mean * (x - centre)`` and ``x - centre`` ``(B, 2, C)`` (else ``None``)."""
    y = normed(x, input_affine)
    d_mc = torch.bmm(y, d_mean.unsqueeze(2)).squeeze(2) / y.shape[1]
    at_peak = y.gather(1, index.unsqueeze(1)).squeeze(1)
    centred = None
    if centre is not None:
        offsets = wide(x) - centre.view(1, -1, 1)
        centred = torch.stack([(d_mean.unsqueeze(1) * offsets).sum(2), offsets.sum(2)], 1)
    return d_mc.scatter_add_(1, index, d_peak * at_peak), centred


def input_grad(
    grad: Tensor, x: Tensor, mc: Tensor, ms: Tensor,
    d_mean: Tensor, d_peak: Tensor, index: Tensor, d_avg: Tensor, d_max: Tensor, channel_index: Tensor,
) -> Tensor:
    """Gradient for ``x (B, C, S)`` through the output, the gated statistics and the pooling.

    ``d_mean``/``d_peak``/``index`` ``(B, S)`` belong to ``gated_stats``; ``d_avg``/``d_max``/
    ``channel_index`` ``(B, C)`` to ``pool``. Each max routes its gradient to the one arg-max.
    """
    channels, positions = x.shape[1], x.shape[2]
    dx = wide(grad) * mc.unsqueeze(2) * ms.unsqueeze(1)
    rows = torch.stack([mc / channels, d_avg / positions], dim=2)  # (B, C, 2)
    cols = torch.stack([d_mean, torch.ones_like(d_mean)], dim=1)  # (B, 2, S)
    dx.baddbmm_(rows, cols)
    dx.scatter_add_(1, index.unsqueeze(1), (d_peak * mc.gather(1, index)).unsqueeze(1))
    return dx.scatter_add_(2, channel_index.unsqueeze(2), d_max.unsqueeze(2)).to(x.dtype)


def batch_norm_input_grad(
    grad: Tensor, x: Tensor, mc: Tensor, ms: Tensor,
    d_mean: Tensor, d_peak: Tensor, index: Tensor, d_avg: Tensor, d_max: Tensor, channel_index: Tensor,
    gated: Tensor, centred: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for ``x (B, C, S)`` and the weight and bias of a BatchNorm on batch statistics (``mean``,
    ``invstd (C)``) whose output is CBAM's input: torch's BatchNorm backward of ``input_grad``'s ``dy``.
    ``gated`` and ``centred`` (the sums ``gate_grads`` and ``stats_grad`` take for the compiled engine)
    are not needed here."""
    dy = input_grad(grad, x, mc, ms, d_mean, d_peak, index, d_avg, d_max, channel_index)
    return torch.ops.aten.native_batch_norm_backward(dy, x, weight, None, None, mean, invstd, True, 0.0,
                                                     [True, True, True])


def conv_backward(maps: Tensor, d_out: Tensor, weight: Tensor, size: list[int], kernel: list[int]):
    """Gradients for ``maps (B, I, S)`` and ``weight (I, kd, kh, kw)`` of the size-keeping correlation
    ``out (B, S)`` of the maps (spatial ``size = [D, H, W]``) with the weight, given ``d_out (B, S)``."""
    batch, inputs, positions = maps.shape
    d_maps, d_weight, _ = torch.ops.aten.convolution_backward(
        d_out.reshape(batch, 1, *size), maps.reshape(batch, inputs, *size), weight.unsqueeze(0), None, [1, 1, 1],
        [k // 2 for k in kernel], [1, 1, 1], False, [0, 0, 0], 1, [True, True, False])
    return [d_maps.view(batch, inputs, positions), d_weight[0]]


def _combination(coefficients: list[float], tensors: list[Tensor]) -> Tensor:
    """``sum_i coefficients[i] * tensors[i]`` with the coefficients as Python numbers (a tensor made of them
    would be a host-to-device copy, which waits for the GPU); terms of 0 left out, 1 not multiplied."""
    terms = [t if c == 1 else c * t for c, t in zip(coefficients, tensors) if c != 0]
    return sum(terms[1:], terms[0]) if terms else torch.zeros_like(tensors[0])


def _mlp_inputs(avg: Tensor, peak: Tensor, avg_coef: list[float], max_coef: list[float]) -> Tensor:
    """The MLP's inputs ``(P, B, C)``: ``avg_coef[p] * avg + max_coef[p] * peak`` for each pool type ``p``."""
    return torch.stack([_combination([a, m], [avg, peak]) for a, m in zip(avg_coef, max_coef)])


def channel_gate(avg: Tensor, peak: Tensor, avg_coef: list[float], max_coef: list[float], fc1_w: Tensor,
                 fc1_b: Tensor | None, fc2_w: Tensor, fc2_b: Tensor | None, hard: bool) -> Tensor:
    """The channel gate ``mc = gate(sum_p fc2(relu(fc1(avg_coef[p] * avg + max_coef[p] * peak))))`` ``(B, C)``
    of ``avg, peak (B, C)`` (fc2 once, on the sum of the activations: it is linear)."""
    stacked = _mlp_inputs(avg, peak, avg_coef, max_coef)
    hidden = F.linear(stacked, fc1_w, fc1_b).relu_().sum(0)
    logits = F.linear(hidden, fc2_w, None if fc2_b is None else fc2_b * len(avg_coef))
    return functional.gate(logits, "hard-sigmoid" if hard else "sigmoid")


def gate_grad(gate: Tensor, d_gate: Tensor, hard: bool) -> Tensor:
    """The gate's backward from its output ``gate`` and ``d_gate``: sigmoid ``d y (1 - y)``; hard-sigmoid 0
    where ``y <= 0`` or ``y >= 1``, also for a NaN ``d``, else ``d / 6`` (torch's relu6 backward selects)."""
    if hard:
        return d_gate.masked_fill((gate <= 0) | (gate >= 1), 0) / 6
    return d_gate * (gate * (1 - gate))


def channel_backward(avg: Tensor, peak: Tensor, avg_coef: list[float], max_coef: list[float], fc1_w: Tensor,
                     fc1_b: Tensor | None, fc2_w: Tensor, mc: Tensor, d_mc: Tensor, hard: bool) -> list[Tensor]:
    """Gradients of the channel gate ``mc = gate(sum_p fc2(relu(fc1(avg_coef[p] * avg + max_coef[p] * peak))))``
    for ``avg, peak (B, C)``, ``fc1_w (H, C)``, ``fc1_b (H)``, ``fc2_w (C, H)`` and fc2's bias ``(C)``, given
    the gate ``mc`` the forward returned and ``d_mc (B, C)``; by formula, without autograd."""
    count = len(avg_coef)
    stacked = _mlp_inputs(avg, peak, avg_coef, max_coef)
    pre = F.linear(stacked, fc1_w, fc1_b)  # (P, B, H)
    d_logits = gate_grad(mc, d_mc, hard)  # (B, C)
    d_pre = torch.ops.aten.threshold_backward((d_logits @ fc2_w).expand_as(pre), pre, 0)  # (P, B, H): as ReLU's
    d_stacked = list((d_pre @ fc1_w).unbind(0))
    return [_combination(avg_coef, d_stacked), _combination(max_coef, d_stacked),
            d_pre.flatten(0, 1).t() @ stacked.flatten(0, 1), d_pre.sum((0, 1)), d_logits.t() @ pre.relu().sum(0),
            d_logits.sum(0) * count]


def batch_norm_affine(weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    """A BatchNorm with statistics ``mean, var (C)`` as the per-channel map ``(2, C)``: scale and shift."""
    scale = torch.rsqrt(var + eps)
    scale = scale if weight is None else scale * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    return torch.stack([scale, shift])


def batch_norm_pool(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> list[Tensor]:
    """A BatchNorm on the batch statistics of ``x (B, C, S)`` and CBAM's pooling of its output: ``avg, peak,
    channel_index (B, C)``, the batch ``mean``, biased ``var``, ``invstd (C)`` and the map ``(2, C)``. The mean
    is the rows' means' mean, a sum over the count as torch's BatchNorm takes it (``var_mean``'s Welford mean
    is NaN, not ±inf, for a channel holding an infinity), and ``avg`` the map of the rows' means."""
    widened = wide(x)
    rows = widened.mean(2)
    mean, var = rows.mean(0), torch.var(widened, dim=(0, 2), correction=0)
    affine = batch_norm_affine(weight, bias, mean, var, eps)
    peak, index = normed(x, affine).max(2)
    return [affine[0] * rows + affine[1], peak, index, mean, var, torch.rsqrt(var + eps), affine]
