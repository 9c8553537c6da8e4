"""``cbam bench``: the fused CBAM against timm, our reference path and a plain copy (Markdown tables);
``--device cuda``: the CUDA tables of ``cbam.profile.cuda_bench``."""

from __future__ import annotations

import argparse
import json

CUDA_MODES = ("fp32", "bf16", "bf16-autocast")  # cbam.profile.cuda_bench.MODES, without importing torch here
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")  # cuda_bench.COMPILE_MODES, likewise


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="time the fused CBAM against timm, the reference path and a copy",
        description="Time CBAM modules at ResNet-50 stage shapes, fp32 on the CPU (--amp: bf16 autocast): timm's "
                    "CbamModule (when timm "
                    "is installed; else speed-ups are over our reference path), CBAM(preset='timm') on the "
                    "reference path, fused on plain torch ops and fused on the C++ engine (when it builds), next "
                    "to a copy of the input. Forward in eval mode without autograd, forward+backward in train "
                    "mode; medians of interleaved repeats. Prints Markdown tables. --device cuda: the CUDA "
                    "tables instead (batch 64, fp32 / bf16 / bf16 autocast, timm eager and compiled, "
                    "triton.testing.do_bench medians; --resnet: ResNet-50 at batch 128 with peak memory).",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to time (default cpu)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="forward rounds (default 5); forward+backward takes max(3, N//2), --resnet max(3, N)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 8; on CUDA 64)")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated CxH of (batch, C, H, H) inputs (default 256x56,512x28,1024x14,2048x7)")
    parser.add_argument("--resnet", action="store_true", help="also time CBAM's overhead in ResNet-50 at 224x224")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile of the reference path (CUDA: of ours and of every ResNet-50)")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                        help="torch.compile's mode for the ResNet-50s (CUDA; implies --compile): reduce-overhead "
                             "replays each step from CUDA graphs, without the host's per-call work")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    parser.add_argument("--save", default=None, metavar="PATH",
                        help="also write the results as JSON to PATH (atomically, after printing them)")
    parser.add_argument("--channels-last", action="store_true",
                        help="CPU: inputs (and with --resnet the networks) in torch.channels_last memory format "
                             "(the CUDA protocol runs ResNet-50 channels-last already)")
    parser.add_argument("--amp", action="store_true",
                        help="CPU: under torch.autocast('cpu', bfloat16), the module inputs in bfloat16 as a conv "
                             "under autocast returns them (CUDA: --modes)")
    cuda = parser.add_argument_group("CUDA only")
    cuda.add_argument("--modes", default=",".join(CUDA_MODES),
                      help=f"comma-separated, of {', '.join(CUDA_MODES)} (default all; --resnet runs fp32 and "
                           "bf16-autocast among them)")
    cuda.add_argument("--resnet-batch", type=int, default=128, help="ResNet-50 batch size (default 128)")
    cuda.add_argument("--steps", type=int, default=20, help="ResNet-50 steps timed after warm-up (default 20)")
    cuda.add_argument("--resnet-only", action="store_true", help="time ResNet-50 only, not the module table")
    cuda.add_argument("--graphs", action="store_true",
                      help="also time timm's module and ours replayed from CUDA graphs "
                           "(triton.testing.do_bench_cudagraph): the GPU's time without the host's per-call work")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..atomic import check_destination, write_text_atomic
    from ..profile import fused_bench
    from ..validation import check_int

    if args.save:  # a bad path fails now, not after the timings
        check_destination(args.save)
    repeats = check_int("--repeats", args.repeats)
    batch = check_int("--batch", args.batch) if args.batch is not None else (64 if args.device == "cuda" else 8)
    shapes = fused_bench.SHAPES if args.shapes is None else fused_bench.parse_shapes(args.shapes)
    if args.device == "cuda":
        if args.channels_last:
            raise ValueError("--channels-last is for the CPU tables (--device cpu); the CUDA protocol already runs "
                             "ResNet-50 channels-last")
        if args.amp:
            raise ValueError("--amp is for the CPU tables (--device cpu); on CUDA --modes picks fp32, bf16 and "
                             "bf16-autocast")
        report = _run_cuda(args, batch, shapes)
    else:
        report = fused_bench.run(batch, repeats, shapes, resnet=args.resnet, compile_reference=args.compile,
                                 channels_last=args.channels_last, amp=args.amp)
    text = json.dumps(report.as_dict(), indent=2, allow_nan=False)
    print(text if args.json else report, flush=True)  # the results are out even if saving them fails
    if args.save:
        write_text_atomic(args.save, text + "\n")
    return 0


def _run_cuda(args: argparse.Namespace, batch: int, shapes):
    import sys

    from ..profile import cuda_bench
    from ..validation import check_int

    modes = [m.strip() for m in args.modes.split(",")]
    unknown = [m for m in modes if m not in CUDA_MODES]
    if unknown or not modes:
        raise ValueError(f"--modes expects comma-separated names of {', '.join(CUDA_MODES)}, got {args.modes!r}")
    cuda_bench.require_cuda()
    return cuda_bench.run(batch, shapes, modes, modules=not args.resnet_only, resnet=args.resnet or args.resnet_only,
                          resnet_batch=check_int("--resnet-batch", args.resnet_batch),
                          steps=check_int("--steps", args.steps), graphs=args.graphs,
                          compile=args.compile or args.compile_mode != "default", compile_mode=args.compile_mode,
                          device="cuda",
                          progress=lambda line: print(line, file=sys.stderr, flush=True))
