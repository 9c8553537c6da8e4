"""What any attention layer costs in ResNet-50, next to CBAM: a "null" layer that only copies its
input (one read and one write) and saves it for backward, in every Bottleneck where CBAM goes.

    python benchmarks/null_attention.py [--rounds 9]

Batch 8, 224², fp32 CPU. Each round times the models back to back; overheads are medians over
rounds of that round's ratio to the ResNet-50 without attention.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

import cbam
from cbam.models.resnet import Bottleneck
from cbam.profile.benchmark import interleaved_samples


class _CopySavingInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.clone()


class NullAttention(nn.Module):
    """``x -> copy of x``, saving ``x`` for backward like a fused CBAM does."""

    def forward(self, x):
        return _CopySavingInput.apply(x) if torch.is_grad_enabled() else x.clone()


def resnet50_with_null_attention() -> nn.Module:
    model = cbam.models.resnet50(attention=None)
    for block in model.modules():
        if isinstance(block, Bottleneck):
            block.cbam = NullAttention()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(8, 3, 224, 224)
    models = {"none": cbam.models.resnet50(attention=None), "null (copy, input saved)": resnet50_with_null_attention(),
              "cbam fused (auto)": cbam.models.resnet50(attention="cbam", preset="timm")}

    def step(model):
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    def infer(model):
        with torch.no_grad():
            model(x)

    print("| attention | training step overhead | inference overhead |\n| --- | ---: | ---: |")
    found = {}
    for mode, run in [("train", step), ("inference", infer)]:
        for model in models.values():
            model.train(mode == "train")
        samples = interleaved_samples({n: (lambda m=m, run=run: run(m)) for n, m in models.items()}, args.rounds,
                                      warmup=1)
        for name in models:
            found[name, mode] = statistics.median(t / base - 1 for t, base in zip(samples[name], samples["none"]))
    for name in models:
        print(f"| {name} | {found[name, 'train']:+.1%} | {found[name, 'inference']:+.1%} |")


if __name__ == "__main__":
    main()
