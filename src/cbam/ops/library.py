"""The fused CBAM as ``torch.library`` custom ops, so that ``torch.compile(..., fullgraph=True)`` keeps its
kernels: ``cbam::fused_forward`` returns the output, the tensors its backward needs and the new
running statistics of the BatchNorms it applies; ``cbam::fused_backward`` returns the gradients;
``cbam::fused_inference``, for a call that records no gradient, returns the output and the running
statistics only, computed as eager code computes them without autograd (no arg-maxima, nothing saved).
All are functional (no input is mutated: ``fused_cbam_op`` copies the new running statistics into the
BatchNorms' buffers, as traced code), with fake implementations for tracing and the backward
registered with ``register_autograd``. Eager code runs the same ``forward_saving`` / ``backward_from``
through ``FusedCBAM``; the ops are what a compiled graph calls.

They cover (``covers``) avg/max/mix pooling, one spatial conv weight, no spatial norm or a plain
BatchNorm, the residual tail and the folded BatchNorm before CBAM; a CBAM with
anything else runs the reference under compile (``impl="auto"``).
"""

from __future__ import annotations

import hashlib
import math
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from . import engines, fused, spatial_gate
from .batch_norm_state import BatchNormState
from .engines import is_channels_last_view, select
from .fused import (
    CbamWeights,
    FusedSpec,
    _in_layout,
    _Plan,
    autocast_off,
    backward_from,
    compute_dtype,
    forward_saving,
    forward_without_saving,
)

SAVED = ("logits", "mc", "ms", "mean", "speak", "channel_index", "spatial_index", "affine", "in_mean", "in_spread",
         "pooled_avg")
NONE, RUNNING, BATCH = 0, 1, 2  # how a BatchNorm normalises: absent, on running statistics, on the batch's


def covers(spec: FusedSpec, weights: CbamWeights) -> bool:
    """Whether the ops compute this CBAM (see the module docstring)."""
    plain_norm = spec.norm is None or spatial_gate.is_plain(spec.norm)
    return spec.native_pools and len(weights.conv) == 1 and plain_norm


def _tensors(state: BatchNormState | None) -> list[Tensor | None]:
    return [None] * 5 if state is None else [state.weight, state.bias, state.running_mean, state.running_var,
                                             state.count]


def _filled(tensors: list[Tensor | None], like: Tensor) -> list[Tensor]:
    """``None`` as an empty tensor: the ops take plain tensor lists (autograd pairs their gradients by
    position)."""
    return [like.new_empty(0) if t is None else t for t in tensors]


def _holes(tensors: list[Tensor]) -> list[Tensor | None]:
    """Empty tensors back to ``None``."""
    return [None if t.numel() == 0 else t for t in tensors]


def _mode(state: BatchNormState | None) -> int:
    return NONE if state is None else BATCH if state.batch else RUNNING


def _state(tensors: list[Tensor | None], mode: int, momentum: float, eps: float) -> BatchNormState | None:
    """A BatchNorm's state from the ops' arguments, on copies of running statistics it would update."""
    if mode == NONE:
        return None
    weight, bias, mean, var, count = tensors
    return BatchNormState(weight, bias, mean, var, eps, momentum, mode == BATCH, count).detached_copy()


def _empty(like: Tensor) -> Tensor:
    """A placeholder result: empty, in ``like``'s dtype (the fake kernels say the same)."""
    return like.new_empty(0)


def _as_read(x: Tensor) -> Tensor:
    """``x`` in the layout the engines read it in, which their large results keep: itself where contiguous or
    channels-last, else contiguous (every engine falls back to the torch engine, which reads both)."""
    return x if x.is_contiguous() or is_channels_last_view(x) else x.contiguous()


def _spec(pool_types: str, gate: str, spatial_pool: str, norm: BatchNormState | None) -> FusedSpec:
    return FusedSpec(tuple(pool_types.split(",")), gate, spatial_pool, norm)


# The engines read contiguous and channels-last tensors (and copy any other layout), so inductor may pass the
# ops whatever layout it gives their inputs: without the tag it would copy them back to the strides they had
# when traced (on the CPU, inductor runs convolutions channels-last: two copies per CBAM).
READS_ANY_LAYOUT = (torch.Tag.flexible_layout,)


def _source_digest() -> str:
    """A digest of the source that defines the ops (their fake kernels, layouts and results)."""
    sources = (sys.modules[__name__], fused, engines)
    return hashlib.sha256(b"".join(Path(module.__file__).read_bytes() for module in sources)).hexdigest()[:16]


