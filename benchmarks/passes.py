"""Each large-tensor pass of the fused CBAM, C++ vs plain torch, next to a copy; then one CBAM forward.

    python benchmarks/passes.py
    MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000 python benchmarks/passes.py

x: (8, 256, 56*56) fp32. The second command keeps glibc from returning freed 25 MB blocks to the OS,
which shows how much of a forward is page faults on freshly allocated outputs.
"""

from __future__ import annotations

import torch
from timm.layers.cbam import CbamModule

import cbam
from cbam.ops import cpu_extension, torch_passes
from cbam.profile.benchmark import interleaved_medians


def main() -> None:
    compiled = cpu_extension.engine()
    if compiled is None:
        raise SystemExit("the C++ engine did not build; install the 'fast' extra (ninja) and a C++ compiler")
    torch.manual_seed(0)
    B, C, S = 8, 256, 56 * 56
    x, g, target = torch.randn(B, C, S), torch.randn(B, C, S), torch.empty(B, C, S)
    mc, ms = torch.rand(B, C), torch.rand(B, S)
    d_mean, d_peak, index = torch.randn(B, S), torch.randn(B, S), torch.randint(0, C, (B, S))
    d_avg, d_max, channel_index = torch.randn(B, C), torch.randn(B, C), torch.randint(0, S, (B, C))
    calls = {
        "pool": (x,), "gated_stats": (x, mc), "apply": (x, mc, ms), "gate_grads": (g, x, mc, ms),
        "stats_grad": (x, d_mean, d_peak, index),
        "input_grad": (g, x, mc, ms, d_mean, d_peak, index, d_avg, d_max, channel_index),
    }
    runs = {"copy": lambda: target.copy_(x)}
    for name, args in calls.items():
        runs[f"{name} C++"] = lambda name=name, args=args: getattr(compiled, name)(*args)
        runs[f"{name} torch"] = lambda name=name, args=args: getattr(torch_passes, name)(*args)
    for name, seconds in interleaved_medians(runs, repeats=9).items():
        print(f"{name:<18} {1e3 * seconds:6.2f} ms")

    image = x.view(B, C, 56, 56)
    ours, theirs = cbam.CBAM(C, preset="timm").eval(), CbamModule(C).eval()

    def forward(module):
        def run():
            with torch.no_grad():
                module(image)
        return run

    for name, seconds in interleaved_medians({"CBAM forward (fused)": forward(ours),
                                              "timm forward": forward(theirs)}, repeats=9).items():
        print(f"{name:<22} {1e3 * seconds:6.2f} ms")


if __name__ == "__main__":
    main()
