"""``check_amp``: the same forward under ``torch.autocast`` and in float32, compared.

The tutorial wraps ``forward`` in ``autocast()`` and calls the module compatible. Whether it is
shows in numbers: the relative error of the autocast output against float32, and where the
autocast run first produces inf or NaN (an overflow in float16, whose largest value is 65504, or a
cancellation such as ``1 / (a - b)`` once ``a`` and ``b`` round to the same low-precision value).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from .buffers import restored_buffers
from .outputs import floating_tensors

DEFAULT_DTYPES = {"cpu": torch.bfloat16, "cuda": torch.float16}
AMP_DTYPES = (torch.bfloat16, torch.float16)
DEFAULT_RTOL = {torch.bfloat16: 5e-2, torch.float16: 1e-2}  # ~10x each format's rounding error, 2^-8 / 2^-11


@dataclass
class NonFinite:
    """The first module (in the order calls return) whose output held inf or NaN under autocast.

    ``inputs_finite`` is ``False`` when its inputs were already non-finite: the values went bad in
    code between modules (the caller's forward), not in this module.
    """

    path: str
    type: str
    inputs_finite: bool


@dataclass
class AmpReport:
    """``check_amp``'s result. ``rel_error`` is ``||amp - fp32|| / ||fp32||`` over all output
    elements finite in both runs, ``max_abs_error`` the largest difference there; ``*_nan`` and
    ``*_inf`` count non-finite output elements; ``ok`` means ``rel_error <= rtol`` and no inf/NaN,
    neither in the outputs nor (when located) in any module's output on the way: an overflow that a
    later ``tanh`` or ``clamp`` hides still turns gradients into NaN in training."""

    dtype: str
    device: str
    rel_error: float
    max_abs_error: float
    rtol: float
    fp32_nan: int
    fp32_inf: int
    amp_nan: int
    amp_inf: int
    first_nonfinite: NonFinite | None

    @property
    def ok(self) -> bool:
        finite = self.fp32_nan + self.fp32_inf + self.amp_nan + self.amp_inf == 0
        return finite and self.first_nonfinite is None and self.rel_error <= self.rtol

    def as_dict(self) -> dict:
        return {"ok": self.ok, **asdict(self)}

    def __str__(self) -> str:
        lines = [f"autocast {self.dtype} on {self.device} vs float32: {'ok' if self.ok else 'FAILED'}",
                 f"  relative error {self.rel_error:.2e} (tolerance {self.rtol:g}), max abs error "
                 f"{self.max_abs_error:.2e}",
                 f"  non-finite outputs: float32 {self.fp32_nan} NaN / {self.fp32_inf} inf, "
                 f"{self.dtype} {self.amp_nan} NaN / {self.amp_inf} inf"]
        if self.fp32_nan or self.fp32_inf:
            lines.append("  the float32 run is already non-finite: not a mixed-precision problem")
        if self.first_nonfinite is not None:
            where = self.first_nonfinite
            cause = "" if where.inputs_finite else " (its inputs were already non-finite: look at its caller)"
            lines.append(f"  first non-finite output under autocast: {where.path or '(model)'} ({where.type}){cause}")
        return "\n".join(lines)


def _finite(value) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in floating_tensors(value))


class _FirstNonFinite:
    """Forward hooks remembering the first module call that returns a non-finite value."""

    def __init__(self, model: nn.Module) -> None:
        self.paths = {module: name for name, module in model.named_modules()}
        self.found: NonFinite | None = None

    def __call__(self, module: nn.Module, args: tuple, output) -> None:
        if self.found is None and not _finite(output):
            self.found = NonFinite(self.paths[module], type(module).__name__, _finite(args))


def _flat(output) -> Tensor:
    tensors = floating_tensors(output)
    if not tensors:
        raise TypeError(f"check_amp needs a module returning floating tensors, got {type(output).__name__}")
    return torch.cat([t.detach().float().reshape(-1) for t in tensors])


def check_amp(module: nn.Module, *inputs, dtype: torch.dtype | None = None, rtol: float | None = None,
              locate: bool = True) -> AmpReport:
    """Run ``module(*inputs)`` in float32 and under ``torch.autocast(dtype)``; compare the outputs.

    ``inputs`` are tensors, float32 where floating (token ids stay integers), and any non-tensor
    arguments; ``dtype`` defaults to bfloat16 on the CPU and float16 on CUDA; ``rtol`` to 5e-2
    (bfloat16) / 1e-2 (float16). With ``locate``, one more autocast run with forward hooks on every module
    names the first whose output goes non-finite (the comparison comes from the run without them: a hooked
    CBAM runs its reference, not the fused path a plain call takes). Every run is gradient-free, in the
    module's mode and from the same RNG state (the same dropout masks); its buffers and the RNG state are
    restored afterwards.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"check_amp expects an nn.Module, got {type(module).__name__}")
    tensors = [t for t in pytree.tree_leaves(inputs) if isinstance(t, Tensor)]
    if not tensors:
        raise ValueError("check_amp needs at least one input tensor, got none")
    floating = floating_tensors(tensors)
    if any(t.dtype != torch.float32 for t in floating):
        found = sorted({str(t.dtype) for t in floating})
        raise ValueError(f"check_amp compares autocast with float32: expected float32 inputs, got {found}")
    device = tensors[0].device.type
    dtype = DEFAULT_DTYPES.get(device, torch.bfloat16) if dtype is None else dtype
    if dtype not in AMP_DTYPES:
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    rtol = DEFAULT_RTOL[dtype] if rtol is None else rtol

    def same_rng():
        return torch.random.fork_rng([] if device == "cpu" else [tensors[0].device], device_type=device)

    with torch.no_grad(), restored_buffers(module), same_rng():
        reference = _flat(module(*inputs))
    with torch.no_grad(), restored_buffers(module), same_rng(), torch.autocast(device, dtype=dtype):
        amp = _flat(module(*inputs))  # the path that runs: hooks would send fused CBAMs to their reference
    locator = _FirstNonFinite(module)
    if locate:
        handles = [m.register_forward_hook(locator) for m in locator.paths]
        try:
            with torch.no_grad(), restored_buffers(module), same_rng(), torch.autocast(device, dtype=dtype):
                module(*inputs)
        finally:
            for handle in handles:
                handle.remove()

    both = torch.isfinite(reference) & torch.isfinite(amp)
    difference = (amp - reference)[both]
    error, scale = float(difference.norm()), float(reference[both].norm())
    rel_error = error / scale if scale > 0 else (0.0 if error == 0 else float("inf"))
    return AmpReport(
        dtype=str(dtype).removeprefix("torch."), device=device, rel_error=rel_error,
        max_abs_error=float(difference.abs().max()) if difference.numel() else 0.0, rtol=rtol,
        fp32_nan=int(reference.isnan().sum()), fp32_inf=int(reference.isinf().sum()),
        amp_nan=int(amp.isnan().sum()), amp_inf=int(amp.isinf().sum()), first_nonfinite=locator.found,
    )
