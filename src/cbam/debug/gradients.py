"""``check_gradients``: gradcheck done right, with the error of every input and parameter.

The tutorial runs ``gradcheck(lambda x: CBAM(64)(x), torch.randn(1, 64, 32, 32, requires_grad=True))``.
That cannot pass, for two reasons. It is float32: gradcheck compares the backward with central
differences ``(f(x + eps) - f(x - eps)) / 2 eps`` at ``eps = 1e-6``, and float32 resolves only
~1e-7 relative to ``x``, so the step itself is off by a few per cent and the difference of two
nearly equal outputs loses most of its digits: errors of 1e-2 and more against tolerances of
``atol=1e-5, rtol=1e-3``. And the lambda builds a new, randomly initialised CBAM on every call, so
the finite differences compare different functions. Here the module is copied once and the copy
(parameters, buffers, inputs) cast to float64, where the same differences are accurate to ~1e-10.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from ..tables import format_shape, format_table
from .outputs import floating_tensors


@dataclass
class TensorError:
    """Analytical (backward) vs numerical (finite-difference) derivatives for one checked tensor.

    Full mode: the largest entry of ``|J_backward - J_numerical|`` (``max_abs``), that divided by the
    largest ``|J_numerical|`` (``max_rel``), and ``ok`` when every entry is within ``atol + rtol *
    |J_numerical|`` (gradcheck's test). Fast mode: the same for one random projection ``u^T J v``.
    """

    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    ok: bool


@dataclass
class CheckResult:
    """One torch check (``gradcheck``, ``gradgradcheck``): passed, or the first line of its error."""

    name: str
    passed: bool
    message: str = ""


class GradientReport:
    """The result of ``check_gradients``: ``ok``, ``tensors`` (one ``TensorError`` each) and ``checks``."""

    def __init__(self, tensors: list[TensorError], checks: list[CheckResult], *, fast: bool, eps: float,
                 atol: float, rtol: float) -> None:
        self.tensors, self.checks = tensors, checks
        self.fast, self.eps, self.atol, self.rtol = fast, eps, atol, rtol

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tensors) and all(c.passed for c in self.checks)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "mode": "fast" if self.fast else "full", "eps": self.eps, "atol": self.atol,
                "rtol": self.rtol, "tensors": [asdict(t) for t in self.tensors],
                "checks": [asdict(c) for c in self.checks]}

    def __str__(self) -> str:
        mode = "one random projection u^T J v per tensor" if self.fast else "full Jacobians"
        head = (f"gradients: {'ok' if self.ok else 'FAILED'} (float64 copy, {mode}; eps={self.eps:g}, "
                f"atol={self.atol:g}, rtol={self.rtol:g})")
        table = format_table(
            ["tensor", "shape", "max abs err", "max rel err", "ok"],
            [[t.name, format_shape(t.shape), f"{t.max_abs:.2e}", f"{t.max_rel:.2e}", "yes" if t.ok else "NO"]
             for t in self.tensors],
            align="llrrl",
        )
        checks = [f"{c.name}: {'passed' if c.passed else 'FAILED'}{': ' + c.message if c.message else ''}"
                  for c in self.checks]
        return "\n".join([head, table, *checks])


def _flat(output) -> Tensor:
    tensors = floating_tensors(output)
    if not tensors:
        raise TypeError(f"check_gradients needs a module returning floating tensors, got {type(output).__name__}")
    return torch.cat([t.reshape(-1) for t in tensors])


def _errors(analytical: Tensor, numerical: Tensor, atol: float, rtol: float) -> tuple[float, float, bool]:
    error = (analytical - numerical).abs()
    max_abs = float(error.max()) if error.numel() else 0.0
    scale = float(numerical.abs().max()) if numerical.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return max_abs, max_rel, bool((error <= atol + rtol * numerical.abs()).all())


def _central_difference(f, tensors: list[Tensor], t: Tensor, direction: Tensor, eps: float) -> Tensor:
    """``(f(t + eps d) - f(t - eps d)) / 2 eps`` with ``t`` changed in place and restored."""
    with torch.no_grad():
        original = t.clone()
        t.add_(direction, alpha=eps)
        plus = f(*tensors)
        t.copy_(original).sub_(direction, alpha=eps)
        minus = f(*tensors)
        t.copy_(original)
    return (plus - minus) / (2 * eps)


def _full_errors(f, tensors: list[Tensor], eps: float, atol: float, rtol: float) -> list[tuple[float, float, bool]]:
    analytical = torch.autograd.functional.jacobian(f, tuple(tensors))  # each (outputs, *t.shape)
    results = []
    for t, jacobian in zip(tensors, analytical):
        columns = []
        for i in range(t.numel()):
            direction = torch.zeros_like(t)
            direction.view(-1)[i] = 1
            columns.append(_central_difference(f, tensors, t, direction, eps))
        numerical = torch.stack(columns, dim=1) if columns else jacobian.reshape(len(jacobian), 0)
        results.append(_errors(jacobian.reshape(len(jacobian), -1), numerical, atol, rtol))
    return results


def _fast_errors(f, tensors: list[Tensor], eps: float, atol: float, rtol: float) -> list[tuple[float, float, bool]]:
    generator = torch.Generator().manual_seed(0)

    def unit(like: Tensor) -> Tensor:
        v = torch.randn(like.shape, generator=generator, dtype=like.dtype)
        return (v / v.norm().clamp_min(1e-12)).to(like.device)

    output = f(*tensors)
    u = unit(output)
    grads = torch.autograd.grad(output, tensors, u, allow_unused=True)
    results = []
    for t, grad in zip(tensors, grads):
        v = unit(t)
        analytical = (grad * v).sum() if grad is not None else torch.zeros((), dtype=t.dtype, device=t.device)
        numerical = (u * _central_difference(f, tensors, t, v, eps)).sum()
        results.append(_errors(analytical.detach(), numerical, atol, rtol))
    return results


def _leaves(inputs: tuple) -> tuple[list[str], list, pytree.TreeSpec]:
    """``inputs``' leaves (tensors and whatever else, inside lists, tuples and dicts), each one's path
    (``"0"``, ``"1.0"`` for the first tensor of a list passed second) and the structure to rebuild them."""
    with_paths, structure = pytree.tree_flatten_with_path(inputs)
    paths = [".".join(str(getattr(key, "idx", getattr(key, "key", key))) for key in path) for path, _ in with_paths]
    return paths, [leaf for _, leaf in with_paths], structure


def _torch_check(name: str, check, f, tensors: list[Tensor], **options) -> CheckResult:
    try:
        check(f, tuple(tensors), raise_exception=True, **options)
    except RuntimeError as error:  # GradcheckError, or a backward that cannot run (e.g. no double backward)
        return CheckResult(name, False, str(error).strip().splitlines()[0])
    return CheckResult(name, True)


def check_gradients(
    module: nn.Module,
    *inputs,
    params: bool = True,
    gradgrad: bool = False,
    fast: bool = False,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    max_elements: int = 20_000,
) -> GradientReport:
    """Check ``module``'s backward on ``inputs`` in float64; returns a ``GradientReport`` (``.ok``).

    Checks every floating input and (``params=True``) every parameter that requires grad, on a
    float64 deep copy (the module itself is untouched). Per tensor, the backward's Jacobian is
    compared with central differences under gradcheck's test ``|a - n| <= atol + rtol * |n|``,
    element by element (two forwards per checked element: keep inputs small; ``max_elements``
    guards against a check that would run for hours), or with ``fast=True`` along one random
    projection (two forwards per tensor, fit for large modules). ``torch.autograd.gradcheck`` (and
    ``gradgradcheck`` with ``gradgrad=True``) run too, in their ``fast_mode`` (the element-wise
    comparison above is the expensive half of their full mode), adding torch's own checks such as
    backward with undefined output gradients. The copy runs in the module's mode: call ``eval()``
    first if it has dropout, whose randomness no check survives.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"check_gradients expects an nn.Module, got {type(module).__name__}")
    double = copy.deepcopy(module).double()
    names = [name for name, p in double.named_parameters() if p.requires_grad] if params else []
    paths, leaves, structure = _leaves(inputs)  # tensors nested in lists, tuples and dicts too
    positions = [i for i, x in enumerate(leaves) if isinstance(x, Tensor) and x.is_floating_point()]
    tensors = [leaves[i].detach().double().clone().requires_grad_() for i in positions]
    tensors += [double.get_parameter(name).detach().clone().requires_grad_() for name in names]
    labels = [f"input {paths[i]}" for i in positions] + names
    if not tensors:
        raise ValueError("check_gradients needs a floating-point input or a parameter to check, got neither")
    elements = sum(t.numel() for t in tensors)
    if not fast and elements > max_elements:
        raise ValueError(f"check_gradients(fast=False) checks every element: expected at most {max_elements} "
                         f"input and parameter elements, got {elements}; use smaller inputs or fast=True")

    def f(*values: Tensor) -> Tensor:
        args = list(leaves)
        for position, value in zip(positions, values):
            args[position] = value.clone()  # a forward that changes its input in place must not change ours
        weights = dict(zip(names, values[len(positions):]))
        return _flat(torch.func.functional_call(double, weights, pytree.tree_unflatten(args, structure)))

    errors = (_fast_errors if fast else _full_errors)(f, tensors, eps, atol, rtol)
    tensor_errors = [TensorError(label, tuple(t.shape), *error) for label, t, error in zip(labels, tensors, errors)]
    options = {"eps": eps, "atol": atol, "rtol": rtol, "fast_mode": True}  # the per-element check is ours
    checks = [_torch_check("gradcheck", torch.autograd.gradcheck, f, tensors, **options)]
    if gradgrad:
        checks.append(_torch_check("gradgradcheck", torch.autograd.gradgradcheck, f, tensors, **options))
    return GradientReport(tensor_errors, checks, fast=fast, eps=eps, atol=atol, rtol=rtol)
