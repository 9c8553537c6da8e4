"""The fused CBAM: a ``torch.autograd.Function`` with a hand-derived backward over few passes.

Only three things touch the full ``x: (B, C, S)`` (spatial dims flattened): the spatial pooling
(mean and max of each channel), the channel-wise mean and max of ``y = x * Mc`` (without
materialising ``y``), and the output ``x * Mc * Ms``. Everything between them works on ``(B, C)``
and ``(B, S)`` vectors: the shared MLP, the spatial conv, its BatchNorm and the gates.

The passes come from the engine ``engines.select(x)`` picks (torch ops, C++, Triton); the gates and
small steps compute in ``compute_dtype(x)``. The forward runs without autograd. Where the engine
has it (the C++ ``forward``: avg/max/mix pooling, one spatial conv weight, a BatchNorm that is an
affine map or none) the whole forward is one call that keeps each sample's ``x`` in cache between
its passes; otherwise the passes run one by one with the small steps in torch. The backward
(``backward_from``, shared by ``FusedCBAM`` and the ``torch.library`` ops of ``library.py``)
differentiates the small steps from the saved vectors by formula: the MLP and the spatial conv
(through autograd only for lp/lse pooling or a conv chain, recomputed), the spatial norm and
gate by formula (``spatial_gate``); only a norm that is no plain BatchNorm is recorded with autograd
in the forward (a norm may update running statistics, so it runs exactly once).

Saved for backward: ``x`` itself, the two arg-max index tensors ``(B, C)`` and ``(B, S)`` (int64), the
pooled ``(B, C)`` vectors but the maxima (read again from ``x`` at their indices while the backward's
first pass streams by), the channel gate ``(B, C)`` and four ``(B, S)`` vectors (gated mean and max,
spatial logits and gate): for fp32 and avg/max pooling ``1 + 6 / C + 4 / S`` times the input's bytes
(1.02 at 256x56x56, 1.08 at 2048x7x7) instead of the ~2x of the eager composition; bfloat16 read as
stored (the C++ engine) keeps its vectors in float32, 1.05 at 256x56x56 (its float32 copy made it 2.05).
With a residual the output is saved too (for the ReLU's backward); in a network it is the next layer's
input, which that layer saves anyway.

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

import contextlib
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .. import functional, hooks
from . import spatial_gate
from .batch_norm_state import BatchNormState
from .engines import ENGINES, Engine, engine_for, is_channels_last_view, widened_dtype

NATIVE_POOLS = {"avg": (1.0, 0.0), "max": (0.0, 1.0), "mix": (0.5, 0.5)}  # (mean, max) coefficients


@dataclass(frozen=True)
class FusedSpec:
    """What the fused forward needs besides tensors. ``norm`` is the spatial BatchNorm module, which
    runs as itself; its weight and bias must also be the ones in ``CbamWeights`` (so that the
    autograd function returns their gradients)."""

    pool_types: tuple[str, ...]
    gate: str
    spatial_pool: str
    norm: nn.Module | None

    @property
    def native_pools(self) -> bool:
        """Whether every pool type is a mix of mean and max (what the engines compute by themselves). Written
        so that dynamo traces it in every torch release (torch 2.11's cannot compare a set with dict keys)."""
        return all(pool in NATIVE_POOLS for pool in self.pool_types)


@dataclass(frozen=True)
class CbamWeights:
    """CBAM's parameters by name: the channel MLP ``fc1_weight (hidden, C)``, ``fc2_weight (C, hidden)``
    and their biases, the spatial norm's weight and bias (``None`` without them) and the spatial conv,
    one weight ``(1, I, *kernel)`` or a chain (``functional.spatial_conv``)."""

    fc1_weight: Tensor
    fc1_bias: Tensor | None
    fc2_weight: Tensor
    fc2_bias: Tensor | None
    norm_weight: Tensor | None
    norm_bias: Tensor | None
    conv: tuple[Tensor, ...]

    def flat(self) -> tuple[Tensor | None, ...]:
        """All of them in one tuple, as ``FusedCBAM.apply`` takes them (autograd wants them positional)."""
        return (self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias, self.norm_weight, self.norm_bias,
                *self.conv)

    @classmethod
    def from_flat(cls, flat) -> CbamWeights:
        fc1_weight, fc1_bias, fc2_weight, fc2_bias, norm_weight, norm_bias, *conv = flat
        return cls(fc1_weight, fc1_bias, fc2_weight, fc2_bias, norm_weight, norm_bias, tuple(conv))

    @property
    def mlp(self) -> tuple[Tensor | None, ...]:
        return self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias

    @property
    def norm(self) -> tuple[Tensor | None, Tensor | None]:
        return self.norm_weight, self.norm_bias

    def to(self, dtype: torch.dtype) -> CbamWeights:
        """The weights in ``dtype`` (the fused path's small steps compute in ``compute_dtype``); ``self``
        where they already are (the usual case: no new object, no call per weight)."""
        if all(w is None or w.dtype == dtype for w in self.flat()):
            return self
        return CbamWeights.from_flat([None if w is None else w.to(dtype) for w in self.flat()])


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the gates, pooled vectors and small steps for ``x``: float64 for float64, else
    float32 (bfloat16/float16 input accumulates in float32 and only the large outputs keep its dtype)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def autocast_off(device: str) -> contextlib.AbstractContextManager:
    """Autocast switched off on ``device`` for a block (the fused path computes in ``compute_dtype``); no
    context at all where it is not on (entering one costs more than the check)."""
    return torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext()


def _leaf(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().requires_grad_()


def _descriptors(x: Tensor, avg: Tensor, peak: Tensor, pool_types) -> dict[str, Tensor]:
    """The pooled ``(B, C)`` vectors the pool types need."""
    found = {"avg": avg, "max": peak}
    if "lp" in pool_types:
        found["lp"] = torch.linalg.vector_norm(x, 2, dim=2, dtype=avg.dtype)
    if "lse" in pool_types:
        found["lse"] = torch.logsumexp(x.to(avg.dtype), dim=2)
    return found


def _channel_gate(pooled: dict[str, Tensor], spec: FusedSpec, mlp) -> Tensor:
    fc1_weight, fc1_bias, fc2_weight, fc2_bias = mlp
    mix = (pooled["avg"] + pooled["max"]) / 2 if "mix" in spec.pool_types else None
    stacked = torch.stack([mix if kind == "mix" else pooled[kind] for kind in spec.pool_types])
    return functional.gate(functional.channel_mlp(stacked, fc1_weight, fc2_weight, fc1_bias, fc2_bias), spec.gate)


def _spatial_logits(mean: Tensor, peak: Tensor, spatial: torch.Size, spec: FusedSpec, conv) -> Tensor:
    """The spatial conv of the gated statistics ``(B, S)`` -> ``(B, S)``."""
    shape = (mean.shape[0], 1, *spatial)
    maps = functional.spatial_maps(mean.view(shape), peak.view(shape), spec.spatial_pool)
    return functional.spatial_conv(maps, conv).view(mean.shape)


def _spatial_gate(logits: Tensor, spatial: torch.Size, spec: FusedSpec, bn_w, bn_b) -> Tensor:
    """``gate(norm(logits))`` for ``logits (B, S)``, the module's BatchNorm logic and buffers with these
    weight/bias tensors."""
    if spec.norm is not None:
        shaped = logits.view(logits.shape[0], 1, *spatial)
        logits = torch.func.functional_call(spec.norm, {"weight": bn_w, "bias": bn_b}, (shaped,)).view(logits.shape)
    return functional.gate(logits, spec.gate)


@dataclass(frozen=True)
class _NormTensors:
    """A plain BatchNorm as the C++ engine takes it; all ``None`` (and eps 0) without a norm."""

    weight: Tensor | None = None
    bias: Tensor | None = None
    running_mean: Tensor | None = None
    running_var: Tensor | None = None
    eps: float = 0.0


def _norm_tensors(norm: nn.Module | None, weight, bias) -> _NormTensors:
    if norm is None:
        return _NormTensors()
    return _NormTensors(weight, bias, norm.running_mean, norm.running_var, norm.eps)


def _fixed_norm(spec: FusedSpec, weights: CbamWeights) -> _NormTensors | None:
    """The spatial norm where it is a fixed affine map (none, or a plain BatchNorm on running
    statistics); ``None`` where it uses batch statistics or is another kind of norm."""
    norm = spec.norm
    if norm is not None and (not spatial_gate.by_hand(norm) or spatial_gate.uses_batch_statistics(norm)):
        return None
    return _norm_tensors(norm, *weights.norm)


def _padded(dims) -> list[int]:
    """Spatial dims as ``[D, H, W]``: 1-D and 2-D padded with ones in front."""
    return [1] * (3 - len(dims)) + list(dims)


def _conv_geometry(weight: Tensor, spatial) -> tuple[Tensor, list[int], list[int]]:
    """One spatial conv weight ``(1, I, *kernel)`` as ``(I, kd, kh, kw)``, the spatial size as
    ``[D, H, W]`` and the kernel as ``[kd, kh, kw]``."""
    kernel = _padded(weight.shape[2:])
    return weight[0].contiguous().view(weight.shape[1], *kernel), _padded(spatial), kernel


def _native_applies(engine: Engine, spec: FusedSpec, weights: CbamWeights) -> bool:
    """Whether the engine computes this CBAM's whole forward in one call: avg/max/mix pooling and one
    spatial conv weight."""
    return engine.has("forward") and spec.native_pools and len(weights.conv) == 1


def _fold_applies(engine: Engine, spec: FusedSpec, weights: CbamWeights) -> bool:
    """Whether the engine folds a BatchNorm before CBAM into its passes for this CBAM (an engine with a
    one-call forward folds it there only)."""
    if not (engine.has("fold") and spec.native_pools):
        return False
    return _native_applies(engine, spec, weights) or not engine.has("forward")


def _native_forward(passes, x: Tensor, residual: Tensor | None, spec: FusedSpec, fixed_norm: _NormTensors | None,
                    weights: CbamWeights, input_norm: _InputNorm | None, overwrite: bool, indices: bool):
    """The engine's one-call forward; it stops at the spatial logits where the norm is not fixed
    (``fixed_norm`` is ``None``). A folded input BatchNorm's map is applied as the passes read ``x``
    (its pooling taken as computed, where it was); with ``overwrite`` the output is written over ``x``;
    without ``indices`` (no backward follows) the channel-wise arg-maxima are not tracked."""
    avg_coef, max_coef = _pool_coefficients(spec)
    return passes.forward(
        x=x, size=_padded(x.shape[2:]), avg_coef=avg_coef, max_coef=max_coef,
        fc1_w=weights.fc1_weight.contiguous(), fc1_b=_contiguous(weights.fc1_bias),
        fc2_w=weights.fc2_weight.contiguous(), fc2_b=_contiguous(weights.fc2_bias),
        conv_w=weights.conv[0].contiguous(), kernel=_padded(weights.conv[0].shape[2:]),
        hard=spec.gate == "hard-sigmoid", **_finishing(fixed_norm),
        residual=residual, input_affine=None if input_norm is None else input_norm.affine,
        overwrite=overwrite, pooled=[] if input_norm is None or input_norm.pooled is None else list(input_norm.pooled),
        indices=indices)


def _finishing(fixed_norm: _NormTensors | None) -> dict:
    """The keyword arguments by which an engine's forward step finishes the spatial gate through
    ``fixed_norm`` (``finish`` false, and the norm's unused, where it is ``None``)."""
    norm = fixed_norm or _NormTensors()
    return {"finish": fixed_norm is not None, "norm_w": norm.weight, "norm_b": norm.bias,
            "running_mean": norm.running_mean, "running_var": norm.running_var, "eps": norm.eps}


def folds_input_norm(norm, x: Tensor, spec: FusedSpec, weights: CbamWeights) -> bool:
    """Whether ``fused_cbam(x, ..., input_norm=norm)`` applies ``norm`` inside its passes (as they read
    ``x``, never writing ``norm(x)``): a plain BatchNorm, unwatched by hooks, matching ``x``'s
    channels and device, with parameters in the dtype the passes compute in (on batch statistics:
    more than one value per channel, else torch's own error), and an engine that folds it for this
    CBAM (``_fold_applies``)."""
    if type(norm) not in spatial_gate.PLAIN_NORMS or hooks.watched(norm) or x.numel() == 0:
        return False
    channels, dtype, device = x.shape[1:2], compute_dtype(x), x.device  # once: each is a new object per call
    tensors = [t for t in (norm.weight, norm.bias, norm.running_mean, norm.running_var) if t is not None]
    if any(t.shape != channels or t.dtype != dtype or t.device != device for t in tensors):
        return False
    if spatial_gate.uses_batch_statistics(norm) and x.numel() <= x.shape[1]:
        return False
    return _fold_applies(ENGINES[engine_for(x)], spec, weights)


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


def _input_norm(passes, state: BatchNormState, x: Tensor) -> _InputNorm:
    """The folded BatchNorm of ``state`` for ``x``; on batch statistics its running ones are updated as the
    module's forward would."""
    with torch.no_grad():
        if not state.batch:
            mean, var = state.running_mean, state.running_var
            affine = passes.batch_norm_affine(state.weight, state.bias, mean, var, state.eps)
            return _InputNorm(affine, mean, var, False, None)
        avg, peak, index, mean, var, invstd, affine = passes.batch_norm_pool(
            x.reshape(*x.shape[:2], -1), state.weight, state.bias, state.eps)
        state.update(mean, var, x.numel() // x.shape[1])
        return _InputNorm(affine, mean, invstd, True, (avg, peak, index))


def resolved(spec: FusedSpec) -> FusedSpec:
    """``spec`` for one forward: a plain spatial BatchNorm becomes its ``BatchNormState`` (counting the
    batch: once per forward; it is applied as part of CBAM, as its conv is, so hooks on it do not run);
    other norms stay modules, run as themselves and recorded for autograd."""
    if spatial_gate.is_plain(spec.norm):
        return replace(spec, norm=BatchNormState.step(spec.norm))
    return spec


def _spatial_grads(passes, mean: Tensor, speak: Tensor, spatial, spec: FusedSpec, conv, d_logits: Tensor):
    """Gradients for the gated statistics ``mean, speak (B, S)`` and the conv weights, given the
    spatial logits' gradient ``d_logits (B, S)``: on the engine for one conv weight, else autograd."""
    if len(conv) == 1:
        taps, size, kernel = _conv_geometry(conv[0], spatial)
        maps = torch.stack([mean, speak], 1) if spec.spatial_pool == "concat" else ((mean + speak) / 2).unsqueeze(1)
        d_maps, d_taps = passes.conv_backward(maps, d_logits.contiguous(), taps, size, kernel)
        d_stats = d_maps.unbind(1) if spec.spatial_pool == "concat" else [d_maps[:, 0] / 2] * 2
        return [*d_stats, d_taps.view_as(conv[0])]
    stats = [_leaf(mean), _leaf(speak)]
    leaves = [_leaf(w) for w in conv]
    with torch.enable_grad():
        return _grads(_spatial_logits(*stats, spatial, spec, leaves), [*stats, *leaves], d_logits)


def _spatial_backward(plan: _Plan, saved: dict[str, Tensor], weights: CbamWeights, d_ms: Tensor):
    """From the spatial gate's gradient ``d_ms (B, S)`` back to the gated statistics: ``d_mean,
    d_speak (B, S)``, the norm's weight/bias gradients (those that exist) and the conv weights'.

    One engine call for one conv weight and a norm that ``spatial_gate`` computes (where the engine
    has the small steps); else ``spatial_gate`` (or the recorded norm) and ``_spatial_grads``.
    """
    spec, norm, spatial, passes = plan.spec, plan.spec.norm, plan.spatial, plan.passes
    logits, ms, mean, speak = (saved[name] for name in ("logits", "ms", "mean", "speak"))
    if plan.engine.has("spatial-backward") and plan.ms_graph is None and len(weights.conv) == 1:
        tensors = _norm_tensors(norm, *weights.norm)
        d_mean, d_speak, d_conv, d_weight, d_bias = passes.spatial_backward(
            logits, ms, d_ms, mean, speak, weights.conv[0].contiguous(), _padded(spatial),
            _padded(weights.conv[0].shape[2:]), spec.gate == "hard-sigmoid", norm is not None, plan.batch_statistics,
            tensors.weight, tensors.running_mean, tensors.running_var, tensors.eps)
        d_norm = [g for g, w in zip((d_weight, d_bias), weights.norm) if w is not None]
        return d_mean, d_speak, d_norm, [d_conv]
    if plan.ms_graph is None:
        d_logits, *d_norm = spatial_gate.backward(logits, ms, d_ms, norm, spec.gate, plan.batch_statistics)
        d_norm = [g for g in d_norm if g is not None]
    else:
        d_logits, *d_norm = _grads(plan.ms_graph[1], plan.ms_graph[0], d_ms)
    d_mean, d_speak, *d_conv = _spatial_grads(passes, mean, speak, spatial, spec, weights.conv, d_logits)
    return d_mean.contiguous(), d_speak.contiguous(), d_norm, d_conv


def _in_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the call where it is already in ``dtype`` (one per weight, every backward)."""
    return t if t.dtype == dtype else t.to(dtype)


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _in_layout(engine: Engine, t: Tensor | None) -> Tensor | None:
    """``t`` as the engine reads it: itself where the engine takes its layout, else a contiguous copy."""
    if t is None or t.is_contiguous() or (engine.channels_last and is_channels_last_view(t)):
        return t
    return t.contiguous()


def _strides_of(t: Tensor, like: Tensor) -> Tensor:
    """``t`` viewed with ``like``'s strides where the two differ only along dimensions of size 1 (a gradient
    reshaped from another layout; torch's CPU BatchNorm backward misreads such strides), else ``t``."""
    if t.stride() != like.stride() and all(a == b or n == 1 for a, b, n in zip(t.stride(), like.stride(), t.shape)):
        return t.as_strided(t.shape, like.stride(), t.storage_offset())
    return t


def _laid_out_as(t: Tensor | None, x: Tensor) -> Tensor | None:
    """``t`` (shaped like ``x``) with ``x``'s strides, which the backward passes read every large tensor in
    (already the engine's layout): itself, a view, or a copy where ``t`` comes in another layout (a gradient,
    or under ``torch.compile`` a saved tensor)."""
    if t is None:
        return None
    t = _strides_of(t, x)
    return t if t.stride() == x.stride() else torch.empty_like(x).copy_(t)


@dataclass
class _Forward:
    """One forward's results, computed without autograd; ``ms_graph`` is ``([logits, *norm weights]
    leaves, ms)`` where a norm that ``spatial_gate`` does not compute was recorded. Vectors are in
    ``compute_dtype(x)``; ``out`` in ``x``'s dtype and layout."""

    out: Tensor
    engine: Engine
    passes: object  # the engine's module of passes
    pooled: dict[str, Tensor]
    mc: Tensor
    mean: Tensor
    speak: Tensor
    channel_index: Tensor
    spatial_index: Tensor
    logits: Tensor
    ms: Tensor
    ms_graph: tuple[list[Tensor], Tensor] | None


def _forward(x: Tensor, residual: Tensor | None, spec: FusedSpec, weights: CbamWeights, record: bool,
             selected: tuple[Engine, object], input_norm: _InputNorm | None = None,
             overwrite: bool = False) -> _Forward:
    """The fused forward, ``relu(cbam(x) + residual)`` with a residual. ``record``: a backward follows
    (the autograd graph of a norm that ``spatial_gate`` does not compute is kept, and the one-call C++
    forward tracks the arg-maxima, which only the backward reads). ``input_norm``, a folded input
    BatchNorm (only where ``folds_input_norm``); ``overwrite`` lets the one-call C++ forward write its
    output over ``x``. ``weights`` are in ``compute_dtype(x)``."""
    spatial = x.shape[2:]
    engine, passes = selected
    fixed_norm = _fixed_norm(spec, weights)
    affine = None if input_norm is None else input_norm.affine
    residual = _in_layout(engine, residual)
    with torch.no_grad():
        native = None
        if _native_applies(engine, spec, weights):
            native = _native_forward(passes, x, residual, spec, fixed_norm, weights, input_norm, overwrite, record)
            out, mc, ms, avg, peak, channel_index, mean, speak, spatial_index, logits = native
            ms = ms if fixed_norm is not None else None  # not finished: the norm and gate follow
            pooled = {"avg": avg, "max": peak}
        else:
            x3 = x.reshape(*x.shape[:2], spatial.numel())
            if input_norm is not None and input_norm.pooled is not None:  # taken with the batch statistics
                avg, peak, channel_index = input_norm.pooled
            else:
                avg, peak, channel_index = passes.pool(x3) if affine is None else passes.pool(x3, affine)
            pooled = _descriptors(x3, avg, peak, spec.pool_types)
            if spec.native_pools:
                mc = passes.channel_gate(avg, peak, *_pool_coefficients(spec), *map(_contiguous, weights.mlp),
                                         spec.gate == "hard-sigmoid")
            else:
                mc = _channel_gate(pooled, spec, weights.mlp).contiguous()
            stats = passes.gated_stats(x3, mc) if affine is None else passes.gated_stats(x3, mc, affine)
            mean, speak, spatial_index = stats
            if engine.has("spatial-logits") and len(weights.conv) == 1:  # with the gate where the norm is fixed
                logits, ms = passes.spatial_logits(
                    mean, speak, weights.conv[0].contiguous(), _padded(spatial), _padded(weights.conv[0].shape[2:]),
                    hard=spec.gate == "hard-sigmoid", **_finishing(fixed_norm))
            else:
                logits, ms = _spatial_logits(mean, speak, spatial, spec, weights.conv).contiguous(), None
    ms_graph = None
    if spatial_gate.by_hand(spec.norm):
        if ms is None:  # the norm (once: it may update running statistics), gate
            ms = _norm_and_gate(engine, passes, logits, spatial, spec)
    else:  # another norm: run once, recorded when a backward will follow
        with torch.set_grad_enabled(record):
            leaves = [logits.detach().requires_grad_(record), *(_leaf(w) for w in weights.norm if w is not None)]
            ms_graph = (leaves, _spatial_gate(leaves[0], spatial, spec, *_with_nones(leaves[1:], weights.norm)))
        ms = ms_graph[1].detach().contiguous()
    if native is None or fixed_norm is None:
        with torch.no_grad():
            out = passes.apply(x, mc, ms, residual, affine)
    return _Forward(out, engine, passes, pooled, mc, mean, speak, channel_index, spatial_index, logits, ms,
                    ms_graph if record else None)


def _norm_and_gate(engine: Engine, passes, logits: Tensor, spatial: torch.Size, spec: FusedSpec) -> Tensor:
    """``ms (B, S) = gate(norm(logits))`` for a norm ``spatial_gate`` computes, updating running statistics
    on batch statistics: in one engine call for a BatchNorm on more than one logit where the engine has it,
    else ``spatial_gate.forward`` (which also raises torch's error for a single logit)."""
    norm = spec.norm
    if engine.has("spatial-norm") and norm is not None and norm.batch and logits.numel() > 1:
        running = (norm.running_mean, norm.running_var) if norm.updates else (None, None)
        return passes.spatial_norm_gate(logits, norm.weight, norm.bias, *running, norm.eps, norm.factor,
                                        spec.gate == "hard-sigmoid")
    return spatial_gate.forward(logits, spatial, norm, spec.gate).contiguous()


def _with_nones(found: list[Tensor], like) -> list[Tensor | None]:
    """``found`` in the places of ``like`` that are not ``None``."""
    values = iter(found)
    return [None if t is None else next(values) for t in like]


def fused_cbam(x: Tensor, spec: FusedSpec, weights: CbamWeights, *, residual: Tensor | None = None,
               input_norm: nn.Module | None = None, inplace: bool = False) -> Tensor:
    """CBAM of ``x: (B, C, *spatial)`` on the fused passes. With ``residual`` (shaped like ``x``):
    ``relu(cbam(x) + residual)``, a residual block's tail, in the same output pass. ``input_norm``,
    where given, must pass ``folds_input_norm``: CBAM's input is then ``input_norm(x)``, computed as
    the passes read ``x`` (its running statistics updated as its forward would). ``inplace`` lets the
    output overwrite ``x`` where no gradient is recorded (the C++ forward in one call; elsewhere it is
    ignored).

    The gates and small steps compute in ``compute_dtype(x)``; the output has ``x``'s dtype. Where no
    gradient is wanted this skips the autograd function and what it saves.
    """
    if input_norm is not None and not folds_input_norm(input_norm, x, spec, weights):
        raise ValueError(f"fused_cbam cannot fold input_norm={input_norm!r} into its passes for an input of shape "
                         f"{tuple(x.shape)} and dtype {x.dtype} (see folds_input_norm); apply it to x first")
    return checked_fused_cbam(x, spec, weights, residual, input_norm, inplace)


def checked_fused_cbam(x: Tensor, spec: FusedSpec, weights: CbamWeights, residual: Tensor | None,
                       input_norm: nn.Module | None, inplace: bool) -> Tensor:
    """``fused_cbam`` where ``input_norm`` is known to fold (``CBAM.forward`` checked it). An input the engine
    widens (``engines.widened_dtype``) is computed on a wider copy (which the output may overwrite) and the
    output cast back to ``x``'s dtype, autograd carrying the gradients through both casts; except where the
    engine's passes read and write it as stored (``_reads_as_stored``)."""
    norm_weights = (None, None) if input_norm is None else (input_norm.weight, input_norm.bias)
    inputs = (x, residual, *norm_weights, *weights.flat())
    recorded = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    engine = ENGINES[engine_for(x)]
    if x.dtype in engine.widens and not _reads_as_stored(engine, x, residual, spec, weights, input_norm, recorded):
        wide = widened_dtype(x)
        widened_residual = None if residual is None else residual.to(wide)
        return checked_fused_cbam(x.to(wide), spec, weights, widened_residual, input_norm, True).to(x.dtype)
    if recorded:
        return FusedCBAM.apply(x, residual, spec, input_norm, engine, *norm_weights, *weights.flat())
    selected = (engine, engine.load())  # the engine for x, already looked up
    x = _in_layout(engine, x)
    input_state = None if input_norm is None else BatchNormState.step(input_norm)
    return forward_without_saving(x, residual, resolved(spec), weights, input_state, selected, overwrite=inplace)


def _reads_as_stored(engine: Engine, x: Tensor, residual: Tensor | None, spec: FusedSpec, weights: CbamWeights,
                     input_norm: nn.Module | None, recorded: bool) -> bool:
    """Whether ``engine`` (the one for ``x``) computes this CBAM, forward and backward, reading ``x`` (and a
    residual and a gradient of its dtype) as stored (``Engine.reads_as_stored``): where its one-call forward
    applies (avg/max/mix pooling, one spatial conv weight), whose passes are the ones that read it so. Not for
    the backward of a folded BatchNorm on running statistics: torch's, which ends it, would take CBAM's input
    gradient rounded to ``x``'s dtype (its weight's and bias's gradients off by that rounding; widened, float32)."""
    if recorded and input_norm is not None and not spatial_gate.uses_batch_statistics(input_norm):
        return False
    return (x.dtype in engine.reads_as_stored and (residual is None or residual.dtype == x.dtype)
            and _native_applies(engine, spec, weights))


def forward_without_saving(x: Tensor, residual: Tensor | None, spec: FusedSpec, weights: CbamWeights,
                           input_state: BatchNormState | None, selected: tuple[Engine, object],
                           overwrite: bool = False) -> Tensor:
    """The forward where no backward follows: the output alone (no arg-maxima tracked where the engine can
    leave them out, nothing saved); ``spec`` already ``resolved``, ``input_state`` the folded BatchNorm's
    state of this forward, ``x`` in the engine's layout."""
    folded = None if input_state is None else _input_norm(selected[1], input_state, x)
    return _forward(x, residual, spec, weights.to(compute_dtype(x)), record=False, selected=selected,
                    input_norm=folded, overwrite=overwrite).out


@dataclass
class _Plan:
    """What a backward needs of its forward besides tensors: the ``resolved`` spec, the engine that ran,
    the spatial size, the pooled vectors kept, whether a residual tail and a spatial norm on batch
    statistics were there, a folded BatchNorm's ``(batch statistics, eps)`` and a recorded norm graph."""

    spec: FusedSpec
    engine: Engine
    passes: object
    spatial: torch.Size
    pool_names: list[str]
    has_residual: bool
    batch_statistics: bool
    input_norm: tuple[bool, float] | None
    ms_graph: tuple[list[Tensor], Tensor] | None


def forward_saving(x: Tensor, residual: Tensor | None, spec: FusedSpec, weights: CbamWeights,
                   input_state: BatchNormState | None, selected: tuple[Engine, object]):
    """The forward for a backward to follow: ``(out, saved, plan)``, ``saved`` the tensors ``backward_from``
    takes by name (``None`` where absent), ``spec`` already ``resolved``, ``input_state`` the folded
    BatchNorm's state of this forward (its input weight saved as ``in_w``)."""
    folded, in_meta, saved = None, None, {}
    if input_state is not None:  # the folded BatchNorm: its map, and the statistics for its backward
        folded = _input_norm(selected[1], input_state, x)
        # running statistics are the module's buffers: a later forward may update them before this backward
        keep = (lambda t: t) if folded.batch else torch.clone
        saved.update(affine=folded.affine, in_mean=keep(folded.mean), in_spread=keep(folded.spread))
        in_meta = (folded.batch, input_state.eps)
    result = _forward(x, residual, spec, weights.to(compute_dtype(x)), record=True, selected=selected,
                      input_norm=folded)
    kept = {kind: value for kind, value in result.pooled.items() if kind != "max"}  # maxima: gathered again
    batch_statistics = spec.norm is not None and spatial_gate.uses_batch_statistics(spec.norm)
    plan = _Plan(spec, result.engine, result.passes, x.shape[2:], list(kept), residual is not None,
                 batch_statistics, in_meta, result.ms_graph)
    saved.update(x=x, logits=result.logits, mc=result.mc, ms=result.ms, mean=result.mean, speak=result.speak,
                 channel_index=result.channel_index, spatial_index=result.spatial_index,
                 in_w=None if input_state is None else input_state.weight,
                 rectified=result.out if residual is not None else None,  # the tail ReLU's mask
                 **{f"pooled_{kind}": value for kind, value in kept.items()})
    return result.out, saved, plan


def backward_from(grad: Tensor, saved: dict[str, Tensor | None], weights: CbamWeights, plan: _Plan):
    """The backward of ``forward_saving``: ``(dx, d_residual, d_in_weight, d_in_bias, d_weights)``, the
    last in ``weights.flat()``'s order, ``None`` where there is no such input."""
    computed = weights.to(saved["mc"].dtype)
    spec, passes = plan.spec, plan.passes
    x, mc, ms = saved["x"], saved["mc"], saved["ms"]
    grad, rectified = _laid_out_as(grad, x), _laid_out_as(saved["rectified"], x)
    flat = (*x.shape[:2], plan.spatial.numel())
    x3, g3 = x.reshape(flat), grad.reshape(flat)
    rectified = None if rectified is None else rectified.reshape(flat)
    affine, in_mean, in_spread = (saved.get(name) for name in ("affine", "in_mean", "in_spread"))
    pooled = {kind: saved[f"pooled_{kind}"] for kind in plan.pool_names}

    # On batch statistics the folded BatchNorm's backward is built from sums the passes take (centre:
    # its mean). g3 becomes the gradient through the tail's ReLU, which is also the residual's.
    centre = in_mean if plan.input_norm and plan.input_norm[0] else None
    d_ms, d_mc, g3, pooled["max"], gated = passes.gate_grads(g3, x3, mc, ms, rectified, saved["channel_index"],
                                                             affine, centre)
    if spec.native_pools:
        channel = _NativeChannel(passes, spec, computed.mlp, pooled, mc)
    else:
        channel = _AutogradChannel(spec, computed.mlp, pooled)
    d_mean, d_speak, d_norm, d_conv = _spatial_backward(plan, saved, computed, d_ms)
    d_stats, centred = passes.stats_grad(x3, d_mean, d_speak, saved["spatial_index"], affine, centre)
    d_pooled, d_mlp = channel.grads(d_mc + d_stats)
    found = iter([*d_mlp, *d_norm, *d_conv])  # in the order of weights, Nones skipped
    d_residual = g3.view_as(x) if plan.has_residual else None
    d_weights = [None if w is None else _in_dtype(next(found), w.dtype) for w in weights.flat()]
    in_w = saved["in_w"]

    gradients = (g3, x3, mc, ms, d_mean, d_speak, saved["spatial_index"], d_pooled["avg"], d_pooled["max"],
                 saved["channel_index"])
    if centre is not None:  # the BatchNorm's backward with CBAM's: one pass over x
        dx, d_in_w, d_in_b = passes.batch_norm_input_grad(*gradients, gated, centred, in_mean, in_spread, in_w)
        # torch's BatchNorm backward (the torch engine's) returns a contiguous dx for a channels-last x, and a
        # compiled graph asserts the layout the op's fake kernel promised: x's
        return _laid_out_as(dx.view_as(x), x), d_residual, d_in_w, d_in_b, d_weights
    dx = passes.input_grad(*gradients)
    if "lp" in pooled:
        norm = pooled["lp"].unsqueeze(2)
        dx.addcmul_(d_pooled["lp"].unsqueeze(2), torch.where(norm > 0, x3 / norm, 0))
    if "lse" in pooled:
        dx.addcmul_(d_pooled["lse"].unsqueeze(2), (x3 - pooled["lse"].unsqueeze(2)).exp())
    dx, d_in_w, d_in_b = _strides_of(dx.view_as(x), x), None, None
    if plan.input_norm:  # dx is the folded BatchNorm's output gradient (running statistics): torch's backward,
        # given empty saved statistics (CUDA's channels-last kernel asserts they are defined, then reads the running
        # ones; None failed there on an H100)
        unsaved = in_mean.new_empty(0)
        dx, d_in_w, d_in_b = torch.ops.aten.native_batch_norm_backward(
            dx, x, in_w, in_mean, in_spread, unsaved, unsaved, False, plan.input_norm[1], [True, True, True])
    return dx, d_residual, d_in_w, d_in_b, d_weights


class FusedCBAM(torch.autograd.Function):
    """``out = y * Ms(y)``, ``y = x * Mc(x)`` for ``x: (B, C, *spatial)``, or ``relu(out + residual)``
    with a residual, on the passes of ``engine`` (the one for ``x``); see the module docstring. ``weights``
    are ``CbamWeights.flat()``."""

    @staticmethod
    def forward(ctx, x, residual, spec: FusedSpec, input_norm, engine: Engine, in_w, in_b, *flat_weights):
        selected = (engine, engine.load())
        x = _in_layout(engine, x)
        input_state = None if input_norm is None else BatchNormState.step(input_norm)
        out, saved, ctx.plan = forward_saving(x, residual, resolved(spec), CbamWeights.from_flat(flat_weights),
                                              input_state, selected)
        ctx.names, ctx.has_in = list(saved), (in_w is not None, in_b is not None)
        ctx.save_for_backward(*saved.values(), *flat_weights)
        return out

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError("FusedCBAM has no double backward (create_graph=True); use CBAM(impl='reference')")
        tensors = ctx.saved_tensors
        saved = dict(zip(ctx.names, tensors[:len(ctx.names)]))
        weights = CbamWeights.from_flat(tensors[len(ctx.names):])
        with autocast_off(grad.device.type):  # a backward called under autocast: as the forward
            dx, d_residual, d_in_w, d_in_b, d_weights = backward_from(grad, saved, weights, ctx.plan)
        d_in_w, d_in_b = (g if present else None for g, present in zip((d_in_w, d_in_b), ctx.has_in))
        return (dx, d_residual, None, None, None, d_in_w, d_in_b, *d_weights)


def _pool_coefficients(spec: FusedSpec) -> list[list[float]]:
    """The (mean, max) coefficients of each pool type: ``[avg coefficients, max coefficients]``."""
    return [list(column) for column in zip(*(NATIVE_POOLS[kind] for kind in spec.pool_types))]


class _NativeChannel:
    """The channel MLP's backward on an engine with the small steps (avg/max/mix pooling), given the
    forward's gate ``mc (B, C)``."""

    def __init__(self, passes, spec: FusedSpec, mlp, pooled: dict[str, Tensor], mc: Tensor):
        fc1_w, fc1_b, fc2_w = (_contiguous(None if w is None else w.detach()) for w in mlp[:3])
        self.passes, self.mlp, self.pooled, self.hard = passes, mlp, pooled, spec.gate == "hard-sigmoid"
        self.args = (*_pool_coefficients(spec), fc1_w, fc1_b, fc2_w)
        self.mc = mc

    def grads(self, d_mc: Tensor) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Gradients for the pooled vectors and the MLP weights that exist, given ``d_mc (B, C)``."""
        d_avg, d_max, *d_mlp = self.passes.channel_backward(self.pooled["avg"], self.pooled["max"], *self.args,
                                                            self.mc, d_mc.contiguous(), self.hard)
        return {"avg": d_avg, "max": d_max}, [g for g, w in zip(d_mlp, self.mlp) if w is not None]


class _AutogradChannel:
    """The channel MLP's backward through autograd (any pool types, any engine), its graph recomputed."""

    def __init__(self, spec: FusedSpec, mlp, pooled: dict[str, Tensor]):
        mlp = [_leaf(w) for w in mlp]
        self.weights = [w for w in mlp if w is not None]
        self.leaves = {kind: _leaf(value) for kind, value in pooled.items()}
        with torch.enable_grad():
            self.graph = _channel_gate(self.leaves, spec, mlp)

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
