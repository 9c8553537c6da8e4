"""``cost``: parameters and FLOPs of one forward pass, per module, and the attention modules' share.

Convention: a multiply-add counts 2 FLOPs. Convolutions and matrix products are counted by
``torch.utils.flop_counter.FlopCounterMode`` (``2 * macs``; biases not counted) everywhere in the
model. Inside attention modules the rest of the work is counted too, one FLOP per element:
element-wise ops (the gates' sigmoid, the multiplications by the gates, ReLU, ...) per output
element, reductions (the avg/max pooling, the sum over pooled descriptors) per input element,
BatchNorm 2 per element (scale and shift); data movement (view, cat, stack, pad) counts 0. Outside
attention modules only convolutions and matrix products count, as in the usual model tables.

The CBAM paper (Woo et al., 2018, Table 1) reports GFLOPs that count multiply-adds of the
convolutions and fully connected layers (ResNet-50 at 224x224: 4.12 G): compare with
``multiply_adds`` (``= conv_matmul_flops / 2``), not with ``flops``.

Attention modules are counted as their reference composition (``CBAM(impl="reference")``, switched
for the counting pass and back), so the numbers describe the architecture rather than the kernel
that runs: a fused implementation does the same arithmetic in fewer passes over memory.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .. import nn as cbam_nn
from ..tables import format_count, format_table

OUR_ATTENTION = tuple(cls for cls in (getattr(cbam_nn, name) for name in cbam_nn.__all__)
                      if isinstance(cls, type) and issubclass(cls, nn.Module))
TIMM_ATTENTION = ("CbamModule", "LightCbamModule", "ChannelAttn", "LightChannelAttn", "SpatialAttn",
                  "LightSpatialAttn")  # timm.layers.cbam, matched by name so that timm is never imported

aten = torch.ops.aten
_NORMALISATIONS = {aten.native_batch_norm.default, aten._native_batch_norm_legit.default,
                   aten._native_batch_norm_legit.no_stats, aten._native_batch_norm_legit_no_training.default}


def is_attention(module: nn.Module) -> bool:
    """Whether ``module`` is a CBAM-family module: any module class of ``cbam.nn``, or timm's CBAM layers."""
    cls = type(module)
    return isinstance(module, OUR_ATTENTION) or (cls.__module__.startswith("timm.") and cls.__name__ in TIMM_ATTENTION)


# torch before 2.10 has no reduction tag: there, the reductions by name
_REDUCTION_TAG = getattr(torch.Tag, "reduction", None)
_REDUCTIONS = {aten.sum, aten.mean, aten.amax, aten.amin, aten.max, aten.min, aten.prod, aten.var, aten.std,
               aten.argmax, aten.argmin, aten.logsumexp, aten.linalg_vector_norm}


def _is_reduction(func) -> bool:
    if _REDUCTION_TAG is not None:
        return _REDUCTION_TAG in func.tags
    return func.overloadpacket in _REDUCTIONS


class _ElementwiseCounter(TorchDispatchMode):
    """Counts element-wise, reduction and normalisation FLOPs while ``active`` is above 0."""

    def __init__(self) -> None:
        super().__init__()
        self.active = 0
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.active:
            first_out = out[0] if isinstance(out, (tuple, list)) else out
            if func in _NORMALISATIONS:
                self.total += 2 * first_out.numel()
            elif torch.Tag.pointwise in func.tags and isinstance(first_out, torch.Tensor):
                self.total += first_out.numel()
            elif _is_reduction(func) and args and isinstance(args[0], torch.Tensor):
                self.total += args[0].numel()
        return out


@dataclass
class ModuleCost:
    """One module: its parameters (children included) and the FLOPs of all its calls (children included)."""

    path: str
    type: str
    params: int
    flops: int
    calls: int
    attention: bool


