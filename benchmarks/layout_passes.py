"""Each C++ pass on a contiguous ``x`` against the same pass on a channels-last ``x``, in one run.

    python benchmarks/layout_passes.py [--shape 8x512x28] [--repeats 15]

fp32, ``x: (B, C, H*H)``; the channels-last copy holds the same values with strides ``(S C, 1, C)``.
Medians of interleaved repeats, in ms, and channels-last over contiguous. The passes with a folded
BatchNorm (``input_affine``, ``centre``) are the ones a ResNet block's training step runs.
"""

from __future__ import annotations

import argparse

import torch

from cbam.ops.engines import cpp
from cbam.profile.benchmark import interleaved_medians


def calls(passes, tensors: dict[str, torch.Tensor], small: dict[str, torch.Tensor]) -> dict:
    """Each pass on the large tensors of ``tensors`` (``x``, ``g``, ``rectified``) and the vectors of ``small``."""
    x, g, rectified = tensors["x"], tensors["g"], tensors["rectified"]
    v = small
    gradients = (g, x, v["mc"], v["ms"], v["d_mean"], v["d_peak"], v["index"], v["d_avg"], v["d_max"],
                 v["channel_index"])
    return {
        "pool": lambda: passes.pool(x),
        "gated_stats": lambda: passes.gated_stats(x, v["mc"]),
        "batch_norm_pool": lambda: passes.batch_norm_pool(x, v["weight"], v["bias"], 1e-5),
        "gate_grads": lambda: passes.gate_grads(g, x, v["mc"], v["ms"], None, v["channel_index"]),
        "gate_grads, tail and fold": lambda: passes.gate_grads(g, x, v["mc"], v["ms"], rectified, v["channel_index"],
                                                               v["affine"], v["centre"]),
        "stats_grad": lambda: passes.stats_grad(x, v["d_mean"], v["d_peak"], v["index"]),
        "stats_grad, fold": lambda: passes.stats_grad(x, v["d_mean"], v["d_peak"], v["index"], v["affine"],
                                                      v["centre"]),
        "input_grad": lambda: passes.input_grad(*gradients),
        "batch_norm_input_grad": lambda: passes.batch_norm_input_grad(
            *gradients, v["gated"], v["centred"], v["centre"], v["invstd"], v["weight"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8x512x28", help="BxCxH (default 8x512x28)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    passes = cpp.engine()
    if passes is None:
        raise SystemExit("the C++ engine did not build here")
    B, C, H = (int(n) for n in args.shape.lower().split("x"))
    S = H * H
    torch.manual_seed(0)
    large = {name: torch.randn(B, C, S) for name in ("x", "g", "rectified")}
    small = {"mc": torch.rand(B, C), "ms": torch.rand(B, S), "d_mean": torch.randn(B, S), "d_peak": torch.randn(B, S),
             "index": torch.randint(0, C, (B, S)), "channel_index": torch.randint(0, S, (B, C)),
             "d_avg": torch.randn(B, C), "d_max": torch.randn(B, C), "affine": torch.randn(2, C),
             "centre": torch.randn(C), "weight": torch.randn(C), "bias": torch.randn(C), "invstd": torch.rand(C),
             "gated": torch.randn(B, 2, C), "centred": torch.randn(B, 2, C)}
    channels_last = {name: t.transpose(1, 2).contiguous().transpose(1, 2) for name, t in large.items()}
    layouts = {"contiguous": calls(passes, large, small), "channels-last": calls(passes, channels_last, small)}
    runs = {f"{layout}/{name}": run for layout, found in layouts.items() for name, run in found.items()}
    medians = interleaved_medians(runs, args.repeats)
    print(f"x: ({B}, {C}, {S}) fp32, {torch.get_num_threads()} threads; medians of {args.repeats} interleaved repeats")
    print("| pass | contiguous ms | channels-last ms | channels-last / contiguous |")
    print("| --- | ---: | ---: | ---: |")
    for name in layouts["contiguous"]:
        a, b = medians[f"contiguous/{name}"], medians[f"channels-last/{name}"]
        print(f"| {name} | {1e3 * a:.3f} | {1e3 * b:.3f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
