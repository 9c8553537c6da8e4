"""The spatial gate after the fused CBAM's conv, ``ms = gate(norm(z))`` for logits ``z (B, S)``, without
autograd: the forward and its backward by hand, for no norm or a plain BatchNorm (on running or on
batch statistics). Other norms (``SyncBatchNorm``, a user's replacement) go through autograd in
``fused.py``.

The forward normalises through the BatchNorm's ``BatchNormState`` of this forward (``F.batch_norm`` on
its tensors), so its running statistics, momentum and ``num_batches_tracked`` behave exactly as
torch's; the backward recomputes the batch mean and variance from the saved logits (two reductions
over ``(B, S)``) instead of keeping them.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from .. import functional
from .batch_norm_state import BatchNormState
from .engines import torch_ops

PLAIN_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def is_plain(norm: nn.Module | None) -> bool:
    """Whether ``norm`` is a plain BatchNorm (not a subclass such as ``SyncBatchNorm``)."""
    return type(norm) in PLAIN_NORMS


def by_hand(norm: BatchNormState | nn.Module | None) -> bool:
    """Whether this module computes the gate for ``norm``: none or a plain BatchNorm's state."""
    return norm is None or isinstance(norm, BatchNormState)


def uses_batch_statistics(norm: BatchNormState | nn.Module) -> bool:
    """Whether a BatchNorm normalises with the batch's statistics (training, or no running ones)."""
    if isinstance(norm, BatchNormState):
        return norm.batch
    return norm.training or norm.running_mean is None


def forward(logits: Tensor, spatial: torch.Size, norm: BatchNormState | None, gate: str) -> Tensor:
    """``ms (B, S) = gate(norm(logits))`` (updating the norm's running statistics on batch statistics), the
    norm in the logits' dtype (float32 for a half-precision module: its tensors widened, see ``_normalized``)."""
    with torch.no_grad():
        if norm is not None:
            shaped = logits.view(logits.shape[0], 1, *spatial)
            logits = _normalized(norm, shaped).view(logits.shape)
        return functional.gate(logits, gate)


def _normalized(norm: BatchNormState, z: Tensor) -> Tensor:
    """``norm(z)`` in ``z``'s dtype. A bfloat16/float16 module's norm runs on float32 copies of its tensors
    (torch wants them alike; casting the float32 logits down instead overflowed float16 where they exceed
    its range) and its running statistics are stored back in their dtype."""
    tensors = (norm.weight, norm.bias, norm.running_mean, norm.running_var)
    if all(t is None or t.dtype == z.dtype for t in tensors):
        return norm.normalize(z)
    weight, bias, mean, var = (None if t is None else t.to(z.dtype) for t in tensors)
    widened = replace(norm, weight=weight, bias=bias, running_mean=mean, running_var=var)
    out = widened.normalize(z)
    if norm.updates:
        norm.running_mean.copy_(mean)
        norm.running_var.copy_(var)
    return out


def backward(logits: Tensor, ms: Tensor, d_ms: Tensor, norm: BatchNormState | None, gate: str,
             batch_statistics: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradients for the logits ``(B, S)`` and the norm's weight and bias (``None`` where it has none),
    given the gate ``ms`` the forward returned and its gradient ``d_ms``; ``batch_statistics`` as the
    forward normalised."""
    d_normed = torch_ops.gate_grad(ms, d_ms, gate == "hard-sigmoid")
    if norm is None:
        return d_normed, None, None
    if logits.numel() == 0:  # an empty batch: nothing normalised, nothing to learn
        nothing = None if norm.weight is None else torch.zeros_like(norm.weight)
        return d_normed, nothing, None if norm.bias is None else torch.zeros_like(norm.bias)
    if batch_statistics:
        variance, mean = torch.var_mean(logits, correction=0)
    else:
        variance, mean = norm.running_var, norm.running_mean
    inverse_std = torch.rsqrt(variance + norm.eps)
    centred = (logits - mean) * inverse_std
    scale = inverse_std if norm.weight is None else norm.weight.detach() * inverse_std
    d_weight = (d_normed * centred).sum().view(1) if norm.weight is not None else None
    d_bias = d_normed.sum().view(1) if norm.bias is not None else None
    if batch_statistics:  # the mean and variance depend on every logit
        d_logits = scale * (d_normed - d_normed.mean() - centred * (d_normed * centred).mean())
    else:
        d_logits = scale * d_normed
    return d_logits, d_weight, d_bias