# Every call passes SOURCE as its last argument, a constant in the traced graph. Inductor keeps compiled graphs on
# disk keyed by the graph, not by what an op's fake kernel or tags say: without it, a graph compiled around another
# version of these ops (other result strides, other layout constraints) would be reused after an upgrade. The ops
# refuse a call that carries another version's digest (a graph saved some other way).
SOURCE = _source_digest()


def _check_source(source: str) -> None:
    if source != SOURCE:
        raise RuntimeError(f"this graph was compiled around another version of cbam's ops (source {source!r}, "
                           f"installed {SOURCE!r}): compile it again")


# The schemas are written out: torch before 2.5 cannot infer one from postponed (string) annotations.
FORWARD_SCHEMA = ("(Tensor x, Tensor? residual, Tensor[] weights, Tensor[] norm, Tensor[] input_norm, str pool_types, "
                  "str gate, str spatial_pool, int norm_mode, float norm_factor, float norm_eps, int input_mode, "
                  "float input_factor, float input_eps, str source) -> Tensor[]")  # both forward ops'


def _forward_inputs(x: Tensor, weights: list[Tensor], norm: list[Tensor], input_norm: list[Tensor], norm_mode: int,
                    norm_factor: float, norm_eps: float, input_mode: int, input_factor: float, input_eps: float):
    """A forward op's arguments as the fused path takes them: ``(x in its engine's layout, CbamWeights, the
    spatial norm's state, the folded norm's state, the selected engine)``, the states on copies of the running
    statistics they update."""
    selected = select(x)
    return (_in_layout(selected[0], x), CbamWeights.from_flat(_holes(weights)),
            _state(_holes(norm), norm_mode, norm_factor, norm_eps),
            _state(_holes(input_norm), input_mode, input_factor, input_eps), selected)


@torch.library.custom_op("cbam::fused_forward", mutates_args=(), schema=FORWARD_SCHEMA, tags=READS_ANY_LAYOUT)
def fused_forward(x: Tensor, residual: Tensor | None, weights: list[Tensor], norm: list[Tensor],
                  input_norm: list[Tensor], pool_types: str, gate: str, spatial_pool: str, norm_mode: int,
                  norm_factor: float, norm_eps: float, input_mode: int, input_factor: float,
                  input_eps: float, source: str) -> list[Tensor]:
    """``[out, norm's new running mean and var, input norm's new running mean and var, *SAVED]`` for
    ``x: (B, C, *spatial)``; ``weights`` as ``CbamWeights.flat()``, each norm ``[weight, bias,
    running_mean, running_var, count]`` with its ``factor``, which is ``1 / count`` where ``count`` (its
    ``num_batches_tracked``, read when the op runs: a cumulative average) is given; empty tensors where an
    argument or a result does not exist."""
    _check_source(source)
    inputs = [x, *(() if residual is None else (residual,)), *weights, *norm, *input_norm]
    x, cbam_weights, norm_state, input_state, selected = _forward_inputs(
        x, weights, norm, input_norm, norm_mode, norm_factor, norm_eps, input_mode, input_factor, input_eps)
    # a compiled graph may call the op inside an autocast region: compute in compute_dtype(x), as the fake says
    with autocast_off(x.device.type):
        out, saved, _ = forward_saving(x, residual, _spec(pool_types, gate, spatial_pool, norm_state), cbam_weights,
                                       input_state, selected)
    return _unshared([out, *_statistics(x, norm_state, input_state),
                      *(_empty(x) if saved.get(name) is None else saved[name] for name in SAVED)], inputs)


def _statistics(x: Tensor, *states: BatchNormState | None) -> list[Tensor]:
    """Each state's new running mean and variance where it updates them, else two empty tensors."""
    found = []
    for state in states:
        updated = state is not None and state.updates
        found += [state.running_mean, state.running_var] if updated else [_empty(x), _empty(x)]
    return found


@fused_forward.register_fake
def _(x, residual, weights, norm, input_norm, pool_types, gate, spatial_pool, norm_mode, norm_factor, norm_eps,
      input_mode, input_factor, input_eps, source):
    batch, channels, positions = x.shape[0], x.shape[1], math.prod(x.shape[2:])  # x[0, 0] fails on B = 0
    dtype = compute_dtype(x)
    norm, input_norm = _holes(norm), _holes(input_norm)

    def vector(*shape, kind=dtype):
        return x.new_empty(shape, dtype=kind)

    statistics = _fake_statistics(x, (norm, norm_mode), (input_norm, input_mode))
    folded = [vector(2, channels), vector(channels), vector(channels)] if input_mode != NONE else [_empty(x)] * 3
    folded = [torch.empty_like(t) for t in folded]  # distinct tensors, as the real op returns
    indices = [vector(batch, channels, kind=torch.int64), vector(batch, positions, kind=torch.int64)]
    per_position = [vector(batch, positions) for _ in range(4)]
    return [torch.empty_like(_as_read(x)), *statistics, *per_position[:1], vector(batch, channels), *per_position[1:],
            *indices, *folded, vector(batch, channels)]