@dataclass
class CostReport:
    """``cost``'s result: totals, the attention modules' part, and ``modules`` (one ``ModuleCost`` each).

    ``flops = conv_matmul_flops + attention_elementwise_flops``; ``attention_flops`` is all the work
    inside attention modules (their MLP and conv included); ``multiply_adds`` is the paper's unit.
    """

    params: int
    flops: int
    conv_matmul_flops: int
    attention_params: int
    attention_flops: int
    modules: list[ModuleCost]

    @property
    def multiply_adds(self) -> int:
        return self.conv_matmul_flops // 2

    def as_dict(self) -> dict:
        return {**asdict(self), "multiply_adds": self.multiply_adds}

    def table(self, depth: int = 2) -> str:
        """The per-module table for paths with at most ``depth`` dots-separated parts (0: the model only)."""
        rows = [m for m in self.modules if (m.path.count(".") + 1 if m.path else 0) <= depth]
        return format_table(
            ["module", "type", "params", "FLOPs", "% FLOPs", "attention"],
            [[m.path or "(model)", m.type, format_count(m.params), format_count(m.flops),
              f"{100 * m.flops / self.flops:.1f}" if self.flops else "-", "yes" if m.attention else ""]
             for m in rows],
            align="llrrrl",
        )

    def format(self, depth: int = 2) -> str:
        """The totals, then ``table(depth)``."""
        def share(part: int, whole: int) -> str:
            return f"{100 * part / whole:.2f}%" if whole else "-"

        return "\n".join([
            f"params  {format_count(self.params):>8}   attention {format_count(self.attention_params)} "
            f"({share(self.attention_params, self.params)})",
            f"FLOPs   {format_count(self.flops):>8}   attention {format_count(self.attention_flops)} "
            f"({share(self.attention_flops, self.flops)})   multiply-adds (the paper's unit) "
            f"{format_count(self.multiply_adds)}",
            "",
            self.table(depth),
        ])

    def __str__(self) -> str:
        return self.format()


@contextmanager
def _reference_attention(model: nn.Module):
    """Every ``cbam.CBAM`` in ``model`` computes with ``impl="reference"`` inside; restored on exit."""
    switched = [(m, m.impl) for m in model.modules() if isinstance(m, cbam_nn.CBAM)]
    try:
        for module, _ in switched:
            module.impl = "reference"
        yield
    finally:
        for module, impl in switched:
            module.impl = impl


def _unique_numel(parameters) -> int:
    return sum(p.numel() for p in {id(p): p for p in parameters}.values())


def cost(model: nn.Module, *inputs, **kwargs) -> CostReport:
    """Count ``model(*inputs, **kwargs)``: one gradient-free forward in the model's current mode.

    See the module docstring for what counts. ``params`` counts every parameter once (shared ones
    too), ``attention_params`` those inside attention modules (``is_attention``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"cost expects an nn.Module, got {type(model).__name__}")
    paths = {module: name for name, module in model.named_modules()}
    attention = {m for m in paths if is_attention(m)}
    inside = {sub for m in attention for sub in m.modules()}
    flops = dict.fromkeys(paths, 0)
    calls = dict.fromkeys(paths, 0)
    starts: list[int] = []
    attention_flops = 0
    counter, elementwise = FlopCounterMode(display=False), _ElementwiseCounter()

    def running_total() -> int:
        return counter.get_total_flops() + elementwise.total

    def before(module: nn.Module, args) -> None:
        starts.append(running_total())
        elementwise.active += int(module in attention)

    def after(module: nn.Module, args, output) -> None:
        nonlocal attention_flops
        spent = running_total() - starts.pop()
        flops[module] += spent
        calls[module] += 1
        elementwise.active -= int(module in attention)
        if module in attention and not elementwise.active:
            attention_flops += spent

    handles = []
    try:
        for module in paths:
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after))
        with torch.no_grad(), _reference_attention(model), counter, elementwise:
            model(*inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()

    rows = [ModuleCost(path, type(m).__name__, _unique_numel(m.parameters()), flops[m], calls[m], m in inside)
            for m, path in paths.items()]
    return CostReport(
        params=_unique_numel(model.parameters()),
        flops=counter.get_total_flops() + elementwise.total,
        conv_matmul_flops=counter.get_total_flops(),
        attention_params=_unique_numel(p for m in attention for p in m.parameters()),
        attention_flops=attention_flops,
        modules=rows,
    )
