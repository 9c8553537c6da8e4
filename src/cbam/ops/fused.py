"""The fused CBAM: a ``torch.autograd.Function`` with a hand-derived backward over few passes.

Only three things touch the full ``x: (B, C, S)`` (spatial dims flattened): the spatial pooling
(mean and max of each channel), the channel-wise mean and max of ``y = x * Mc`` (without
materialising ``y``), and the output ``x * Mc * Ms``. Everything between them works on ``(B, C)``
and ``(B, S)`` vectors: the shared MLP, the spatial conv, its BatchNorm and the gates.

The forward runs without autograd. Where the C++ engine has it (``cpu_passes.forward``: avg/max/mix
pooling, one spatial conv weight, a BatchNorm that is an affine map or none) the whole forward is one
call that keeps each sample's ``x`` in cache between its passes; otherwise the passes run one by one
with the small steps in torch. The backward differentiates the small steps from the saved vectors:
the MLP and the spatial conv on the engine (or through autograd, recomputed), the spatial norm and
gate by formula (``spatial_gate``); only a norm that is no plain BatchNorm is recorded with autograd
in the forward (a norm may update running statistics, so it runs exactly once).

Saved for backward: ``x`` itself, the two arg-max index tensors ``(B, C)`` and ``(B, S)`` (int64), the
pooled ``(B, C)`` vectors but the maxima (read again from ``x`` at their indices while the backward's
first pass streams by), the channel gate ``(B, C)`` and four ``(B, S)`` vectors (gated mean and max,
spatial logits and gate): for fp32 and avg/max pooling ``1 + 6 / C + 4 / S`` times the input's bytes
(1.02 at 256x56x56, 1.08 at 2048x7x7) instead of the ~2x of the eager composition. With a residual
the output is saved too (for the ReLU's backward); in a network it is the next layer's input, which
that layer saves anyway.

With ``input_norm`` (a plain BatchNorm before CBAM, see ``folds_input_norm``) ``x`` is the
BatchNorm's input: every pass applies its per-channel map as it reads ``x`` (forward and backward).
Batch statistics come from the pooling pass itself (``batch_norm_pool``: sums in double, and each
row's minimum and maximum, which the monotone map turns into the pooled maximum); the running ones
are updated as the module would. On running statistics the backward ends with torch's BatchNorm
backward; on batch statistics its two per-channel sums are built from row sums the gate-gradient
and statistics-gradient passes take, and one last pass writes the input gradient
(``batch_norm_input_grad``). Saved then: ``x`` and three ``(C)``-sized vectors more; neither the
BatchNorm's output nor, on batch statistics, its output gradient is ever written.

Max pooling routes its gradient to the single arg-max (the first one, as ``torch.argmax`` reports);
the reference's ``amax`` splits it evenly among ties. Both are valid subgradients and agree wherever
the maximum is unique. The backward is not itself differentiable (no double backward): use
``impl="reference"`` for ``gradgradcheck``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import functional, hooks
from . import cpu_extension, spatial_gate, torch_passes

NATIVE_POOLS = {"avg": (1.0, 0.0), "max": (0.0, 1.0), "mix": (0.5, 0.5)}  # (mean, max) coefficients


@dataclass(frozen=True)
class FusedSpec:
    """What the fused forward needs besides tensors. ``norm`` is the spatial BatchNorm module, which
    runs as itself; its weight and bias must also be the ones passed to ``fused_cbam`` (so that the
    autograd function returns their gradients)."""

    pool_types: tuple[str, ...]
    gate: str
    spatial_pool: str
    norm: nn.Module | None


def _engine(x: Tensor):
    """The compiled CPU passes for contiguous float32/float64 CPU input when they build, else
    ``torch_passes`` (any device, layout and floating dtype)."""
    if x.device.type == "cpu" and x.is_contiguous() and x.dtype in (torch.float32, torch.float64):
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


def _spatial_logits(mean: Tensor, peak: Tensor, spatial: torch.Size, spec: FusedSpec, chain) -> Tensor:
    """The spatial conv of the gated statistics ``(B, S)`` -> ``(B, S)``."""
    shape = (mean.shape[0], 1, *spatial)
    maps = functional.spatial_maps(mean.view(shape), peak.view(shape), spec.spatial_pool)
    return functional.spatial_conv(maps, chain).view(mean.shape)


def _spatial_gate(logits: Tensor, spatial: torch.Size, spec: FusedSpec, bn_w, bn_b) -> Tensor:
    """``gate(norm(logits))`` for ``logits (B, S)``, the module's BatchNorm logic and buffers with these
    weight/bias tensors."""
    if spec.norm is not None:
        shaped = logits.view(logits.shape[0], 1, *spatial)
        logits = torch.func.functional_call(spec.norm, {"weight": bn_w, "bias": bn_b}, (shaped,)).view(logits.shape)
    return functional.gate(logits, spec.gate)


def _norm_tensors(norm: nn.Module | None, bn_w, bn_b) -> tuple:
    """A plain BatchNorm as the C++ engine takes it, ``(weight, bias, running_mean, running_var, eps)``;
    all ``None`` (and eps 0) without a norm."""
    if norm is None:
        return None, None, None, None, 0.0
    return bn_w, bn_b, norm.running_mean, norm.running_var, norm.eps


def _fixed_norm(spec: FusedSpec, bn_w, bn_b) -> tuple | None:
    """``_norm_tensors`` where the spatial norm is a fixed affine map (none, or a plain BatchNorm on
    running statistics); ``None`` where it uses batch statistics or is another kind of norm."""
    norm = spec.norm
    if norm is not None and (not spatial_gate.by_hand(norm) or spatial_gate.uses_batch_statistics(norm)):
        return None
    return _norm_tensors(norm, bn_w, bn_b)


def _padded(dims) -> list[int]:
    """Spatial dims as ``[D, H, W]``: 1-D and 2-D padded with ones in front."""
    return [1] * (3 - len(dims)) + list(dims)


def _conv_geometry(weight: Tensor, spatial) -> tuple[Tensor, list[int], list[int]]:
    """One spatial conv weight ``(1, I, *kernel)`` as ``(I, kd, kh, kw)``, the spatial size as
    ``[D, H, W]`` and the kernel as ``[kd, kh, kw]``."""
    kernel = _padded(weight.shape[2:])
    return weight[0].contiguous().view(weight.shape[1], *kernel), _padded(spatial), kernel


def _native_pools(engine, spec: FusedSpec) -> bool:
    """Whether ``engine`` is the compiled one and the pool types are ones it computes (avg/max/mix)."""
    return engine is not torch_passes and set(spec.pool_types) <= NATIVE_POOLS.keys()


def _native_applies(engine, spec: FusedSpec, weights) -> bool:
    """Whether ``cpu_passes.forward`` computes this CBAM: the compiled engine, avg/max/mix pooling and
    one spatial conv weight."""
    return _native_pools(engine, spec) and len(weights[6:]) == 1


def _native_forward(engine, x: Tensor, residual: Tensor | None, spec: FusedSpec, fixed_norm, weights,
                    input_norm: _InputNorm | None = None, overwrite: bool = False):
    """``cpu_passes.forward`` where it computes this CBAM, else ``None``; it stops at the spatial logits
    where the norm is not fixed (``fixed_norm`` is ``None``). A folded input BatchNorm's map is applied
    as the passes read ``x`` (its pooling taken as computed, where it was); with ``overwrite`` the
    output is written over ``x``."""
    fc1_w, fc1_b, fc2_w, fc2_b, _, _, *chain = weights
    if not _native_applies(engine, spec, weights):
        return None
    finish = fixed_norm is not None
    norm_args = fixed_norm if finish else _norm_tensors(None, None, None)  # unused when not finishing
    return engine.forward(x, _padded(x.shape[2:]), *_pool_coefficients(spec), fc1_w.contiguous(), _contiguous(fc1_b),
                          fc2_w.contiguous(), _contiguous(fc2_b), chain[0].contiguous(), _padded(chain[0].shape[2:]),
                          spec.gate == "hard-sigmoid", finish, *norm_args, _contiguous(residual),
                          None if input_norm is None else input_norm.affine, overwrite,
                          [] if input_norm is None or input_norm.pooled is None else list(input_norm.pooled))


def folds_input_norm(norm, x: Tensor, spec: FusedSpec, weights) -> bool:
    """Whether ``fused_cbam(x, ..., input_norm=norm)`` applies ``norm`` inside its passes (as they read
    ``x``, never writing ``norm(x)``): a plain BatchNorm, unwatched by hooks, matching ``x``'s
    channels, dtype and device (on batch statistics: more than one value per channel, else torch's
    own error), and a CBAM whose forward the C++ engine computes (``_native_applies``)."""
    if type(norm) not in spatial_gate.PLAIN_NORMS or hooks.watched(norm) or x.numel() == 0:
        return False
    tensors = [t for t in (norm.weight, norm.bias, norm.running_mean, norm.running_var) if t is not None]
    if any(t.shape != x.shape[1:2] or t.dtype != x.dtype or t.device != x.device for t in tensors):
        return False
    if spatial_gate.uses_batch_statistics(norm) and x.numel() <= x.shape[1]:
        return False
    return _native_applies(_engine(x), spec, weights)


def _update_running_statistics(norm: nn.Module, mean: Tensor, var: Tensor, count: int) -> None:
    """Update ``norm``'s running statistics with a batch's ``mean`` and biased ``var`` over ``count``
    values per channel, as its forward does (momentum or cumulative average, unbiased variance,
    ``num_batches_tracked``), in double as torch's CPU kernel computes them."""
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    if norm.running_mean is None:
        return
    for running, batch in ((norm.running_mean, mean), (norm.running_var, var * count / (count - 1))):
        running.copy_(factor * batch.double() + (1 - factor) * running.double())


