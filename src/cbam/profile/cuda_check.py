"""``cuda_check``: the fused CBAM on one engine against a float64 reference on the same device — the
output, every gradient and the BatchNorms' running statistics — as a pass/fail report.

Each case builds ``CBAM(C, preset=..., impl="fused")`` (float32 weights, or the input's dtype for the
"half weights" cases) with random parameters and BatchNorm statistics, and runs it on an input of
the case's dtype and layout, with a residual (``cbam(x, residual)``) and/or the BatchNorm before
CBAM folded in (``input_norm=``), in train or eval mode, under ``engines.using(engine)``; half inputs
run under ``torch.autocast`` as in mixed-precision training (the fused path turns autocast off and
computes its gates in float32). The oracle is ``CBAM(impl="reference")`` and the BatchNorm in float64
on the same values and device. Every allocation through ``torch.empty``/``torch.empty_like`` made
while the fused forward and backward run is NaN-filled first, so an element nobody writes shows.

Half inputs are drawn with distinct values along every channel row and every spatial column, so that
no max pool has a tie (the fused backward routes a tie's gradient to the first maximum, ``amax`` splits
it; both are valid, but they differ).

With a residual, the tail's ReLU may cut an output within rounding of zero on the other side than
the float64 one does; the input and residual gradients are compared off those elements (``relu_kinks``).

Error: ``max |got - want| / max |want|`` per tensor (NaN or infinity in ``got``: failed), against a
tolerance set by the dtype ``got`` is stored in or the input's, whichever is looser (``TOLERANCES``).
A case also fails where the fused path did not run on the requested engine, did not fold the
BatchNorm it was given, or returned another dtype or memory layout than its input's.

On CUDA, run with TF32 off (``tf32_off()``): the reference's cuDNN convolutions would otherwise use
TF32. On the CPU the Triton engine runs in its interpreter (``TRITON_INTERPRET=1`` before the kernels
are imported) when ``engine="triton"``.

>>> from cbam.profile import cuda_check
>>> report = cuda_check.check(device="cuda")  # doctest: +SKIP
>>> print(report)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ..debug.poison import poisoned
from ..nn import CBAM
from ..ops import engine_for, folds_input_norm
from ..ops import engines as engine_seam

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = ("contiguous", "channels_last")
VARIANTS = ("plain", "residual", "fold", "fold+residual")
MODES = ("train", "eval")
PRESETS = ("timm", "official", "paper")
# (B, C, H, W): odd sizes and C no power of two, B = 1, a ResNet-50 stage at a smaller batch (few shapes:
# each one compiles the kernels' specialisations again)
CUDA_SHAPES = ((2, 70, 9, 9), (1, 37, 5, 5), (4, 256, 28, 28))
TINY_SHAPES = ((2, 37, 5, 7),)
# max |got - want| / max |want| allowed, by the dtype the compared tensor is stored in, or the input's
# where that is looser (a float32 gradient may come through a big tensor stored in the input's dtype, as
# the BatchNorm's weight gradient on running statistics does): float32 sums of thousands of terms; half
# values a few roundings (seen in the interpreter: bf16 up to 6e-3, fp16 4e-4)
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-8, torch.float64: 1e-10}
# a half-precision parameter's gradient: a sum with cancellation (the spatial BatchNorm's bias: one
# number) over terms computed from half-precision tensors; seen in the interpreter: bf16 1.4e-2
HALF_PARAMETER_GRADIENT_FACTOR = 4
F64 = torch.float64


@dataclass(frozen=True)
class Case:
    """One check: ``x: shape`` of ``dtype`` (a key of ``DTYPES``) in ``layout``; ``variant`` says what
    comes with it (a residual, the folded BatchNorm, both); ``mode`` is train or eval; ``weights``
    ``"float32"`` or ``"input"`` (the module in the input's dtype); ``autocast`` runs the fused call
    under ``torch.autocast`` in the input's dtype."""

    shape: tuple[int, ...]
    dtype: str
    layout: str
    preset: str
    variant: str
    mode: str
    weights: str = "float32"
    autocast: bool = False

    @property
    def name(self) -> str:
        shape = "x".join(map(str, self.shape))
        extras = [self.variant, self.mode, self.preset] + (["half weights"] if self.weights == "input" else [])
        return f"{shape} {self.dtype}{' autocast' if self.autocast else ''} {self.layout}: {', '.join(extras)}"


@dataclass
class Comparison:
    """One tensor: its error (``max |got - want| / max |want|``) and the tolerance it had."""

    name: str
    error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance


@dataclass
class CaseResult:
    """One case: the engine the fused path ran on, whether it folded the BatchNorm (``None`` without
    one), the comparisons and what else went wrong (``problems``)."""

    case: str
    engine: str
    folded: bool | None
    comparisons: list[Comparison]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.comparisons)

    def worst(self) -> Comparison | None:
        """The comparison closest to (or furthest over) its tolerance."""
        return max(self.comparisons, key=lambda c: c.error / c.tolerance, default=None)


