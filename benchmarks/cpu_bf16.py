"""CBAM under CPU bfloat16 autocast: timm's CbamModule, our reference and the fused path (``impl="fused"``: the
C++ engine reading the bfloat16 input as stored), against a copy of that input, in one run.

    python benchmarks/cpu_bf16.py [--repeats 15] [--batch 8] [--channels-last]

bfloat16 input (what a conv returns under CPU autocast), ResNet-50 stage shapes. Forward: eval mode,
``inference_mode``. Forward+backward: train mode, gradients for the input and the weights. Medians of
interleaved repeats, in ms, and each path's time over the reference's.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import cbam
from cbam.profile.benchmark import interleaved_samples

SHAPES = ((256, 56), (512, 28), (1024, 14), (2048, 7))


def _modules(channels: int) -> dict[str, torch.nn.Module]:
    from timm.layers.cbam import CbamModule

    torch.manual_seed(0)
    fused = cbam.CBAM(channels, preset="timm", impl="fused")
    reference = cbam.CBAM(channels, preset="timm", impl="reference")
    reference.load_state_dict(fused.state_dict())
    return {"timm": CbamModule(channels), "reference": reference, "fused": fused}


def _row(channels: int, side: int, batch: int, repeats: int, channels_last: bool, train: bool) -> dict[str, float]:
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, channels, side, side).bfloat16().contiguous(memory_format=layout)
    modules = _modules(channels)
    for module in modules.values():
        module.train(train)

    def forward(module):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode():
                module(x)
        return run

    def forward_backward(module):
        leaf = x.detach().requires_grad_()

        def run():
            module.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = module(leaf)
            out.float().sum().backward()
        return run

    runs = {name: (forward_backward if train else forward)(module) for name, module in modules.items()}
    runs["copy"] = lambda: x.clone()
    return {name: statistics.median(times) * 1e3 for name, times in interleaved_samples(runs, repeats).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    print(f"CPU bfloat16 autocast, batch {args.batch}, {'channels-last' if args.channels_last else 'contiguous'}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; ms (time / reference's)")
    print("| pass | C x H² | copy | timm | reference | fused |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for train in (False, True):
        for channels, side in SHAPES:
            ms = _row(channels, side, args.batch, args.repeats, args.channels_last, train)
            cells = " | ".join(f"{ms[name]:.2f} ({ms[name] / ms['reference']:.2f}×)"
                               for name in ("copy", "timm", "reference", "fused"))
            print(f"| {'fwd+bwd' if train else 'forward'} | {channels}×{side}² | {cells} |", flush=True)


if __name__ == "__main__":
    main()
