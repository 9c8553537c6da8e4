"""The fused CBAM's large-tensor passes on three engines: eager torch ops, ``torch.compile`` of those
same functions (``dynamic=True``), and the C++ extension; next to a copy, in one run.

    python benchmarks/compiled_passes.py [--repeats 15]

x: (8, 256, 56*56) fp32 and (8, 2048, 7*7). Compilation time (first call per function) is reported
apart from the medians of interleaved repeats.
"""

from __future__ import annotations

import argparse
import time

import torch

from cbam.ops.engines import cpp, torch_ops
from cbam.profile.benchmark import interleaved_medians

PASSES = ["pool", "gated_stats", "apply", "gate_grads", "stats_grad", "input_grad"]


def arguments(batch: int, channels: int, positions: int) -> dict[str, tuple]:
    torch.manual_seed(0)
    x, g = torch.randn(batch, channels, positions), torch.randn(batch, channels, positions)
    mc, ms = torch.rand(batch, channels), torch.rand(batch, positions)
    d_mean, d_peak = torch.randn(batch, positions), torch.randn(batch, positions)
    index = torch.randint(0, channels, (batch, positions))
    channel_index = torch.randint(0, positions, (batch, channels))
    d_avg, d_max = torch.randn(batch, channels), torch.randn(batch, channels)
    return {"pool": (x,), "gated_stats": (x, mc), "apply": (x, mc, ms, None),
            "gate_grads": (g, x, mc, ms, None, channel_index), "stats_grad": (x, d_mean, d_peak, index),
            "input_grad": (g, x, mc, ms, d_mean, d_peak, index, d_avg, d_max, channel_index)}


def _call(function, inputs: tuple):
    return lambda: function(*inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    native = cpp.engine()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| x (B, C, S) | pass | eager ms | torch.compile ms | C++ ms | compile s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for shape in [(8, 256, 56 * 56), (8, 2048, 7 * 7)]:
        inputs = arguments(*shape)
        x, target = inputs["pool"][0], torch.empty(shape)
        copy = interleaved_medians({"copy": lambda x=x, target=target: target.copy_(x)}, args.repeats)["copy"]
        for name in PASSES:
            eager = getattr(torch_ops, name)
            compiled = torch.compile(eager, dynamic=True)
            start = time.perf_counter()
            compiled(*inputs[name])
            compile_seconds = time.perf_counter() - start
            engines = {"eager": eager, "compiled": compiled}
            if native is not None:
                engines["C++"] = getattr(native, name)
            found = interleaved_medians({key: _call(f, inputs[name]) for key, f in engines.items()}, args.repeats)
            native_ms = f"{1e3 * found['C++']:.2f}" if "C++" in found else "n/a"
            print(f"| {shape} | {name} | {1e3 * found['eager']:.2f} | {1e3 * found['compiled']:.2f} | {native_ms} | "
                  f"{compile_seconds:.1f} |")
        print(f"| {shape} | copy (read + write) | {1e3 * copy:.2f} | | | |")


if __name__ == "__main__":
    main()
