"""The fused CBAM against timm's CbamModule, our reference path and a plain copy, in one run.

    python benchmarks/fused.py [--repeats 15] [--compile] [--skip-resnet]

fp32, CPU, batch 8, ResNet-50 stage shapes. Forward: eval mode, no autograd. Forward+backward:
train mode, gradient for the input and the weights. Medians of interleaved repeats. "saved" is
the bytes autograd keeps for backward over the input's bytes. Then CBAM's overhead in our
ResNet-50 (batch 8, 224x224) over ``attention=None``, per training step and in inference.
"""

from __future__ import annotations

import argparse
import math
import os
import platform

import torch
from timing import interleaved_medians
from timm.layers.cbam import CbamModule

import cbam
from cbam.convert import from_timm
from cbam.ops import cpu_extension, fused, torch_passes
from cbam.profile.benchmark import saved_bytes

SHAPES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]


class TorchPassesCBAM(cbam.CBAM):
    """impl="fused" on the plain-torch engine, for the engine comparison."""

    def forward(self, x):
        engine = fused._engine
        fused._engine = lambda x: torch_passes
        try:
            return super().forward(x)
        finally:
            fused._engine = engine


def peers(channels: int, compile_reference: bool) -> dict[str, torch.nn.Module]:
    theirs = CbamModule(channels)
    state = from_timm(theirs.state_dict())
    found = {"timm CbamModule": theirs}
    for name, build in [("cbam reference", lambda: cbam.CBAM(channels, preset="timm", impl="reference")),
                        ("cbam fused, torch ops", lambda: TorchPassesCBAM(channels, preset="timm", impl="fused")),
                        ("cbam fused, C++", lambda: cbam.CBAM(channels, preset="timm", impl="fused"))]:
        found[name] = build()
        found[name].load_state_dict(state)
    if compile_reference:
        found["torch.compile(reference)"] = torch.compile(found["cbam reference"], dynamic=False)
    return found


def module_table(batch: int, repeats: int, compile_reference: bool) -> None:
    ratios = {}
    print("| shape C×H² | module | forward ms | × timm | × copy | fwd+bwd ms | × timm | × copy | saved / input |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for channels, side in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(batch, channels, side, side)
        leaf = x.clone().requires_grad_()
        modules = peers(channels, compile_reference)

        def forward(module, x=x):
            def run():
                with torch.no_grad():
                    module(x)
            return run

        def forward_backward(module, leaf=leaf):
            return lambda: module(leaf).sum().backward()

        for module in modules.values():
            module.eval()
        target = torch.empty_like(x)
        copy = {"copy": lambda x=x, target=target: target.copy_(x)}  # one read + one write of x
        fwd = interleaved_medians({**copy, **{n: forward(m) for n, m in modules.items()}}, repeats)
        for module in modules.values():
            module.train()
        fwd_bwd = interleaved_medians({n: forward_backward(m) for n, m in modules.items()}, max(3, repeats // 2))
        for name, module in modules.items():
            saved = "" if name.startswith("torch.compile") else f"{saved_bytes(module, x) / (x.numel() * 4):.2f}"
            f_t, fb_t = fwd["timm CbamModule"] / fwd[name], fwd_bwd["timm CbamModule"] / fwd_bwd[name]
            ratios.setdefault(name, []).append((f_t, fb_t))
            print(f"| {channels}×{side}² | {name} | {1e3 * fwd[name]:.2f} | {f_t:.2f} | "
                  f"{fwd[name] / fwd['copy']:.1f} | {1e3 * fwd_bwd[name]:.1f} | {fb_t:.2f} | "
                  f"{fwd_bwd[name] / fwd['copy']:.1f} | {saved} |")
        print(f"| {channels}×{side}² | copy | {1e3 * fwd['copy']:.2f} | | 1.0 | | | | |")
    print("\nGeometric mean speed-up over timm (forward, forward+backward):")
    for name, pairs in ratios.items():
        geo = [math.exp(sum(math.log(p[i]) for p in pairs) / len(pairs)) for i in (0, 1)]
        print(f"- {name}: {geo[0]:.2f}×, {geo[1]:.2f}×")


def resnet_overhead(batch: int, repeats: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 224, 224)
    models = {"none": cbam.models.resnet50(attention=None),
              "cbam fused (auto)": cbam.models.resnet50(attention="cbam", preset="timm"),
              "cbam reference": cbam.models.resnet50(attention="cbam", preset="timm", impl="reference")}

    def step(model):
        return lambda: model(x).sum().backward()

    def infer(model):
        def run():
            with torch.no_grad():
                model(x)
        return run

    for model in models.values():
        model.train()
    train = interleaved_medians({n: step(m) for n, m in models.items()}, repeats, warmup=1)
    for model in models.values():
        model.eval()
    inference = interleaved_medians({n: infer(m) for n, m in models.items()}, repeats, warmup=1)
    print(f"\nResNet-50, batch {batch}, 224²: time per training step (forward+backward) and per inference")
    print("| attention | train s | overhead | inference s | overhead |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in models:
        print(f"| {name} | {train[name]:.3f} | {train[name] / train['none'] - 1:+.1%} | "
              f"{inference[name]:.3f} | {inference[name] / inference['none'] - 1:+.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the reference")
    parser.add_argument("--skip-resnet", action="store_true")
    args = parser.parse_args()
    if cpu_extension.engine() is None:
        raise SystemExit("the C++ engine did not build; install the 'fast' extra (ninja) and a C++ compiler")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{platform.machine()}\n")
    module_table(args.batch, args.repeats, args.compile)
    if not args.skip_resnet:
        resnet_overhead(args.batch, max(3, args.repeats // 3))


if __name__ == "__main__":
    main()
