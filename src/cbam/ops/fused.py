"""The fused CBAM: a ``torch.autograd.Function`` with a hand-derived backward over few passes.

Only three things touch the full ``x: (B, C, S)`` (spatial dims flattened): the spatial pooling
(mean and max of each channel), the channel-wise mean and max of ``y = x * Mc`` (without
materialising ``y``), and the output ``x * Mc * Ms``. These run in an engine (``torch_passes``,
or a compiled one). Everything between them works on ``(B, C)`` and ``(B, S)`` vectors — the
shared MLP, the spatial conv, its BatchNorm and the gates — and is left to autograd, as a small
graph recorded during the forward and differentiated in the backward.

Saved for backward: ``x`` itself, the two arg-max index tensors ``(B, C)`` and ``(B, S)``, and the
small graph's vectors: about ``1 + (2 + k) / C`` times the input's bytes instead of the ~2x of
the eager composition.

Max pooling routes its gradient to the single arg-max ``torch.max`` reports (as ``max_pool``
does); the reference's ``amax`` splits it evenly among ties. Both are valid subgradients and agree
wherever the maximum is unique. The backward is not itself differentiable (no double backward):
use ``impl="reference"`` for ``gradgradcheck``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import functional
from . import cpu_extension, torch_passes


@dataclass(frozen=True)
class FusedSpec:
    """What the fused forward needs besides tensors."""

    pool_types: tuple[str, ...]
    gate: str
    spatial_pool: str
    norm: nn.Module | None  # the spatial BatchNorm (its buffers; weight and bias come as arguments)


def _engine(x: Tensor):
    """The compiled CPU passes for contiguous CPU input when they build, else ``torch_passes``."""
    if x.device.type == "cpu" and x.is_contiguous():
        return cpu_extension.engine() or torch_passes
    return torch_passes


def _leaf(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().requires_grad_()


def _descriptors(x: Tensor, avg: Tensor, peak: Tensor, pool_types) -> dict[str, Tensor]:
    """The pooled ``(B, C)`` vectors the pool types need."""
    found = {"avg": avg, "max": peak}
    if "lp" in pool_types:
        found["lp"] = torch.linalg.vector_norm(x, 2, dim=2)
    if "lse" in pool_types:
        found["lse"] = torch.logsumexp(x, dim=2)
    return found


def _channel_gate(pooled: dict[str, Tensor], spec: FusedSpec, fc1_w, fc1_b, fc2_w, fc2_b) -> Tensor:
    mix = (pooled["avg"] + pooled["max"]) / 2 if "mix" in spec.pool_types else None
    stacked = torch.stack([mix if kind == "mix" else pooled[kind] for kind in spec.pool_types])
    return functional.gate(functional.channel_mlp(stacked, fc1_w, fc2_w, fc1_b, fc2_b), spec.gate)


def _spatial_gate(mean: Tensor, peak: Tensor, spatial: torch.Size, spec: FusedSpec, bn_w, bn_b, chain) -> Tensor:
    shape = (mean.shape[0], 1, *spatial)
    logits = functional.spatial_conv(functional.spatial_maps(mean.view(shape), peak.view(shape), spec.spatial_pool),
                                     chain)
    if spec.norm is not None:  # the module's BatchNorm logic and buffers, with these weight/bias tensors
        logits = torch.func.functional_call(spec.norm, {"weight": bn_w, "bias": bn_b}, (logits,))
    return functional.gate(logits, spec.gate).view(mean.shape)


def fused_cbam(x: Tensor, spec: FusedSpec, *weights: Tensor | None) -> Tensor:
    """CBAM of ``x: (B, C, *spatial)`` on the fused passes; ``weights`` as ``FusedCBAM.forward`` takes them.

    Where no gradient is wanted this skips the autograd bookkeeping (recorded small graphs, saved
    tensors), which at small sizes costs more than the passes themselves.
    """
    if torch.is_grad_enabled() and (x.requires_grad or any(w is not None and w.requires_grad for w in weights)):
        return FusedCBAM.apply(x, spec, *weights)
    batch, channels, spatial = x.shape[0], x.shape[1], x.shape[2:]
    x3 = x.reshape(batch, channels, spatial.numel())
    engine = _engine(x)
    avg, peak, _ = engine.pool(x3)
    mc = _channel_gate(_descriptors(x3, avg, peak, spec.pool_types), spec, *weights[:4]).contiguous()
    mean, speak, _ = engine.gated_stats(x3, mc)
    ms = _spatial_gate(mean, speak, spatial, spec, *weights[4:6], weights[6:])
    return engine.apply(x, mc, ms.contiguous())


class FusedCBAM(torch.autograd.Function):
    """``out = y * Ms(y)``, ``y = x * Mc(x)`` for ``x: (B, C, *spatial)``; see the module docstring."""

    @staticmethod
    def forward(ctx, x, spec: FusedSpec, fc1_w, fc1_b, fc2_w, fc2_b, bn_w, bn_b, *chain):
        batch, channels, spatial = x.shape[0], x.shape[1], x.shape[2:]
        x3 = x.reshape(batch, channels, spatial.numel())
        engine = ctx.engine = _engine(x)
        avg, peak, channel_index = engine.pool(x3)
        pooled = {kind: value.requires_grad_() for kind, value in _descriptors(x3, avg, peak, spec.pool_types).items()}
        weights = [_leaf(w) for w in (fc1_w, fc1_b, fc2_w, fc2_b, bn_w, bn_b, *chain)]
        with torch.enable_grad():
            mc = _channel_gate(pooled, spec, *weights[:4])
        mean, speak, spatial_index = engine.gated_stats(x3, mc.detach().contiguous())
        stats = [mean.requires_grad_(), speak.requires_grad_()]
        with torch.enable_grad():
            ms = _spatial_gate(*stats, spatial, spec, *weights[4:6], weights[6:])
        ctx.save_for_backward(x, channel_index, spatial_index)
        ctx.graph = (mc, ms, pooled, stats, weights)
        return engine.apply(x, mc.detach().contiguous(), ms.detach().contiguous())

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError("FusedCBAM has no double backward (create_graph=True); use CBAM(impl='reference')")
        x, channel_index, spatial_index = ctx.saved_tensors
        mc, ms, pooled, stats, weights = ctx.graph
        flat = (*x.shape[:2], x.shape[2:].numel())
        x3, g3 = x.reshape(flat), grad.reshape(flat).contiguous()
        mc_value, ms_value = mc.detach().contiguous(), ms.detach().contiguous()
        engine = ctx.engine

        d_ms, d_mc = engine.gate_grads(g3, x3, mc_value, ms_value)
        spatial_weights = [w for w in weights[4:] if w is not None]
        d_mean, d_speak, *d_spatial_weights = [g.contiguous() for g in _grads(ms, [*stats, *spatial_weights], d_ms)]
        d_mc = d_mc + engine.stats_grad(x3, d_mean, d_speak, spatial_index)
        channel_weights = [w for w in weights[:4] if w is not None]
        d_channel = _grads(mc, [*pooled.values(), *channel_weights], d_mc)
        d_pooled = dict(zip(pooled, (g.contiguous() for g in d_channel)))

        dx = engine.input_grad(g3, x3, mc_value, ms_value, d_mean, d_speak, spatial_index,
                                     d_pooled["avg"], d_pooled["max"], channel_index)
        if "lp" in pooled:
            norm = pooled["lp"].detach().unsqueeze(2)
            dx.addcmul_(d_pooled["lp"].unsqueeze(2), torch.where(norm > 0, x3 / norm, 0))
        if "lse" in pooled:
            dx.addcmul_(d_pooled["lse"].unsqueeze(2), (x3 - pooled["lse"].detach().unsqueeze(2)).exp())
        found = iter([*d_channel[len(pooled):], *d_spatial_weights])
        return (dx.view_as(x), None, *(None if w is None else next(found) for w in weights))


def _grads(output: Tensor, inputs: list[Tensor], grad: Tensor) -> list[Tensor]:
    """``d output / d inputs`` contracted with ``grad``; zeros for inputs the output does not use.

    The small graph is kept (``retain_graph``) because the outer graph may be differentiated again
    with ``retain_graph=True``; it goes when the outer graph does.
    """
    found = torch.autograd.grad(output, inputs, grad, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, found)]
