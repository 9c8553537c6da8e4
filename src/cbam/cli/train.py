"""``cbam train``: train a ResNet with or without CBAM; under ``torchrun`` with DistributedDataParallel."""

from __future__ import annotations

import argparse

from .model_spec import (
    ATTENTIONS,
    MAX_BATCH,
    MAX_IMAGE_SIDE,
    MAX_SEED,
    MAX_WORKERS,
    RESNETS,
    add_preset_argument,
    add_stem_argument,
    int_range,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model (one process, or many under torchrun)",
        description="Train a ResNet with or without CBAM: SGD or AdamW with a cosine schedule, a checkpoint every "
                    "epoch (OUT/checkpoint.pt, written atomically), metrics in OUT/metrics.json and .csv, curves "
                    "in OUT/curves.png. Under `torchrun --nproc_per_node=N -m cbam train ...` it runs "
                    "DistributedDataParallel (gloo on the CPU, NCCL on CUDA); rank 0 logs and writes.",
    )
    parser.add_argument("--model", default="resnet18", choices=RESNETS)
    parser.add_argument("--attention", default="cbam", choices=ATTENTIONS, help="CBAM in every block, or none")
    add_preset_argument(parser)
    add_stem_argument(parser)
    add_data_arguments(parser)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int_range(1, MAX_BATCH), default=64,
                        help="global batch, split over the processes")
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default sgd 0.05, adamw 0.002)")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--seed", type=int_range(0, MAX_SEED), default=0, help="initialisation and data order")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/checkpoint.pt (start afresh if there is none)")
    parser.add_argument("--init-from", metavar="PATH", default=None,
                        help="start from these weights: cbam, official, timm or torchvision checkpoints (.pt or "
                             ".safetensors); attention a backbone lacks and a classifier of another size stay at "
                             "their initialisation (ignored when --resume continues a run)")
    parser.add_argument("--init-prefix", metavar="PREFIX", default=None,
                        help="with --init-from: load only the checkpoint's keys under this prefix, stripped (ema or "
                             "net of a LightningModule holding self.net and self.ema = AveragedModel(net))")
    parser.add_argument("--stop-after", type=int, default=None, metavar="EPOCHS",
                        help="run at most this many epochs now, then exit (continue later with --resume)")
    parser.add_argument("--amp", action="store_true", help="autocast: bfloat16 on the CPU, float16 on CUDA")
    parser.add_argument("--channels-last", action="store_true",
                        help="model and batches in torch.channels_last memory format (faster convolutions; the fused "
                             "CBAM reads it as it lies, on the CPU and on CUDA)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--workers", type=int_range(0, MAX_WORKERS), default=0,
                        help="data-loading processes (default 0)")
    parser.add_argument("--dist-timeout", type=float, default=300.0,
                        help="seconds a process waits for the others before it gives up (default 300)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="synthetic",
                        help="synthetic, synthetic:TRAIN,TEST, cifar10:PATH or imagefolder:PATH (default synthetic)")
    parser.add_argument("--image-size", type=int_range(1, MAX_IMAGE_SIDE), default=64,
                        help="side of imagefolder images (default 64)")


def run(args: argparse.Namespace) -> int:
    from ..train import TrainConfig, train

    config = TrainConfig(
        out=args.out, model=args.model, attention=args.attention, preset=args.preset, stem=args.stem, data=args.data,
        image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
        lr=args.lr, weight_decay=args.weight_decay, seed=args.seed, amp=args.amp, channels_last=args.channels_last,
        device=args.device, workers=args.workers, resume=args.resume, init_from=args.init_from,
        init_prefix=args.init_prefix, stop_after=args.stop_after, dist_timeout=args.dist_timeout,
        progress=not args.no_progress,
    )
    try:
        train(config)
    except ImportError as error:  # an optional dependency: one line, like every other error
        raise RuntimeError(str(error)) from None
    return 0