@dataclass
class _InputNorm:
    """The folded BatchNorm of one forward: its map ``affine (2, C)``; on running statistics (``batch``
    false) those, ``mean`` and ``spread = var``; on the batch's, ``mean`` and ``spread =
    1 / sqrt(var + eps)`` (as torch's backward takes each) and CBAM's pooling of the map's output
    ``pooled = (avg, peak, channel_index)``, computed in the same read of ``x`` as the statistics."""

    affine: Tensor
    mean: Tensor
    spread: Tensor
    batch: bool
    pooled: tuple[Tensor, Tensor, Tensor] | None


def _input_norm(norm: nn.Module, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> _InputNorm:
    """The folded BatchNorm ``norm`` for ``x``; on batch statistics the running ones are updated as the
    module's forward would."""
    engine = cpu_extension.engine()
    with torch.no_grad():
        if not spatial_gate.uses_batch_statistics(norm):
            mean, var = norm.running_mean, norm.running_var
            return _InputNorm(engine.batch_norm_affine(weight, bias, mean, var, norm.eps), mean, var, False, None)
        avg, peak, index, mean, var, invstd, affine = engine.batch_norm_pool(
            x.reshape(*x.shape[:2], -1), weight, bias, norm.eps)
        _update_running_statistics(norm, mean, var, x.numel() // x.shape[1])
        return _InputNorm(affine, mean, invstd, True, (avg, peak, index))


def _spatial_grads(engine, mean: Tensor, speak: Tensor, spatial, spec: FusedSpec, chain, d_logits: Tensor):
    """Gradients for the gated statistics ``mean, speak (B, S)`` and the conv weights, given the
    spatial logits' gradient ``d_logits (B, S)``: on the engine for one conv weight, else autograd."""
    if len(chain) == 1:
        taps, size, kernel = _conv_geometry(chain[0], spatial)
        maps = torch.stack([mean, speak], 1) if spec.spatial_pool == "concat" else ((mean + speak) / 2).unsqueeze(1)
        d_maps, d_taps = engine.conv_backward(maps, d_logits.contiguous(), taps, size, kernel)
        d_stats = d_maps.unbind(1) if spec.spatial_pool == "concat" else [d_maps[:, 0] / 2] * 2
        return [*d_stats, d_taps.view_as(chain[0])]
    stats = [_leaf(mean), _leaf(speak)]
    leaves = [_leaf(w) for w in chain]
    with torch.enable_grad():
        return _grads(_spatial_logits(*stats, spatial, spec, leaves), [*stats, *leaves], d_logits)


def _spatial_backward(engine, ctx, saved, spatial, norm_weights, chain, d_ms: Tensor):
    """From the spatial gate's gradient ``d_ms (B, S)`` back to the gated statistics: ``d_mean,
    d_speak (B, S)``, the norm's weight/bias gradients (those that exist) and the conv weights'.

    ``saved`` is ``(logits, ms, mean, speak)``, ``norm_weights`` the norm's ``(weight, bias)``. One C++
    call for one conv weight and a norm that ``spatial_gate`` computes; else ``spatial_gate`` (or the
    recorded norm) and ``_spatial_grads``.
    """
    logits, ms, mean, speak = saved
    spec, norm = ctx.spec, ctx.spec.norm
    if engine is not torch_passes and ctx.ms_graph is None and len(chain) == 1:
        weight, _, running_mean, running_var, eps = _norm_tensors(norm, *norm_weights)
        d_mean, d_speak, d_conv, d_weight, d_bias = engine.spatial_backward(
            logits, ms, d_ms, mean, speak, chain[0].contiguous(), _padded(spatial), _padded(chain[0].shape[2:]),
            spec.gate == "hard-sigmoid", norm is not None, ctx.batch_statistics, weight, running_mean, running_var, eps)
        d_norm = [g for g, w in zip((d_weight, d_bias), norm_weights) if w is not None]
        return d_mean, d_speak, d_norm, [d_conv]
    if ctx.ms_graph is None:
        d_logits, *d_norm = spatial_gate.backward(logits, ms, d_ms, norm, spec.gate, ctx.batch_statistics)
        d_norm = [g for g in d_norm if g is not None]
    else:
        d_logits, *d_norm = _grads(ctx.ms_graph[1], ctx.ms_graph[0], d_ms)
    d_mean, d_speak, *d_chain = _spatial_grads(engine, mean, speak, spatial, spec, chain, d_logits)
    return d_mean.contiguous(), d_speak.contiguous(), d_norm, d_chain


def _with_nones(found: list[Tensor], like) -> list[Tensor | None]:
    """``found`` in the places of ``like`` that are not ``None``."""
    values = iter(found)
    return [None if t is None else next(values) for t in like]


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


@dataclass
class _Forward:
    """One forward's results, computed without autograd; ``ms_graph`` is ``([logits, *norm weights]
    leaves, ms)`` where a norm that ``spatial_gate`` does not compute was recorded."""

    out: Tensor
    engine: object  # the module of passes that ran: cpu_passes or torch_passes
    pooled: dict[str, Tensor]
    mc: Tensor
    stats: tuple[Tensor, Tensor]
    indices: tuple[Tensor, Tensor]
    logits: Tensor
    ms: Tensor
    ms_graph: tuple[list[Tensor], Tensor] | None


def _forward(x: Tensor, residual: Tensor | None, spec: FusedSpec, weights, record: bool,
             input_norm: _InputNorm | None = None, overwrite: bool = False) -> _Forward:
    """The fused forward, ``relu(cbam(x) + residual)`` with a residual; ``record`` keeps the autograd
    graph of a norm that ``spatial_gate`` does not compute. ``input_norm``, a folded input BatchNorm
    (only where ``folds_input_norm``); ``overwrite`` lets the one-call C++ forward write its output
    over ``x``."""
    spatial = x.shape[2:]
    engine = _engine(x)
    fixed_norm = _fixed_norm(spec, *weights[4:6])
    with torch.no_grad():
        native = _native_forward(engine, x, residual, spec, fixed_norm, weights, input_norm, overwrite)
        if native is not None:
            out, mc, ms, avg, peak, channel_index, mean, speak, spatial_index, logits = native
            pooled = {"avg": avg, "max": peak}
        else:
            x3 = x.reshape(*x.shape[:2], spatial.numel())
            avg, peak, channel_index = engine.pool(x3)
            pooled = _descriptors(x3, avg, peak, spec.pool_types)
            mc = _channel_gate(pooled, spec, *weights[:4]).contiguous()
            mean, speak, spatial_index = engine.gated_stats(x3, mc)
            logits = _spatial_logits(mean, speak, spatial, spec, weights[6:]).contiguous()
    ms_graph = None
    if spatial_gate.by_hand(spec.norm):
        if native is None or fixed_norm is None:  # the norm (once: it may update running statistics), gate
            ms = spatial_gate.forward(logits, spatial, spec.norm, spec.gate).contiguous()
    else:  # another norm: run once, recorded when a backward will follow
        with torch.set_grad_enabled(record):
            leaves = [logits.detach().requires_grad_(record), *(_leaf(w) for w in weights[4:6] if w is not None)]
            ms_graph = (leaves, _spatial_gate(leaves[0], spatial, spec, *_with_nones(leaves[1:], weights[4:6])))
        ms = ms_graph[1].detach().contiguous()
    if native is None or fixed_norm is None:
        out = engine.apply(x, mc, ms, _contiguous(residual), None if input_norm is None else input_norm.affine)
    return _Forward(out, engine, pooled, mc, (mean, speak), (channel_index, spatial_index), logits, ms,
                    ms_graph if record else None)


def fused_cbam(x: Tensor, spec: FusedSpec, *weights: Tensor | None, residual: Tensor | None = None,
               input_norm: nn.Module | None = None, inplace: bool = False) -> Tensor:
    """CBAM of ``x: (B, C, *spatial)`` on the fused passes; ``weights`` as ``FusedCBAM.forward`` takes them.
    With ``residual`` (shaped like ``x``): ``relu(cbam(x) + residual)``, a residual block's tail, in
    the same output pass. ``input_norm``, where given, must pass ``folds_input_norm``: CBAM's input is
    then ``input_norm(x)``, computed as the passes read ``x`` (its running statistics updated as its
    forward would). ``inplace`` lets the output overwrite ``x`` where no gradient is recorded (the
    C++ forward in one call; elsewhere it is ignored).

    Where no gradient is wanted this skips the autograd function and what it saves.
    """
    if input_norm is not None and not folds_input_norm(input_norm, x, spec, weights):
        raise ValueError(f"fused_cbam cannot fold input_norm={input_norm!r} into its passes for an input of shape "
                         f"{tuple(x.shape)} and dtype {x.dtype} (see folds_input_norm); apply it to x first")
    return checked_fused_cbam(x, spec, weights, residual, input_norm, inplace)


def checked_fused_cbam(x: Tensor, spec: FusedSpec, weights: tuple[Tensor | None, ...], residual: Tensor | None,
                       input_norm: nn.Module | None, inplace: bool) -> Tensor:
    """``fused_cbam`` where ``input_norm`` is known to fold (``CBAM.forward`` checked it)."""
    norm_weights = (None, None) if input_norm is None else (input_norm.weight, input_norm.bias)
    inputs = (x, residual, *norm_weights, *weights)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return FusedCBAM.apply(x, residual, spec, input_norm, *norm_weights, *weights)
    folded = None if input_norm is None else _input_norm(input_norm, x, *norm_weights)
    return _forward(x, residual, spec, weights, record=False, input_norm=folded, overwrite=inplace).out


class FusedCBAM(torch.autograd.Function):
    """``out = y * Ms(y)``, ``y = x * Mc(x)`` for ``x: (B, C, *spatial)``, or ``relu(out + residual)``
    with a residual; see the module docstring."""

    @staticmethod
    def forward(ctx, x, residual, spec: FusedSpec, input_norm, in_w, in_b, fc1_w, fc1_b, fc2_w, fc2_b, bn_w, bn_b,
                *chain):
        weights = (fc1_w, fc1_b, fc2_w, fc2_b, bn_w, bn_b, *chain)
        folded, statistics, ctx.input_norm = None, [], None
        if input_norm is not None:  # the folded BatchNorm: its map, and the statistics for its backward
            folded = _input_norm(input_norm, x, in_w, in_b)
            # running statistics are the module's buffers: a later forward may update them before this backward
            kept_statistics = (t if folded.batch else t.clone() for t in (folded.mean, folded.spread))
            statistics, ctx.input_norm = [folded.affine, *kept_statistics], (folded.batch, input_norm.eps)
        result = _forward(x, residual, spec, weights, record=True, input_norm=folded)
        kept = {kind: value for kind, value in result.pooled.items() if kind != "max"}  # maxima: gathered again
        ctx.spec, ctx.engine, ctx.ms_graph, ctx.pool_names = spec, result.engine, result.ms_graph, list(kept)
        ctx.has_residual = residual is not None  # then the output is saved too: the ReLU's mask
        ctx.batch_statistics = spec.norm is not None and spatial_gate.uses_batch_statistics(spec.norm)
        tail_output = [result.out] if ctx.has_residual else []
        ctx.save_for_backward(x, result.logits, result.mc, result.ms, *result.stats, *result.indices, *tail_output,
                              *statistics, *kept.values(), in_w, in_b, *weights)
        return result.out

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError("FusedCBAM has no double backward (create_graph=True); use CBAM(impl='reference')")
        x, logits, mc, ms, mean, speak, channel_index, spatial_index, *rest = ctx.saved_tensors
        spec, engine, spatial = ctx.spec, ctx.engine, x.shape[2:]
        flat = (*x.shape[:2], spatial.numel())
        x3, g3 = x.reshape(flat), grad.reshape(flat).contiguous()
        rectified = rest.pop(0).reshape(flat) if ctx.has_residual else None
        affine, in_mean, in_spread = [rest.pop(0) for _ in range(3)] if ctx.input_norm else (None, None, None)
        pooled = dict(zip(ctx.pool_names, rest))
        in_w, in_b, *weights = rest[len(pooled):]  # autograd fallbacks make their own leaves

        # On batch statistics the folded BatchNorm's backward is built from sums the passes take (centre:
        # its mean). g3 becomes the gradient through the tail's ReLU, which is also the residual's.
        centre = in_mean if ctx.input_norm and ctx.input_norm[0] else None
        d_ms, d_mc, g3, pooled["max"], gated = engine.gate_grads(g3, x3, mc, ms, rectified, channel_index, affine,
                                                                 centre)
        if _native_pools(engine, spec):
            channel = _NativeChannel(engine, spec, weights[:4], pooled, mc)
        else:
            channel = _AutogradChannel(spec, weights[:4], pooled)
        chain = [w for w in weights[6:] if w is not None]
        d_mean, d_speak, d_norm, d_chain = _spatial_backward(engine, ctx, (logits, ms, mean, speak), spatial,
                                                             weights[4:6], chain, d_ms)
        d_stats, centred = engine.stats_grad(x3, d_mean, d_speak, spatial_index, affine, centre)
        d_pooled, d_channel_weights = channel.grads(d_mc + d_stats)
        found = iter([*d_channel_weights, *d_norm, *d_chain])  # in the order of weights, Nones skipped
        d_residual = g3.view_as(x) if ctx.has_residual else None
        d_weights = [None if w is None else next(found) for w in weights]

        gradients = (g3, x3, mc, ms, d_mean, d_speak, spatial_index, d_pooled["avg"], d_pooled["max"], channel_index)
        if centre is not None:  # the BatchNorm's backward with CBAM's: one pass over x
            dx, d_in_w, d_in_b = engine.batch_norm_input_grad(*gradients, gated, centred, in_mean, in_spread, in_w)
            return (dx.view_as(x), d_residual, None, None, None if in_w is None else d_in_w,
                    None if in_b is None else d_in_b, *d_weights)
        dx = engine.input_grad(*gradients)
        if "lp" in pooled:
            norm = pooled["lp"].unsqueeze(2)
            dx.addcmul_(d_pooled["lp"].unsqueeze(2), torch.where(norm > 0, x3 / norm, 0))
        if "lse" in pooled:
            dx.addcmul_(d_pooled["lse"].unsqueeze(2), (x3 - pooled["lse"].unsqueeze(2)).exp())
        dx, d_in_w, d_in_b = dx.view_as(x), None, None
        if ctx.input_norm:  # dx is the folded BatchNorm's output gradient (running statistics): torch's backward
            dx, d_in_w, d_in_b = torch.ops.aten.native_batch_norm_backward(
                dx, x, in_w, in_mean, in_spread, None, None, False, ctx.input_norm[1],
                [True, in_w is not None, in_b is not None])
        return (dx, d_residual, None, None, d_in_w, d_in_b, *d_weights)


def _pool_coefficients(spec: FusedSpec) -> list[list[float]]:
    """The (mean, max) coefficients of each pool type: ``[avg coefficients, max coefficients]``."""
    return [list(column) for column in zip(*(NATIVE_POOLS[kind] for kind in spec.pool_types))]


class _NativeChannel:
    """The channel MLP's backward on the compiled engine (avg/max/mix pooling), given the forward's
    gate ``mc (B, C)``."""

    def __init__(self, engine, spec: FusedSpec, weights, pooled: dict[str, Tensor], mc: Tensor):
        fc1_w, fc1_b, fc2_w = (_contiguous(None if w is None else w.detach()) for w in weights[:3])
        self.engine, self.weights, self.pooled, self.hard = engine, weights, pooled, spec.gate == "hard-sigmoid"
        self.args = (*_pool_coefficients(spec), fc1_w, fc1_b, fc2_w)
        self.mc = mc

    def grads(self, d_mc: Tensor) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Gradients for the pooled vectors and the MLP weights that exist, given ``d_mc (B, C)``."""
        d_avg, d_max, *d_weights = self.engine.channel_backward(self.pooled["avg"], self.pooled["max"], *self.args,
                                                                self.mc, d_mc.contiguous(), self.hard)
        return {"avg": d_avg, "max": d_max}, [g for g, w in zip(d_weights, self.weights) if w is not None]


class _AutogradChannel:
    """The channel MLP's backward through autograd (any pool types, any engine), its graph recomputed."""

    def __init__(self, spec: FusedSpec, weights, pooled: dict[str, Tensor]):
        weights = [_leaf(w) for w in weights]
        self.weights = [w for w in weights if w is not None]
        self.leaves = {kind: _leaf(value) for kind, value in pooled.items()}
        with torch.enable_grad():
            self.graph = _channel_gate(self.leaves, spec, *weights)

    def grads(self, d_mc: Tensor) -> tuple[dict[str, Tensor], list[Tensor]]:
        found = _grads(self.graph, [*self.leaves.values(), *self.weights], d_mc)
        return dict(zip(self.leaves, (g.contiguous() for g in found))), found[len(self.leaves):]


def _grads(output: Tensor, inputs: list[Tensor], grad: Tensor) -> list[Tensor]:
    """``d output / d inputs`` contracted with ``grad``; zeros for inputs the output does not use.

    A recorded BatchNorm graph is kept (``retain_graph``) because the outer graph may be
    differentiated again with ``retain_graph=True``; it goes when the outer graph does.
    """
    found = torch.autograd.grad(output, inputs, grad, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, found)]
