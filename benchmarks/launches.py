"""How many kernels one CBAM call launches, forward and backward: what bounds it on a GPU at small shapes.

    python benchmarks/launches.py [--channels 1024] [--size 14] [--batch 2]

On CUDA: the kernels ``torch.profiler`` records on the device (every aten kernel, cuBLAS/cuDNN call
and Triton kernel). Without a GPU: the operators that reach torch's dispatcher and would launch work
(views and allocations left out; one operator may be more than one kernel on a GPU, e.g. a cuDNN
conv backward) plus the Triton kernels the interpreter runs (``TRITON_INTERPRET=1``), counted apart.
Rows: timm's ``CbamModule``, ``CBAM(impl="reference")`` and ``CBAM(impl="fused")`` on the torch and
Triton engines, with ``preset="timm"`` (a spatial BatchNorm), in training and in eval mode; at 1024
channels also a ResNet-50 bottleneck block (the third stage's second) plain and with CBAM.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit decorates the kernels

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import cbam  # noqa: E402
from cbam.ops import engines  # noqa: E402

SILENT = ("view", "_unsafe_view", "reshape", "t", "transpose", "permute", "unsqueeze", "squeeze", "expand", "detach",
          "alias", "as_strided", "select", "slice", "split", "split_with_sizes", "unbind", "empty", "empty_like",
          "new_empty", "empty_strided", "lift_fresh")


class Counts(TorchDispatchMode):
    """Operators dispatched that launch work, and Triton kernels run by the interpreter."""

    def __init__(self):
        super().__init__()
        self.operators: collections.Counter[str] = collections.Counter()
        self.triton = 0
        self._in_kernel = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self._in_kernel and name not in SILENT:
            self.operators[name] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def triton_kernels(self):
        """Count the interpreter's kernel runs (and not the copies it makes to run them)."""
        from triton.runtime import interpreter

        run = interpreter.InterpretedFunction.run

        def counted(function, *args, **kwargs):
            self.triton += 1
            self._in_kernel = True
            try:
                return run(function, *args, **kwargs)
            finally:
                self._in_kernel = False

        interpreter.InterpretedFunction.run = counted
        try:
            yield self
        finally:
            interpreter.InterpretedFunction.run = run


def cpu_counts(module, x: torch.Tensor) -> list[str]:
    """``[forward, backward]`` as "operators + Triton kernels" on the CPU."""
    found = []
    out = None
    for phase in ("forward", "backward"):
        counts = Counts()
        with counts.triton_kernels(), counts:
            if phase == "forward":
                out = module(x)
            else:
                out.backward(torch.ones_like(out))
        found.append(f"{sum(counts.operators.values())} + {counts.triton}")
    return found


def cuda_counts(module, x: torch.Tensor) -> list[str]:
    """``[forward, backward]`` as the CUDA kernels the profiler records."""
    from torch.profiler import ProfilerActivity, profile

    found = []
    out = None
    for phase in ("forward", "backward"):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as recorded:
            if phase == "forward":
                out = module(x)
            else:
                out.backward(torch.ones_like(out))
            torch.cuda.synchronize()
        found.append(str(sum(1 for event in recorded.events() if event.device_type.name == "CUDA")))
    return found


def modules(channels: int, device: str):
    """``(name, engine or None, module)`` rows."""
    from timm.layers.cbam import CbamModule

    rows = [("timm CbamModule", None, CbamModule(channels)),
            ("cbam reference", None, cbam.CBAM(channels, preset="timm", impl="reference"))]
    for engine in ("torch", "triton"):
        rows.append((f"cbam fused, {engine} engine", engine, cbam.CBAM(channels, preset="timm", impl="fused")))
    return [(name, engine, module.to(device)) for name, engine, module in rows]


def blocks(channels: int, device: str):
    """``(name, engine or None, block)`` rows: ResNet-50's second bottleneck of its third stage, plain and
    with CBAM (whose fused call also takes the block's last BatchNorm, the addition and the ReLU)."""
    rows = [("ResNet-50 bottleneck, plain", None, cbam.models.resnet50(attention=None).layer3[1]),
            ("ResNet-50 bottleneck + CBAM, reference", None,
             cbam.models.resnet50(preset="timm", impl="reference").layer3[1])]
    for engine in ("torch", "triton"):
        rows.append((f"ResNet-50 bottleneck + CBAM, fused, {engine} engine", engine,
                     cbam.models.resnet50(preset="timm").layer3[1]))
    return [(name, engine, block.to(device)) for name, engine, block in rows if block.conv1.in_channels == channels]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=1024, help="1024 adds ResNet-50's bottleneck blocks")
    parser.add_argument("--size", type=int, default=14)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    count = cuda_counts if device == "cuda" else cpu_counts
    unit = "CUDA kernels" if device == "cuda" else "operators + Triton kernels"
    print(f"{unit} per CBAM call, x {args.batch}x{args.channels}x{args.size}x{args.size} float32 on {device}, "
          f"torch {torch.__version__}\n")
    print("| module | mode | forward | backward |\n| --- | --- | ---: | ---: |")
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=device, requires_grad=True)
    rows = modules(args.channels, device)
    if args.channels == 1024:
        rows += blocks(args.channels, device)
    for name, engine, module in rows:
        for training in (True, False):
            module.train(training)
            with engines.using(engine) if engine else contextlib.nullcontext():
                module(x).sum().backward()  # warm-up: compiles, creates .grad
                forward, backward = count(module, x)
            print(f"| {name} | {'train' if training else 'eval'} | {forward} | {backward} |")


if __name__ == "__main__":
    main()
