"""The tutorial's 7x7 vs 3x3 trade-off in numbers that do not depend on the machine's load.

    python benchmarks/kernel_size.py

Parameters, FLOPs (``cbam.profile.cost``: a multiply-add = 2; conv/matmul and CBAM's elementwise
work) and bytes saved for backward, for both implementations, at two ResNet-50 stage shapes. The
latency side of the trade-off is in ``benchmarks/variants.py``.
"""

from __future__ import annotations

import torch

import cbam
from cbam.profile import cost
from cbam.profile.benchmark import saved_bytes


def main() -> None:
    torch.manual_seed(0)
    print("| input | kernel | params | FLOPs | of which conv/matmul | saved MiB: reference / fused |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for channels, side in [(256, 56), (1024, 14)]:
        x = torch.randn(8, channels, side, side)
        for kernel in (7, 3):
            report = cost(cbam.CBAM(channels, kernel_size=kernel), x)
            saved = [saved_bytes(cbam.CBAM(channels, kernel_size=kernel, impl=impl).train(), x) / 2**20
                     for impl in ("reference", "fused")]
            print(f"| (8, {channels}, {side}, {side}) | {kernel} | {report.params:,} | {report.flops / 1e6:.2f} M | "
                  f"{report.conv_matmul_flops / 1e6:.2f} M | {saved[0]:.2f} / {saved[1]:.2f} |")


if __name__ == "__main__":
    main()
