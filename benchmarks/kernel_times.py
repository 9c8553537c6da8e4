"""Where a fused CBAM call's GPU time goes: each CUDA kernel's time per call, by ``torch.profiler``.

    python benchmarks/kernel_times.py [--batch 64] [--shapes 256x56,2048x7] [--resnet-batch 128]

On CUDA only. Rows per stage shape (``CBAM(C, preset="timm")``, channels_last, bfloat16 input under
bfloat16 autocast): the kernels of one training forward+backward and of one eval forward, their time
per call in µs (the mean over the profiled calls) and launches per call, the slowest first; then the
kernels of a ``cbam.models.resnet50(preset="timm")`` inference and SGD training step at batch 128, the
slowest first, with the step's wall time against the sum of its kernels' times (the GPU's busy time):
far apart, the step is bound by the host's per-call work, not by the GPU. The host's own time per
step and the times it waits for the GPU in a step (torch's sync debug mode) tell whether that host
work is Python and launches (host time about the wall time, no waits) or a wait for the GPU. It says which
kernel to work on; the module and ResNet tables (``cbam bench --device cuda``) say how much it matters.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
import warnings

import torch

import cbam
from cbam.profile import cuda_bench

CALLS = 5


def kernel_times(step, calls: int = CALLS) -> list[tuple[str, float, float]]:
    """``(kernel, µs per call, launches per call)`` of ``step()`` on CUDA, the slowest first."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as recorded:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    total: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for event in recorded.events():
        if event.device_type.name == "CUDA":
            total[event.name] += event.time_range.elapsed_us()
            count[event.name] += 1
    return sorted(((name, total[name] / calls, count[name] / calls) for name in total), key=lambda row: -row[1])


def table(title: str, rows: list[tuple[str, float, float]], top: int) -> str:
    lines = [f"\n{title}: {sum(row[1] for row in rows):.1f} µs per call in {sum(row[2] for row in rows):g} kernels",
             "| kernel | µs per call | launches |", "| --- | ---: | ---: |"]
    lines += [f"| {name[:90]} | {micros:.1f} | {launches:g} |" for name, micros, launches in rows[:top]]
    return "\n".join(lines)


def module_steps(channels: int, size: int, batch: int):
    """``(training step, eval step)`` of a fused ``CBAM(preset="timm")`` on a bfloat16 channels-last input."""
    module = cbam.CBAM(channels, preset="timm", impl="fused").cuda()
    x = torch.randn(batch, channels, size, size, device="cuda", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn_like(x)

    def train():
        module.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = module(x)
        torch.autograd.grad(out, x, grad)  # no accumulation into x.grad: that add is the caller's, not CBAM's

    def infer():
        module.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            module(x)

    return train, infer


def resnet_steps(batch: int):
    """``(name, set_mode, step)`` for a ``cbam.models.resnet50(preset="timm")`` inference and SGD training step under
    bfloat16 autocast, channels-last, ``cudnn.benchmark`` (the ResNet table's steps, ``cuda_bench``'s)."""
    torch.backends.cudnn.benchmark = True
    model = cbam.models.resnet50(preset="timm").cuda().to(memory_format=torch.channels_last)
    train, infer = cuda_bench.resnet_steps(model, "bf16-autocast", batch=batch, image_size=224, device="cuda")
    return [("inference", model.eval, infer), ("training step", model.train, train)]


def wall_ms(step, steps: int = 10) -> float:
    """The median time of ``step()`` in ms (``cuda_bench.step_times``), after three warm-up steps."""
    for _ in range(3):
        step()
    return statistics.median(cuda_bench.step_times(step, steps, cuda=True))


def host_ms(step, steps: int = 10) -> float:
    """The median time the host spends in ``step()`` in ms, from an idle GPU until the call returns (its
    kernels may still run): about the wall time where the host bounds the step."""
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - start))
    torch.cuda.synchronize()
    return statistics.median(times)


def host_syncs(step) -> int:
    """How often one ``step()`` makes the host wait for the GPU, as torch reports it
    (``torch.cuda.set_sync_debug_mode("warn")``: one warning per synchronising operation)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(warning.message) for warning in caught)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shapes", default="256x56,512x28,1024x14,2048x7", help="stage shapes, CxH")
    parser.add_argument("--resnet-batch", type=int, default=128, help="0: no ResNet-50 rows")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_times: needs a CUDA device", file=sys.stderr)
        return 2
    engine = cbam.ops.engine_for(torch.empty(1, 8, 2, 2, device="cuda"))
    print(f"{torch.cuda.get_device_name()}: torch {torch.__version__}; engine {engine}")
    for shape in args.shapes.split(","):
        channels, size = map(int, shape.split("x"))
        train, infer = module_steps(channels, size, args.batch)
        print(table(f"{shape}, batch {args.batch}, training forward+backward", kernel_times(train), args.top))
        print(table(f"{shape}, batch {args.batch}, eval forward", kernel_times(infer), args.top))
        sys.stdout.flush()
    if args.resnet_batch:
        for name, set_mode, step in resnet_steps(args.resnet_batch):
            set_mode()
            rows = kernel_times(step, 3)
            busy, wall = sum(row[1] for row in rows) / 1000, wall_ms(step)
            print(table(f"ResNet-50 (preset timm), batch {args.resnet_batch}, bf16 autocast {name}: wall {wall:.1f} ms "
                        f"per step, its kernels {busy:.1f} ms ({busy / wall:.0%}; well below 100%: bound by the host), "
                        f"the host's own {host_ms(step):.1f} ms, {host_syncs(step)} waits for the GPU",
                        rows, 2 * args.top))
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