def _fake_statistics(x: Tensor, *norms: tuple[list[Tensor | None], int]) -> list[Tensor]:
    """``_statistics``' fake: for each ``(norm tensors, mode)``, new running statistics where it updates them."""
    found = []
    for tensors, mode in norms:
        updated = mode == BATCH and tensors[2] is not None
        found += [torch.empty_like(tensors[2]), torch.empty_like(tensors[3])] if updated else [_empty(x), _empty(x)]
    return found


@torch.library.custom_op("cbam::fused_inference", mutates_args=(), schema=FORWARD_SCHEMA, tags=READS_ANY_LAYOUT)
def fused_inference(x: Tensor, residual: Tensor | None, weights: list[Tensor], norm: list[Tensor],
                    input_norm: list[Tensor], pool_types: str, gate: str, spatial_pool: str, norm_mode: int,
                    norm_factor: float, norm_eps: float, input_mode: int, input_factor: float,
                    input_eps: float, source: str) -> list[Tensor]:
    """``fused_forward``'s first five results (``[out, norm's new running mean and var, input norm's]``) for a
    call that records no gradient: what ``fused_cbam`` computes without autograd, nothing kept for a backward."""
    _check_source(source)
    inputs = [x, *(() if residual is None else (residual,)), *weights, *norm, *input_norm]
    x, cbam_weights, norm_state, input_state, selected = _forward_inputs(
        x, weights, norm, input_norm, norm_mode, norm_factor, norm_eps, input_mode, input_factor, input_eps)
    with autocast_off(x.device.type):
        out = forward_without_saving(x, residual, _spec(pool_types, gate, spatial_pool, norm_state), cbam_weights,
                                     input_state, selected)
    return _unshared([out, *_statistics(x, norm_state, input_state)], inputs)


@fused_inference.register_fake
def _(x, residual, weights, norm, input_norm, pool_types, gate, spatial_pool, norm_mode, norm_factor, norm_eps,
      input_mode, input_factor, input_eps, source):
    statistics = _fake_statistics(x, (_holes(norm), norm_mode), (_holes(input_norm), input_mode))
    return [torch.empty_like(_as_read(x)), *statistics]


@torch.library.custom_op("cbam::fused_backward", mutates_args=(), tags=READS_ANY_LAYOUT, schema=(
    "(Tensor grad, Tensor x, Tensor? rectified, Tensor[] saved, Tensor[] weights, Tensor[] norm, Tensor? input_weight, "
    "str pool_types, str gate, str spatial_pool, int norm_mode, float norm_eps, int input_mode, float input_eps, "
    "str source) "
    "-> Tensor[]"))
def fused_backward(grad: Tensor, x: Tensor, rectified: Tensor | None, saved: list[Tensor], weights: list[Tensor],
                   norm: list[Tensor], input_weight: Tensor | None, pool_types: str, gate: str,
                   spatial_pool: str, norm_mode: int, norm_eps: float, input_mode: int,
                   input_eps: float, source: str) -> list[Tensor]:
    """``[dx, d_residual, d_input_weight, d_input_bias, *d_weights]`` of ``fused_forward`` (``saved``: its
    ``SAVED`` results); empty tensors where there is no such input."""
    _check_source(source)
    engine, passes = select(x)
    x = _in_layout(engine, x)
    weights, norm = _holes(weights), _holes(norm)
    norm_state = _state(norm, norm_mode, 0.0, norm_eps)
    plan = _Plan(_spec(pool_types, gate, spatial_pool, norm_state), engine, passes, x.shape[2:], ["avg"],
                 rectified is not None, norm_mode == BATCH, None if input_mode == NONE else (input_mode == BATCH,
                                                                                                input_eps), None)
    named = {name: (None if value.numel() == 0 and name in ("affine", "in_mean", "in_spread") else value)
             for name, value in zip(SAVED, saved)}
    named.update(x=x, rectified=rectified, in_w=input_weight)
    with autocast_off(x.device.type):
        dx, d_residual, d_in_w, d_in_b, d_weights = backward_from(grad, named, CbamWeights.from_flat(weights), plan)
    present = input_mode != NONE and input_weight is not None
    d_weights = [_empty(x) if g is None else g.contiguous() for g in d_weights]  # as the fake says
    return _unshared([dx, _empty(x) if d_residual is None else d_residual, d_in_w if present else _empty(x),
                      d_in_b if present else _empty(x), *d_weights], [grad])