@dataclass
class CheckReport:
    """``check``'s result: where it ran, the cases and the seconds it took."""

    device: str
    engine: str
    environment: dict
    results: list[CaseResult]
    seconds: float

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results)

    def as_dict(self) -> dict:
        data = asdict(self)
        data["ok"] = self.ok
        for result, found in zip(self.results, data["results"]):
            found["ok"] = result.ok
            for comparison, entry in zip(result.comparisons, found["comparisons"]):
                entry["ok"] = comparison.ok
                entry["error"] = _finite(entry["error"])
        return data

    def __str__(self) -> str:
        env = self.environment
        failed = [r for r in self.results if not r.ok]
        head = (f"fused CBAM on engine {self.engine!r} vs float64 reference on {self.device} "
                f"({env.get('device_name')}; "
                f"torch {env['torch']}, triton {env.get('triton')}, TF32 {'on' if env.get('tf32') else 'off'}): "
                f"{'PASS' if self.ok else 'FAIL'}, {len(self.results) - len(failed)}/{len(self.results)} cases "
                f"passed in {self.seconds:.1f} s")
        lines = [head]
        for result in failed:
            worst = result.worst()
            bad = [f"{c.name} {c.error:.2e} > {c.tolerance:.1e}" for c in result.comparisons if not c.ok]
            lines.append(f"FAIL {result.case} [{result.engine}]: " + "; ".join(result.problems + bad)
                         if result.problems or bad else f"FAIL {result.case}: worst {worst}")
        passed = [r.worst() for r in self.results if r.ok and r.worst() is not None]
        if passed:
            ratio = max(c.error / c.tolerance for c in passed)
            lines.append(f"closest to its tolerance among the passing cases: {ratio:.2f} of it")
        return "\n".join(lines)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def environment(device: str) -> dict:
    """torch, Triton, the device's name and whether TF32 is on."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.device(device).type == "cuda"
    return {"torch": torch.__version__, "triton": triton_version,
            "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
            "tf32": bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32) if cuda else False}


@contextlib.contextmanager
def tf32_off() -> Iterator[None]:
    """TF32 off for matmuls and cuDNN inside the block (restored after)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def cases(shapes: Sequence[tuple[int, ...]] = CUDA_SHAPES, dtypes: Sequence[str] = tuple(DTYPES),
          layouts: Sequence[str] = LAYOUTS, presets: Sequence[str] = PRESETS,
          variants: Sequence[str] = VARIANTS, modes: Sequence[str] = MODES) -> list[Case]:
    """Every combination; half dtypes run under autocast with float32 weights, and once more (with a
    residual, in train mode) with the module in their dtype and no autocast."""
    found = []
    for shape in shapes:
        for dtype in dtypes:
            half = DTYPES[dtype] != torch.float32
            for layout in layouts:
                for preset in presets:
                    found += [Case(tuple(shape), dtype, layout, preset, variant, mode, autocast=half)
                              for variant in variants for mode in modes]
                    if half:
                        found.append(Case(tuple(shape), dtype, layout, preset, "residual", "train", weights="input"))
    return found


