"""CBAM's overhead in ResNet-50 (batch 8, 224², fp32 CPU) for one checkout of cbam, to compare two
versions in alternating processes (the machine's state drifts more between runs than the versions
differ):

    python benchmarks/resnet_overhead.py --src ../old-checkout --label old
    python benchmarks/resnet_overhead.py --label new          # this checkout, as installed

Prints one line: the median over rounds of each round's ratio of ``attention="cbam"`` (``preset="timm"``,
``impl="auto"`` or ``--impl``; ``--channels-last``: both networks and the input channels-last;
``--bf16-autocast``: both under ``torch.autocast("cpu", dtype=torch.bfloat16)``) to
``attention=None``, for a training step and for an inference (``--compile``: of both
models compiled by ``torch.compile``, each mode compiled apart, inductor's on-disk caches off); ``--save PATH`` also
appends every round's overheads to PATH as one JSON line, to pool many processes:

    for i in 1 2 3 4 5 6; do
        python benchmarks/resnet_overhead.py --label native --save runs.jsonl
        CBAM_CPU_ARCH=x86-64-v3 python benchmarks/resnet_overhead.py --label avx2 --save runs.jsonl
    done
    python benchmarks/resnet_overhead.py --pool runs.jsonl

Two checkouts keep their C++ builds side by side (the build's name hashes its install path and sources); a checkout from
before ``ops/engines/cpp/build.py`` existed must have its extension renamed in its ``ops/cpu_extension.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", help="a cbam checkout whose src/ to import instead of the installed package")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--label", default="cbam")
    parser.add_argument("--compile", action="store_true",
                        help="time torch.compile of both models (inductor; the first round, compiling, not counted)")
    parser.add_argument("--impl", default="auto", choices=("auto", "fused", "reference"),
                        help="the CBAM network's impl= (default auto)")
    parser.add_argument("--channels-last", action="store_true",
                        help="run both models and the input in torch.channels_last memory format")
    parser.add_argument("--bf16-autocast", action="store_true",
                        help="run both models under CPU bfloat16 autocast (convs in bfloat16; CBAM sees bfloat16)")
    parser.add_argument("--save", help="append this run's per-round overheads to this file (JSON lines)")
    parser.add_argument("--pool", help="print the medians and quartiles per label of the runs saved in this file")
    args = parser.parse_args()
    if args.pool:
        _pool(args.pool)
        return
    if args.src:
        sys.path.insert(0, f"{args.src}/src")
    import torch

    import cbam
    from cbam.profile.benchmark import interleaved_samples

    if args.compile:  # compiled afresh: a cached graph compiled around another version of the ops must not stand in
        import torch._inductor.config

        torch._inductor.config.force_disable_caches = True
    torch.manual_seed(0)
    x = torch.randn(8, 3, 224, 224)
    built = {"none": cbam.models.resnet50(attention=None),
             "cbam": cbam.models.resnet50(attention="cbam", preset="timm", impl=args.impl)}
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
        built = {name: model.to(memory_format=torch.channels_last) for name, model in built.items()}
    found = {}
    for mode in ("train", "inference"):
        for model in built.values():
            model.train(mode == "train")
        models = {name: torch.compile(model) for name, model in built.items()} if args.compile else built

        def run(model, mode=mode):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16_autocast):
                if mode == "train":
                    model.zero_grad(set_to_none=True)
                    model(x).float().sum().backward()
                else:
                    with torch.no_grad():
                        model(x)

        samples = interleaved_samples({n: (lambda m=m: run(m)) for n, m in models.items()}, args.rounds, warmup=1)
        found[mode] = [t / base - 1 for t, base in zip(samples["cbam"], samples["none"])]
        found[f"{mode} seconds"] = {name: statistics.median(times) for name, times in samples.items()}
    print(f"{args.label}: train {statistics.median(found['train']):+.1%}, "
          f"inference {statistics.median(found['inference']):+.1%} ({cbam.__file__})")
    if args.save:
        with open(args.save, "a") as f:
            f.write(json.dumps({"label": args.label, **found}) + "\n")


def _pool(path: str) -> None:
    """Per label: processes, rounds, and the median and quartiles of all their rounds' overheads."""
    runs: dict[str, list[dict]] = {}
    with open(path) as f:
        for line in f:
            run = json.loads(line)
            runs.setdefault(run["label"], []).append(run)
    for label, found in runs.items():
        cells = []
        for mode in ("train", "inference"):
            ratios = [r for run in found for r in run[mode]]
            low, middle, high = statistics.quantiles(ratios, n=4)
            process_medians = ", ".join(f"{statistics.median(run[mode]):+.1%}" for run in found)
            plain = [run[f"{mode} seconds"]["none"] for run in found if f"{mode} seconds" in run]
            seconds = f"; plain {statistics.median(plain):.3f} s" if plain else ""
            cells.append(f"{mode} {middle:+.1%} ({low:+.1%} .. {high:+.1%}; per process {process_medians}{seconds})")
        print(f"{label}: {len(found)} processes, {sum(len(run['train']) for run in found)} rounds; " + "; ".join(cells))


if __name__ == "__main__":
    main()