def _unshared(outputs: list[Tensor], inputs: list[Tensor]) -> list[Tensor]:
    """``outputs`` with a copy wherever one shares memory with an input or an earlier output (an op's
    results must not alias; the passes may hand back the incoming gradient, or two views of one
    tensor)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs}
    found = []
    for t in outputs:
        pointer = t.untyped_storage().data_ptr()
        found.append(t.clone() if pointer and pointer in seen else t)
        seen.add(pointer)
    return found


@fused_backward.register_fake
def _(grad, x, rectified, saved, weights, norm, input_weight, pool_types, gate, spatial_pool, norm_mode, norm_eps,
      input_mode, input_eps, source):
    folded = input_mode != NONE and input_weight is not None
    read = _as_read(x)
    return [torch.empty_like(read), x.new_empty(0) if rectified is None else torch.empty_like(read),
            *(torch.empty_like(input_weight) if folded else x.new_empty(0) for _ in range(2)),
            *(w.new_empty(w.shape) for w in weights)]  # contiguous as the real ones, whatever layout inductor gave w


def _setup_context(ctx, inputs, output):
    (x, residual, weights, norm, input_norm, pool_types, gate, spatial_pool, norm_mode, _, norm_eps, input_mode, _,
     input_eps, source) = inputs
    # a BatchNorm on running statistics needs them in the backward; on batch statistics they are updated
    # right after this forward, so they are not saved (autograd would see them modified)
    kept_norm = norm if norm_mode == RUNNING else [*norm[:2], *(x.new_empty(0) for _ in norm[2:])]
    ctx.options = (pool_types, gate, spatial_pool, norm_mode, norm_eps, input_mode, input_eps, source)
    ctx.has_residual, ctx.count = residual is not None, (len(weights), len(norm))
    ctx.input_affine = (input_norm[0].numel() > 0, input_norm[1].numel() > 0)
    ctx.save_for_backward(x, output[0] if residual is not None else None, *output[5:], *weights, *kept_norm,
                          input_norm[0] if input_norm[0].numel() else None)


def _backward(ctx, grads):
    x, rectified, *rest = ctx.saved_tensors
    weight_count, norm_count = ctx.count
    saved, rest = rest[:len(SAVED)], rest[len(SAVED):]
    weights, norm, input_weight = rest[:weight_count], rest[weight_count:weight_count + norm_count], rest[-1]
    found = torch.ops.cbam.fused_backward(grads[0], x, rectified, saved, weights, norm, input_weight, *ctx.options)
    dx, d_residual, d_in_w, d_in_b, *d_weights = found
    d_input_norm = [d_in_w if ctx.input_affine[0] else None, d_in_b if ctx.input_affine[1] else None, None, None,
                    None]
    d_weights = [_present(g, w) for g, w in zip(d_weights, weights)]
    # the spatial norm's weight and bias come twice (in weights and in norm): their gradients once
    return (dx, d_residual if ctx.has_residual else None, d_weights, [None] * norm_count, d_input_norm,
            None, None, None, None, None, None, None, None, None, None)


def _present(grad: Tensor, weight: Tensor) -> Tensor | None:
    return None if weight.numel() == 0 else grad


fused_forward.register_autograd(_backward, setup_context=_setup_context)


def fused_cbam_op(x: Tensor, residual: Tensor | None, spec: FusedSpec, weights: CbamWeights,
                  input_norm: nn.Module | None) -> Tensor:
    """``fused_cbam`` through the custom ops (where ``covers``; ``input_norm`` where it folds): what
    ``CBAM.forward`` calls under ``torch.compile``, ``fused_inference`` where no gradient is recorded.
    Counts each BatchNorm's batch and copies its new running statistics into its buffers as its own
    forward would."""
    norm_state = None if spec.norm is None else BatchNormState.step(spec.norm)
    input_state = None if input_norm is None else BatchNormState.step(input_norm)
    norm_weights = (None, None) if input_norm is None else (input_norm.weight, input_norm.bias)
    recorded = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, residual, *norm_weights, *weights.flat()))
    op = torch.ops.cbam.fused_forward if recorded else torch.ops.cbam.fused_inference
    results = op(
        x, residual, _filled(list(weights.flat()), x), _filled(_tensors(norm_state), x),
        _filled(_tensors(input_state), x), ",".join(spec.pool_types),
        spec.gate, spec.spatial_pool, _mode(norm_state), norm_state.momentum if norm_state else 0.0,
        norm_state.eps if norm_state else 0.0, _mode(input_state), input_state.momentum if input_state else 0.0,
        input_state.eps if input_state else 0.0, SOURCE)
    with torch.no_grad():
        for state, mean, var in ((norm_state, *results[1:3]), (input_state, *results[3:5])):
            if state is not None and state.updates:
                state.running_mean.copy_(mean)
                state.running_var.copy_(var)
    return results[0]
