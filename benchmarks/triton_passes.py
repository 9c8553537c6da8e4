"""The Triton engine's passes against torch_ops (the same passes in plain torch) and a copy, on CUDA.

    python benchmarks/triton_passes.py [--batch 64] [--dtypes fp32,bf16] [--layout channels_last]

x: (batch, C, S) at the ResNet-50 stage shapes 256x56², 512x28², 1024x14², 2048x7², read as the
(B, C, S) view of a 4-D tensor in the chosen layout. Medians of ``triton.testing.do_bench``
(milliseconds). "vs copy" is the Triton pass over ``x.clone()``; "speed-up" torch_ops over Triton.
The small vectors are float32, as the fused path passes them. ``batch_norm_pool``'s torch peer is
``var_mean`` plus ``pool`` of the BatchNorm's output (torch_ops has no fused one). Needs a CUDA
device (a few minutes, most of it compiling).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

SHAPES = [(256, 56 * 56), (512, 28 * 28), (1024, 14 * 14), (2048, 7 * 7)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def workloads(engine, reference, batch: int, channels: int, positions: int, dtype: torch.dtype, layout: str,
              device: str = "cuda") -> dict[str, tuple[Callable, Callable]]:
    """Each pass as ``(triton call, torch_ops call)`` on random inputs of one shape (``positions`` a square)."""
    side = int(positions**0.5)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format

    def big():
        return torch.randn(batch, channels, side, side, device=device, dtype=dtype).to(memory_format=memory_format)

    x4, grad4, rectified4 = big(), big(), big().relu()
    x, grad, rectified = x4.flatten(2), grad4.flatten(2), rectified4.flatten(2)
    rows, cols = (batch, channels), (batch, positions)
    mc, ms, d_avg, d_max = (torch.rand(*shape, device=device) for shape in (rows, cols, rows, rows))
    d_mean, d_peak = torch.randn(*cols, device=device), torch.randn(*cols, device=device)
    index = torch.randint(0, channels, cols, device=device)
    channel_index = torch.randint(0, positions, rows, device=device)
    weight, bias = torch.randn(channels, device=device), torch.randn(channels, device=device)
    mean, invstd = torch.randn(channels, device=device), torch.rand(channels, device=device) + 0.5
    affine = torch.stack([weight, bias])
    gated, centred = torch.randn(batch, 2, channels, device=device), torch.randn(batch, 2, channels, device=device)
    backward = (grad, x, mc, ms, d_mean, d_peak, index, d_avg, d_max, channel_index)

    def torch_batch_norm_pool():
        var, batch_mean = torch.var_mean(x.float(), dim=(0, 2), unbiased=False)
        return reference.pool(reference.normed(x, affine)), batch_mean, var

    def calls(name, *args):
        return lambda: getattr(engine, name)(*args), lambda: getattr(reference, name)(*args)

    return {
        "pool": calls("pool", x),
        "gated_stats": calls("gated_stats", x, mc),
        "apply": calls("apply", x4, mc, ms),
        "apply + residual": calls("apply", x4, mc, ms, grad4),
        "apply + fold": calls("apply", x4, mc, ms, None, affine),
        "gate_grads": calls("gate_grads", grad, x, mc, ms, None, channel_index),
        "gate_grads + residual": calls("gate_grads", grad, x, mc, ms, rectified, channel_index),
        "gate_grads + fold": calls("gate_grads", grad, x, mc, ms, None, channel_index, affine, mean),
        "stats_grad": calls("stats_grad", x, d_mean, d_peak, index),
        "input_grad": calls("input_grad", *backward),
        "batch_norm_pool": (lambda: engine.batch_norm_pool(x, weight, bias, 1e-5), torch_batch_norm_pool),
        "batch_norm_input_grad": calls("batch_norm_input_grad", *backward, gated, centred, mean, invstd, weight),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, of {', '.join(DTYPES)}")
    parser.add_argument("--layout", choices=["channels_last", "contiguous"], default="channels_last")
    parser.add_argument("--passes", default="", help="comma-separated pass names (default: all)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/triton_passes.py needs a CUDA device; none is available")
    import triton
    from triton.testing import do_bench

    from cbam.ops.engines import torch_ops, triton_ops

    def median_ms(fn: Callable) -> float:
        return do_bench(fn, warmup=25, rep=100, return_mode="median")

    wanted = [name for name in args.passes.split(",") if name]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"batch {args.batch}, {args.layout}\n")
    print("| C x S | dtype | pass | triton ms | torch_ops ms | copy ms | vs copy | speed-up |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for label in args.dtypes.split(","):
        dtype = DTYPES[label]
        for channels, positions in SHAPES:
            passes = workloads(triton_ops, torch_ops, args.batch, channels, positions, dtype, args.layout)
            x = torch.randn(args.batch, channels, positions, device="cuda", dtype=dtype)
            copy = median_ms(x.clone)
            for name, (fast, slow) in passes.items():
                if wanted and name not in wanted:
                    continue
                fast_ms = median_ms(fast)
                try:
                    slow_ms = f"{median_ms(slow):.4f}"
                    ratio = f"{float(slow_ms) / fast_ms:.2f}"
                except RuntimeError as error:  # a torch peer that does not take this dtype mix
                    slow_ms, ratio = f"fails ({str(error).splitlines()[0][:40]})", "-"
                side = int(positions**0.5)
                print(f"| {channels}x{side}² | {label} | {name} | {fast_ms:.4f} | {slow_ms} | {copy:.4f} | "
                      f"{fast_ms / copy:.2f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
