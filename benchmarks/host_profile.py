"""Where an eager CBAM call's host time goes, function by function (``cProfile``), ours against timm's.

    python benchmarks/host_profile.py [--shape 256x56] [--batch 64] [--calls 20] [--top 15]

On CUDA: ``CBAM(C, preset="timm")`` fused and timm's ``CbamModule``, a bfloat16 channels-last input under
bfloat16 autocast, one training forward+backward and one eval forward per call. Without a GPU: the same
calls on a tiny input (2×64×4×4, one thread) with our kernels launched through Triton's own host path
for an H100 (``cbam.profile.triton_host``; the kernels never run).

Per row: the host's time per call without the profiler (the calls only enqueued: the GPU is waited for
after the clock stops), then the profiled time per call split by where it is spent — Triton's launch
path (its Python, its specialisation and its launcher), torch's autograd engine, torch's operators, our
own Python, the rest — and the functions that cost most. The profiler's own cost inflates each
function call by a similar amount, so read the split as shares, not as absolute times.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import pstats
import time

import torch
from torch import nn

import cbam
from cbam.ops import engines

TINY = (2, 64, 4, 4)


def origin(filename: str, function: str) -> str:
    """The part of the host path a profiled function belongs to (``pstats``' file name and function)."""
    where = f"{filename} {function}"
    if "/cbam/" in filename and not filename.endswith("/triton_ops/launch.py"):
        return "cbam Python"
    if "triton" in where:
        return "Triton launch path"
    if "run_backward" in function or "/torch/autograd/" in filename:
        return "autograd engine"
    if "/cbam/" in filename:
        return "cbam Python"
    if filename == "~" and "torch" in function:
        return "torch operators"
    if "/timm/" in filename or "/torch/nn/" in filename:
        return "module Python (torch.nn, timm)"
    return "other"


def profile_calls(call, calls: int) -> pstats.Stats:
    """The ``cProfile`` statistics of ``calls`` calls of ``call()``."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        call()
    profiler.disable()
    return pstats.Stats(profiler)


def split(stats: pstats.Stats, calls: int) -> dict[str, float]:
    """``{origin: µs of own time per call}`` from ``stats`` of ``calls`` calls."""
    found: dict[str, float] = {}
    for (filename, _, function), (_, _, own, _, _) in stats.stats.items():
        key = origin(filename, function)
        found[key] = found.get(key, 0.0) + own / calls * 1e6
    return found


def top_functions(stats: pstats.Stats, calls: int, top: int) -> list[tuple[str, float, float]]:
    """``(function, times called per call, µs of own time per call)``, the costliest ``top`` first."""
    rows = [(f"{filename.rsplit('/', 2)[-1] if filename != '~' else ''}:{line} {function}".strip(':0 '),
             count / calls, own / calls * 1e6)
            for (filename, line, function), (_, count, own, _, _) in stats.stats.items()]
    return sorted(rows, key=lambda row: -row[2])[:top]


def host_micros(call, calls: int, wait) -> float:
    """The host's time per call of ``calls`` calls in µs, ``wait()`` (for the GPU) left out of the clock."""
    wait()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    micros = (time.perf_counter() - start) / calls * 1e6
    wait()
    return micros


def calls_on(module: nn.Module, x: torch.Tensor, autocast: bool):
    """``{mode: call}``: a training forward+backward of ``module`` on ``x`` and an eval forward of its copy."""
    grad = torch.randn_like(x)
    cast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    trained, evaluated = module.train(), copy.deepcopy(module).eval()

    def train():
        with cast():
            out = trained(x)
        torch.autograd.grad(out, x, grad)

    def infer():
        with torch.no_grad(), cast():
            evaluated(x)

    return {"training": train, "eval": infer}


def rows(shape: tuple[int, ...], device: str) -> dict[str, object]:
    """``{row name: call}`` for timm's module and ours, training and eval."""
    from timm.layers.cbam import CbamModule

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    found = {}
    for name, module in (("timm CbamModule", CbamModule(shape[1])),
                         ("cbam fused", cbam.CBAM(shape[1], preset="timm", impl="fused"))):
        for mode, call in calls_on(module.to(device), x, autocast=device == "cuda").items():
            found[f"{name}, {mode}"] = call
    return found


def report(found: dict[str, object], calls: int, top: int, wait) -> str:
    """The markdown tables: the split per row, then each row's costliest functions."""
    splits, tops, hosts = {}, {}, {}
    for name, call in found.items():
        for _ in range(3):
            call()  # warm-up: compiles, caches, allocator
        hosts[name] = host_micros(call, calls, wait)
        stats = profile_calls(call, calls)
        wait()
        splits[name], tops[name] = split(stats, calls), top_functions(stats, calls, top)
    origins = sorted({key for found in splits.values() for key in found})
    lines = ["| call | host µs per call | profiled µs per call | " + " | ".join(origins) + " |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in origins) + " |"]
    for name, parts in splits.items():
        total = sum(parts.values())
        shares = " | ".join(f"{100 * parts.get(key, 0.0) / total:.0f}%" for key in origins)
        lines.append(f"| {name} | {hosts[name]:.1f} | {total:.1f} | {shares} |")
    for name, functions in tops.items():
        lines += ["", f"{name}: the costliest functions (own time)", "| function | calls per call | µs per call |",
                  "| --- | ---: | ---: |"]
        lines += [f"| `{function[:100]}` | {count:g} | {micros:.1f} |" for function, count, micros in functions]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="256x56", help="CxH on CUDA (the CPU uses 2x64x4x4)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        channels, size = map(int, args.shape.split("x"))
        shape, device, wait = (args.batch, channels, size, size), "cuda", torch.cuda.synchronize
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 autocast, {shape}")
        print(report(rows(shape, device), args.calls, args.top, wait))
        return
    from cbam.profile.triton_host import launch_path_without_gpu

    torch.set_num_threads(1)
    with launch_path_without_gpu(), engines.using("triton"):
        print(f"no GPU: Triton's launch path for an H100 on the CPU, torch {torch.__version__}, {TINY}, 1 thread")
        print(report(rows(TINY, "cpu"), args.calls, args.top, lambda: None))


if __name__ == "__main__":
    main()