def _distinct(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> Tensor:
    """Standard-normal-like values of ``dtype`` (on the CPU), distinct along every channel row and every
    spatial column of the ``(B, C, S)`` view: ``x[b, c, s] = values[(pc[c] + ps[s]) % n]`` for random
    permutations ``pc``, ``ps`` and ``n >= max(C, S)`` distinct values, one draw per sample."""
    if dtype in (torch.float32, F64):
        return torch.randn(shape, generator=generator, dtype=dtype)
    batch, channels, positions = shape[0], shape[1], math.prod(shape[2:])
    count = max(channels, positions)
    pool = torch.unique((torch.randn(64 * count + 4096, generator=generator) * 1.5).to(dtype).float())
    if pool.numel() < count:
        raise ValueError(f"cannot draw {count} distinct {dtype} values for shape {shape}")
    samples = []
    for _ in range(batch):
        values = pool[torch.randperm(pool.numel(), generator=generator)[:count]]
        pc, ps = torch.randperm(count, generator=generator)[:channels], torch.randperm(count, generator=generator)
        index = (pc[:, None] + ps[None, :positions]) % count
        samples.append(values[index])
    return torch.stack(samples).reshape(shape).to(dtype)


def _randomise(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """BatchNorm weights in [0.5, 1.5], biases and running means about ±0.3, running variances in
    [0.5, 2] (the defaults 1, 0, 0, 1 would hide mistakes in the affine map)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for name, low, span, normal in (("weight", 0.5, 1.0, False), ("bias", 0.0, 0.3, True),
                                                ("running_mean", 0.0, 0.3, True), ("running_var", 0.5, 1.5, False)):
                    t = getattr(m, name)
                    if t is not None:
                        draw = torch.randn if normal else torch.rand
                        t.copy_(low + span * draw(t.shape, generator=generator, dtype=F64))
    return module


def _error(got: Tensor | None, want: Tensor | None) -> float:
    if got is None or want is None:
        return 0.0 if got is None and (want is None or not want.any()) else math.inf
    got64 = got.detach().to(F64)
    if got64.shape != want.shape or not torch.isfinite(got64).all():
        return math.inf
    scale = want.detach().abs().max().item() if want.numel() else 0.0
    diff = (got64 - want.detach()).abs().max().item() if want.numel() else 0.0
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def relu_kinks(got: Tensor, want: Tensor, band: float) -> tuple[Tensor, int]:
    """Where a residual tail's ReLU cut differently (``got`` zero and ``want`` positive, or the other way):
    ``(mask, outside)``, ``outside`` counting those whose positive side exceeds ``band``. Near its kink the
    side a ReLU takes follows rounding (a bfloat16 module's parameters and statistics, its bfloat16 output), so
    there the gradients through it are compared nowhere; farther out a different side is an error."""
    got64 = got.detach().to(F64)
    mask = (got64 > 0) != (want.detach() > 0)
    outside = int((torch.maximum(got64, want.detach())[mask] > band).sum())
    return mask, outside


def _memory_format(layout: str, dims: int) -> torch.memory_format:
    if layout == "contiguous":
        return torch.contiguous_format
    return {4: torch.channels_last, 5: torch.channels_last_3d}[dims]


def run_case(case: Case, device: str = "cuda", engine: str = "triton", seed: int = 0) -> CaseResult:
    """One case (see the module docstring), with TF32 off."""
    with tf32_off():
        return _run_case(case, device, engine, seed)


def _run_case(case: Case, device: str, engine: str, seed: int) -> CaseResult:
    generator = torch.Generator().manual_seed(seed)
    dtype, channels, dims = DTYPES[case.dtype], case.shape[1], len(case.shape) - 2
    preset = None if case.preset == "paper" else case.preset
    torch.manual_seed(seed)
    module = _randomise(CBAM(channels, preset=preset, impl="fused", dims=dims), generator).to(device)
    if case.weights == "input":
        module = module.to(dtype)
    oracle = CBAM(channels, preset=preset, impl="reference", dims=dims, device=device, dtype=F64)
    oracle.load_state_dict(module.state_dict())
    folding = case.variant.startswith("fold")
    norm = None
    if folding:
        norm = _randomise({1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](channels), generator)
        norm = norm.to(device)
    oracle_norm = None if norm is None else copy.deepcopy(norm).to(F64)
    training = case.mode == "train"
    for m in (module, oracle, norm, oracle_norm):
        if m is not None:
            m.train(training)

    fmt = _memory_format(case.layout, len(case.shape))
    x = _distinct(case.shape, dtype, generator)  # not shifted for the fold: rounding a shift could make ties
    residual = torch.randn(case.shape, generator=generator).to(dtype) if "residual" in case.variant else None
    upstream = torch.randn(case.shape, generator=generator).to(dtype)
    x, upstream = (t.to(device).contiguous(memory_format=fmt) for t in (x, upstream))
    residual = None if residual is None else residual.to(device).contiguous(memory_format=fmt)

    leaves = [x.clone().requires_grad_()] + ([residual.clone().requires_grad_()] if residual is not None else [])
    params = [*module.named_parameters()] + ([(f"input_norm.{n}", p) for n, p in norm.named_parameters()]
                                             if norm is not None else [])
    autocast = (torch.autocast(torch.device(device).type, dtype=dtype) if case.autocast
                else contextlib.nullcontext())
    problems = []
    with engine_seam.using(engine):
        ran_on = engine_for(leaves[0])
        folded = None if norm is None else folds_input_norm(norm, leaves[0], *module._fused_inputs())
        with autocast, poisoned():
            out = module(leaves[0], leaves[1] if residual is not None else None, input_norm=norm)
            grads = torch.autograd.grad(out, [*leaves, *(p for _, p in params)], upstream, allow_unused=True)
    if ran_on != engine:
        problems.append(f"ran on engine {ran_on!r}, not {engine!r}")
    if folded is False:
        problems.append("the BatchNorm before CBAM was not folded")
    if out.dtype != x.dtype:
        problems.append(f"output dtype {out.dtype}, input {x.dtype}")
    if case.layout != "contiguous" and not out.is_contiguous(memory_format=fmt):
        problems.append(f"output not {case.layout} (strides {out.stride()})")

    want_leaves = [t.detach().to(F64).requires_grad_() for t in leaves]
    oracle_params = [*oracle.parameters()] + ([*oracle_norm.parameters()] if oracle_norm is not None else [])
    want = oracle(want_leaves[0], want_leaves[1] if residual is not None else None, input_norm=oracle_norm)
    want_grads = torch.autograd.grad(want, [*want_leaves, *oracle_params], upstream.to(F64), allow_unused=True)

    names = ["output", "grad x"] + (["grad residual"] if residual is not None else [])
    names += [f"grad {n}" for n, _ in params]
    got_all, want_all = [out, *grads], [want, *want_grads]
    buffers = [*module.named_buffers()] + ([(f"input_norm.{n}", b) for n, b in norm.named_buffers()]
                                           if norm is not None else [])
    oracle_buffers = [*oracle.buffers()] + ([*oracle_norm.buffers()] if oracle_norm is not None else [])
    for (name, got_buffer), want_buffer in zip(buffers, oracle_buffers, strict=True):
        if got_buffer.is_floating_point():
            names.append(name)
            got_all.append(got_buffer)
            want_all.append(want_buffer)
        elif not torch.equal(got_buffer.cpu(), want_buffer.cpu()):
            problems.append(f"{name} is {got_buffer.tolist()}, want {want_buffer.tolist()}")
    kinks = None
    if residual is not None:
        band = max(TOLERANCES[out.dtype], TOLERANCES[dtype]) * want.detach().abs().max().item()
        found, outside = relu_kinks(out, want, band)
        kinks = found if found.any() else None
        if outside:
            problems.append(f"{outside} outputs on the other side of the ReLU, beyond rounding")
    comparisons = []
    for name, got, wanted in zip(names, got_all, want_all, strict=True):
        if kinks is not None and name in ("grad x", "grad residual") and got is not None:
            got, wanted = got.masked_fill(kinks, 0), wanted.masked_fill(kinks, 0)
        stored = got.dtype if got is not None else torch.float32
        tolerance = max(TOLERANCES[stored], TOLERANCES[dtype])
        if case.weights == "input" and name.startswith("grad ") and name not in ("grad x", "grad residual"):
            tolerance *= HALF_PARAMETER_GRADIENT_FACTOR
        comparisons.append(Comparison(name, _error(got, wanted), tolerance))
    return CaseResult(case.name, ran_on, folded, comparisons, problems)


def check(device: str = "cuda", engine: str = "triton", shapes: Sequence[tuple[int, ...]] | None = None,
          dtypes: Sequence[str] = tuple(DTYPES), layouts: Sequence[str] = LAYOUTS,
          presets: Sequence[str] = PRESETS, variants: Sequence[str] = VARIANTS, modes: Sequence[str] = MODES,
          budget_s: float | None = None, progress=None) -> CheckReport:
    """Run ``cases(...)`` on ``device`` with TF32 off: every case for the first of ``presets`` at every
    shape, the other presets at the first shape; ``shapes`` default ``CUDA_SHAPES`` on CUDA and
    ``TINY_SHAPES`` elsewhere. ``budget_s``: stop starting cases after that many seconds (the cases
    not run are reported as a problem of one more result). ``progress(result)`` is called after each."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available on this machine")
    if shapes is None:
        shapes = CUDA_SHAPES if torch.device(device).type == "cuda" else TINY_SHAPES
    todo = cases(shapes[:1], dtypes, layouts, presets[:1], variants, modes)  # most kernel variants, first
    todo += cases(shapes[:1], dtypes, layouts, presets[1:], variants, modes)
    todo += cases(shapes[1:], dtypes, layouts, presets[:1], variants, modes)
    start, results = time.perf_counter(), []
    with tf32_off():
        env = environment(device)
        for index, case in enumerate(todo):
            if budget_s is not None and time.perf_counter() - start > budget_s:
                results.append(CaseResult(f"{len(todo) - index} cases not run", "-", None, [],
                                          [f"time budget of {budget_s:.0f} s spent"]))
                break
            try:
                result = run_case(case, device, engine)
            except Exception as error:  # a crash is a failed case, not the end of the check
                result = CaseResult(case.name, "-", None, [], [f"{type(error).__name__}: {error}".splitlines()[0]])
            results.append(result)
            if progress is not None:
                progress(result)
    return CheckReport(device, engine, env, results, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    """``python -m cbam.profile.cuda_check [--json PATH] [--budget S] ...``: prints the summary, exits 1 on
    a failure."""
    parser = argparse.ArgumentParser(prog="python -m cbam.profile.cuda_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--engine", default="triton", choices=engine_seam.CHOICES)
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--budget", type=float, default=None, help="seconds after which no new case starts")
    parser.add_argument("--json", default=None, help="also write the full report as JSON to this path")
    parser.add_argument("--verbose", action="store_true", help="one line per case as it finishes")
    args = parser.parse_args(argv)

    def progress(result: CaseResult) -> None:
        if args.verbose or not result.ok:
            worst = result.worst()
            detail = "; ".join(result.problems) or (f"worst {worst.name} {worst.error:.1e} (tol {worst.tolerance:.0e})"
                                                   if worst else "")
            print(f"{'ok  ' if result.ok else 'FAIL'} {result.case} [{result.engine}] {detail}", file=sys.stderr,
                  flush=True)

    try:
        report = check(args.device, args.engine, dtypes=args.dtypes.split(","), presets=args.presets.split(","),
                       budget_s=args.budget, progress=progress)
    except (RuntimeError, ValueError, KeyError) as error:
        print(f"cuda_check: error: {str(error).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.as_dict(), f, indent=1, allow_nan=False)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
