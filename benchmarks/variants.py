"""Cost of the CBAM variants: parameters, FLOPs and latency at ResNet-50 stage shapes, in one run.

    python benchmarks/variants.py [--repeats 15] [--batch 8]

Latency is the median over interleaved repeats (every variant once per round, so drift hits all
alike), fp32 on the CPU: forward in eval mode without autograd, forward+backward in train mode
with a gradient for the input, each variant on its default implementation. FLOPs come from
torch's FlopCounterMode (convolutions and matrix products, a multiply-add counting 2); pooling
and the elementwise gating are not in them.
Ratios are against the paper's CBAM (7x7 full conv) measured in the same run.
"""

from __future__ import annotations

import argparse
import platform

import torch
from torch.utils.flop_counter import FlopCounterMode

import cbam
from cbam.profile.benchmark import interleaved_medians

SHAPES = [(256, 56), (1024, 14)]  # (channels, side): ResNet-50's first and third stages


def variants(channels: int) -> dict[str, torch.nn.Module]:
    return {
        "CBAM 7x7 (paper)": cbam.CBAM(channels),
        "CBAM 3x3": cbam.CBAM(channels, kernel_size=3),
        "CBAM 7x7 factorized": cbam.CBAM(channels, spatial_conv="factorized"),
        "CBAM 7x7 separable": cbam.CBAM(channels, spatial_conv="separable"),
        "ParallelCBAM 7x7": cbam.ParallelCBAM(channels),
        "LightCBAM 7x7": cbam.LightCBAM(channels),
        "DynamicCBAM (3,5,7)": cbam.DynamicCBAM(channels),
    }


def forward(module: torch.nn.Module, x: torch.Tensor):
    def run():
        with torch.no_grad():
            module(x)
    return run


def forward_backward(module: torch.nn.Module, x: torch.Tensor):
    leaf = x.clone().requires_grad_()

    def run():
        module(leaf).sum().backward()
    return run


def flops(module: torch.nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return counter.get_total_flops()


def measure(batch: int, channels: int, side: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(batch, channels, side, side)
    modules = variants(channels)
    for module in modules.values():
        module.eval()
    fwd = interleaved_medians({name: forward(m, x) for name, m in modules.items()}, repeats)
    for module in modules.values():
        module.train()
    fwd_bwd = interleaved_medians({name: forward_backward(m, x) for name, m in modules.items()}, repeats)
    return [{
        "variant": name,
        "params": sum(p.numel() for p in module.parameters()),
        "flops": flops(module.eval(), x),
        "forward_ms": 1e3 * fwd[name],
        "forward_backward_ms": 1e3 * fwd_bwd[name],
    } for name, module in modules.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    for channels, side in SHAPES:
        rows = measure(args.batch, channels, side, args.repeats)
        base = rows[0]
        print(f"\n### x = ({args.batch}, {channels}, {side}, {side})\n")
        print("| variant | params | MFLOPs | forward ms | ratio | fwd+bwd ms | ratio |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for row in rows:
            print(f"| {row['variant']} | {row['params']:,} | {row['flops'] / 1e6:.1f} | {row['forward_ms']:.2f} | "
                  f"{row['forward_ms'] / base['forward_ms']:.2f} | {row['forward_backward_ms']:.2f} | "
                  f"{row['forward_backward_ms'] / base['forward_backward_ms']:.2f} |")


if __name__ == "__main__":
    main()
