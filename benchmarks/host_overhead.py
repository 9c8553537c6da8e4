"""Host time per CBAM call: what bounds a module on a GPU at small shapes, measured on the CPU.

    python benchmarks/host_overhead.py [--rounds 21] [--calls 200]

On a tiny input (2×64×4×4, one thread) the passes cost next to nothing, so a call's time is its
Python, dispatcher and allocation work: what a GPU call costs the host before its kernels launch
(every launch adds its own on top). Rows: timm's ``CbamModule``, ``CBAM(preset="timm")`` on the
reference path and fused on the C++ engine, each in eval (forward, no autograd) and in training
(forward and backward of the sum); and a ResNet block's tail, ``cbam(conv_out, residual,
input_norm=bn)``, against timm's ``relu(cbam(bn(conv_out)) + residual)``. Medians over interleaved
rounds of ``--calls`` calls each, in microseconds per call, and each row's ratio to timm's.

``--triton`` adds the fused rows on the Triton engine, each kernel launched through Triton's own host
path for an H100 (``cbam.profile.triton_host``: compiled for sm_90, the final driver call left out,
the kernels never run): the host work of an eager call on a GPU but the driver's launch calls, which
the last column counts.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics

import torch
from torch import nn

from cbam import CBAM
from cbam.ops import engines
from cbam.profile.benchmark import interleaved_samples
from cbam.profile.triton_host import launch_path_without_gpu

SHAPE = (2, 64, 4, 4)


def _timm_cbam(channels: int) -> nn.Module:
    from timm.layers.cbam import CbamModule

    return CbamModule(channels)


def _calls(run, calls: int):
    def repeated():
        for _ in range(calls):
            run()
    return repeated


def _modules() -> dict[str, nn.Module]:
    channels = SHAPE[1]
    return {"timm CbamModule": _timm_cbam(channels), "cbam reference": CBAM(channels, preset="timm", impl="reference"),
            "cbam fused": CBAM(channels, preset="timm", impl="fused")}


def _on_engine(name: str, run):
    def switched():
        with engines.using(name):
            run()
    return switched


def runs(calls: int, triton: bool = False) -> dict[str, object]:
    """``{row name: callable of calls calls}`` for every row (with ``triton``, the fused ones on the Triton
    engine too, launches left out)."""
    torch.manual_seed(0)
    x, residual = torch.randn(SHAPE), torch.randn(SHAPE)
    leaf = x.clone().requires_grad_()
    found = {}
    for name, module in _modules().items():
        norm = nn.BatchNorm2d(SHAPE[1])
        module.eval(), norm.eval()
        if name.startswith("timm"):
            tail = lambda m=module, n=norm: torch.relu(m(n(x)) + residual)  # noqa: E731
        else:
            tail = lambda m=module, n=norm: m(x, residual, input_norm=n)  # noqa: E731
        found[f"{name}, eval"] = _calls(torch.no_grad()(lambda m=module: m(x)), calls)
        found[f"{name}, eval, block tail"] = _calls(torch.no_grad()(tail), calls)
        trained = CBAM(SHAPE[1], preset="timm", impl=module.impl) if isinstance(module, CBAM) else _timm_cbam(SHAPE[1])
        found[f"{name}, training"] = _calls(lambda m=trained: m(leaf).sum().backward(), calls)
    if triton:
        for key in [key for key in found if key.startswith("cbam fused")]:
            found[key.replace("cbam fused", "cbam fused on Triton")] = _on_engine("triton", found[key])
    return found


def _launches_per_call(run, calls: int, counter: list[int]) -> float:
    """Triton launches per call of ``run`` (``calls`` calls), read from ``launch_path_without_gpu``'s counter."""
    before = counter[0]
    run()
    return (counter[0] - before) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--triton", action="store_true",
                        help="also the fused rows on Triton, through Triton's launch path for an H100 (no GPU needed)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with launch_path_without_gpu() if args.triton else contextlib.nullcontext([0]) as counter:
        rows = runs(args.calls, args.triton)
        samples = interleaved_samples(rows, args.rounds)
        launches = {name: _launches_per_call(run, args.calls, counter) for name, run in rows.items()
                    if "on Triton" in name}
    micro = {name: statistics.median(times) / args.calls * 1e6 for name, times in samples.items()}
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread, input {SHAPE}, "
          f"medians of {args.rounds} rounds of {args.calls} calls")
    print("| call | µs per call | × timm | Triton launches |")
    print("| --- | ---: | ---: | ---: |")
    for name, value in micro.items():
        peer = micro["timm CbamModule, " + name.split(", ", 1)[1]]
        count = f"{launches[name]:.0f}" if name in launches else ""
        print(f"| {name} | {value:.1f} | {value / peer:.2f} | {count} |")


if __name__ == "__main__":
    main()
