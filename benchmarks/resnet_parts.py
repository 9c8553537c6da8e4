"""Where a ResNet-50 inference spends its time, block part by block part, with and without CBAM
(batch 8, 224², fp32 CPU, no autograd): each Bottleneck's ``conv1+bn1+relu``, ``conv2+bn2+relu``,
``conv3`` and tail (BatchNorm, CBAM, shortcut, addition, ReLU), summed per stage, with the page
faults each part took, medians over interleaved rounds:

    python benchmarks/resnet_parts.py --rounds 15

The tail is where CBAM adds work; the other parts run the same layers in both models, so a
difference there is the machine (caches, memory the allocator handed back and re-faults).
"""

from __future__ import annotations

import argparse
import collections
import resource
import statistics
import time

import torch

import cbam
from cbam.models.resnet import Bottleneck
from cbam.profile.benchmark import interleaved_samples

PARTS = ("conv1+bn1+relu", "conv2+bn2+relu", "conv3", "tail")


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class _Meter:
    """Seconds and page faults per (stage channels, part) of one forward, from a patched Bottleneck."""

    def __init__(self):
        self.seconds, self.faults = collections.Counter(), collections.Counter()

    def forward(self, block: Bottleneck, x: torch.Tensor) -> torch.Tensor:
        steps = (lambda t: block.relu(block.bn1(block.conv1(t))), lambda t: block.relu(block.bn2(block.conv2(t))),
                 block.conv3, lambda t: block._residual(t, block.conv3, block.bn3, x))
        out = x
        for part, step in zip(PARTS, steps):
            faults, start = _faults(), time.perf_counter()
            out = step(out)
            key = (block.conv3.out_channels, part)
            self.seconds[key] += time.perf_counter() - start
            self.faults[key] += _faults() - faults
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(8, 3, 224, 224)
    models = {"none": cbam.models.resnet50(attention=None).eval(),
              "cbam": cbam.models.resnet50(attention="cbam", preset="timm").eval()}
    meter, found = _Meter(), {name: collections.defaultdict(list) for name in models}
    Bottleneck.forward = lambda block, x: meter.forward(block, x)  # in this process: blocks report their parts

    def run(name: str) -> None:
        meter.seconds.clear()
        meter.faults.clear()
        with torch.no_grad():
            models[name](x)
        for key in meter.seconds:
            found[name][key].append((meter.seconds[key], meter.faults[key]))

    totals = interleaved_samples({name: (lambda name=name: run(name)) for name in models}, args.rounds, warmup=1)
    print("| stage (block C) | part | none ms | cbam ms | difference ms | none faults | cbam faults |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for key in found["none"]:
        none, with_cbam = ([statistics.median(v[i] for v in found[name][key]) for i in (0, 1)] for name in models)
        print(f"| {key[0]} | {key[1]} | {none[0] * 1e3:.2f} | {with_cbam[0] * 1e3:.2f} | "
              f"{(with_cbam[0] - none[0]) * 1e3:+.2f} | {none[1]:.0f} | {with_cbam[1]:.0f} |")
    none, with_cbam = (statistics.median(totals[name]) for name in models)
    ratio = statistics.median(c / n - 1 for c, n in zip(totals["cbam"], totals["none"]))
    print(f"\nwhole inference: none {none * 1e3:.1f} ms, cbam {with_cbam * 1e3:.1f} ms, overhead {ratio:+.1%} "
          f"(median of per-round ratios)")


if __name__ == "__main__":
    main()
