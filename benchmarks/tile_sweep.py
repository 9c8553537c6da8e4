"""Which tile policy each of the Triton engine's kernels runs fastest under, per stage shape, on a GPU.

    python benchmarks/tile_sweep.py [--batch 64] [--shapes 1024x14,2048x7] [--budget 150]
    python benchmarks/tile_sweep.py --check [--shapes 64x8,512x4]   # any device: each policy's results

The engine sizes its tiles from a few constants: ``common.TILE`` (the elements a program holds),
``common.BUSY`` (the programs a pass wants on a GPU), and the channel MLP's ``PRODUCTS``, ``PROGRAMS``
and ``WEIGHT_BLOCK``. They were chosen on the CPU and from one H100 run. Each policy below changes one
of them, and on CUDA the profiler (``kernel_times``) gives each kernel's time per training call under
every policy: forward+backward of ``CBAM(C, preset="timm")`` on a bfloat16 channels-last input under
bfloat16 autocast. The table shows the default's time, the best time, and the policy that gave it. A
kernel reads only some of the constants, so each kernel's best can be combined. Each policy compiles
its own kernels; ``--budget`` seconds end the sweep where it is.

``--check`` runs on any device (the CPU through Triton's interpreter, which it turns on). It compares each
policy's output, input gradient and parameter gradients with the default policy's, and names each policy
that launched no tile different from the default's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator

import torch

POLICIES: dict[str, dict[str, int]] = {
    "default": {},
    "TILE=1024": {"TILE": 1024},
    "TILE=4096": {"TILE": 4096},
    "BUSY=256": {"BUSY": 256},
    "BUSY=4096": {"BUSY": 4096},
    "PROGRAMS=512": {"PROGRAMS": 512},
    "PRODUCTS=2048": {"PRODUCTS": 2048},
    "WEIGHT_BLOCK=32": {"WEIGHT_BLOCK": 32},
}
GPU_ONLY = {"BUSY", "PROGRAMS"}  # the tile sizes read these only for CUDA tensors


@contextlib.contextmanager
def tile_policy(values: dict[str, int]) -> Iterator[None]:
    """Within it, the Triton engine's tile constants named in ``values`` take those values, in every module
    of the engine that reads them."""
    from cbam.ops.engines import triton_ops
    from cbam.ops.engines.triton_ops import batch_norm, channel_mlp, common, gradients, output, pooling, spatial

    modules = (triton_ops, batch_norm, channel_mlp, common, gradients, output, pooling, spatial)
    unknown = [name for name in values if not any(hasattr(module, name) for module in modules)]
    if unknown:
        raise ValueError(f"tile_policy: no Triton module reads {', '.join(unknown)}")
    saved = [(module, name, getattr(module, name)) for module in modules for name in values if hasattr(module, name)]
    try:
        for module, name, _ in saved:
            setattr(module, name, values[name])
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _training_results(channels: int, size: int, batch: int, device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """The output, input gradient and parameter gradients of one fused ``CBAM(preset="timm")`` training call
    on a fixed channels-last input (seed 0)."""
    import cbam

    torch.manual_seed(0)
    module = cbam.CBAM(channels, preset="timm", impl="fused").to(device)
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    out = module(x)
    grads = torch.autograd.grad(out, [x, *module.parameters()], torch.randn_like(out))
    return [out.detach(), *grads]


def _tiles_into(found: set[str], label: str):
    """Within it, each kernel the interpreter launches adds ``label``, its name and its block sizes to ``found``."""
    from cbam.profile.triton_targets import interpreted_launches

    def note(function, args, kwargs) -> None:
        blocks = sorted((key, value) for key, value in kwargs.items() if key.isupper())
        found.add(f"{label} {function.fn.__name__} {blocks}")

    return interpreted_launches(note)


def check(shapes: list[tuple[int, int]], batch: int, device: str) -> list[str]:
    """One line per policy whose results differ from the default policy's (float32), or that launched no
    tile the default did not on any of the shapes (on the CPU, where the interpreter records the launches;
    ``GPU_ONLY`` constants change nothing there)."""
    from cbam.ops import engines

    problems, launched = [], {name: set() for name in POLICIES}
    with engines.using("triton"):
        for channels, size in shapes:
            results = {}
            for name, values in POLICIES.items():
                label = f"{channels}x{size}"
                recorder = _tiles_into(launched[name], label) if device == "cpu" else contextlib.nullcontext()
                with tile_policy(values), recorder:
                    results[name] = _training_results(channels, size, batch, device, torch.float32)
            for name in POLICIES:
                for index, (got, want) in enumerate(zip(results[name], results["default"], strict=True)):
                    if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
                        what = ("output", "input grad")[index] if index < 2 else f"parameter {index - 2}'s grad"
                        error = (got - want).abs().max().item()
                        problems.append(f"{channels}x{size}, {name}: {what} differs from the default's by {error:.3g}")
    for name in POLICIES:
        applies = not GPU_ONLY & set(POLICIES[name])
        if device == "cpu" and applies and name != "default" and launched[name] == launched["default"]:
            problems.append(f"{name}: launched the default's tiles at every shape")
    return problems


def sweep(shapes: list[tuple[int, int]], batch: int, budget: float) -> str:
    """The per-kernel table of each shape (CUDA), over the policies that fit in ``budget`` seconds."""
    from kernel_times import kernel_times, module_steps

    start, sections = time.perf_counter(), []
    for channels, size in shapes:
        timed: dict[str, dict[str, float]] = {}
        for name, values in POLICIES.items():
            if time.perf_counter() - start > budget:
                sections.append(f"(budget of {budget:g} s spent: {channels}x{size} stopped before {name})")
                break
            with tile_policy(values):
                train, _ = module_steps(channels, size, batch)
                timed[name] = {kernel: micros for kernel, micros, _ in kernel_times(train)}
        if timed:
            sections.append(shape_table(f"{channels}x{size}, batch {batch}", timed))
    return "\n\n".join(sections)


def shape_table(title: str, timed: dict[str, dict[str, float]]) -> str:
    """Markdown: per kernel the default policy's µs, the best µs and the policy that gave it; then the call's total."""
    totals = {name: sum(kernels.values()) for name, kernels in timed.items()}
    lines = [f"{title}: training forward+backward, µs per call (profiler)",
             "| kernel | default | best | best policy |", "| --- | ---: | ---: | --- |"]
    default = timed.get("default", {})
    for kernel in sorted(default, key=lambda k: -default[k]):
        name, micros = min(((policy, kernels[kernel]) for policy, kernels in timed.items() if kernel in kernels),
                           key=lambda row: row[1])
        lines.append(f"| {kernel[:60]} | {default[kernel]:.1f} | {micros:.1f} | {name} |")
    best = min(totals, key=totals.get)
    lines.append(f"| **all kernels** | {totals.get('default', float('nan')):.1f} | {totals[best]:.1f} | {best} |")
    return "\n".join(lines)


def _shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(part) for part in shape.split("x")) for shape in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(shape) != 2 or min(shape) < 1 for shape in shapes):
        raise SystemExit(f"tile_sweep: --shapes expects CxH[,CxH...] of positive ints, got {text!r}")
    return shapes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None, help="default: 64 (2 with --check)")
    parser.add_argument("--shapes", default=None,
                        help="stage shapes CxH (default 1024x14,2048x7; 64x8,512x4 with --check)")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds for the sweep")
    parser.add_argument("--check", action="store_true", help="compare each policy's results with the default's")
    args = parser.parse_args(argv)
    if args.check:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":  # the engine runs on the CPU only in Triton's interpreter, read when kernels are defined
            if "cbam.ops.engines.triton_ops" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
                raise SystemExit("tile_sweep: --check on the CPU needs TRITON_INTERPRET=1 before cbam's Triton "
                                 "engine is imported")
            os.environ["TRITON_INTERPRET"] = "1"
        problems = check(_shapes(args.shapes or "64x8,512x4"), args.batch or 2, device)
        print("\n".join(problems) or f"every policy agrees with the default on {device}")
        return 1 if problems else 0
    if not torch.cuda.is_available():
        print("tile_sweep: the sweep needs a CUDA device (--check runs anywhere)", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}")
    print(sweep(_shapes(args.shapes or "1024x14,2048x7"), args.batch or 64, args.budget))
    return 0


if __name__ == "__main__":
    sys.exit(main())
