"""The fused CBAM against timm's CbamModule, our reference path and a plain copy, in one run.

    python benchmarks/fused.py [--repeats 15] [--batch 8] [--compile] [--skip-resnet] [--channels-last]

fp32, CPU, batch 8, ResNet-50 stage shapes. Forward: eval mode, no autograd. Forward+backward:
train mode, gradient for the input and the weights. Medians of interleaved repeats. "saved" is
the bytes autograd keeps for backward over the input's bytes. Then CBAM's overhead in our
ResNet-50 (batch 8, 224x224) over ``attention=None``, per training step and in inference.
The work is ``cbam.profile.fused_bench``, shared with ``cbam bench``.
"""

from __future__ import annotations

import argparse

from cbam.profile import fused_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the reference")
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--channels-last", action="store_true", help="inputs and networks channels-last")
    args = parser.parse_args()
    print(fused_bench.run(args.batch, args.repeats, resnet=not args.skip_resnet, compile_reference=args.compile,
                          channels_last=args.channels_last))


if __name__ == "__main__":
    main()
