"""``train``: the training loop (single process or DDP), with resumable checkpoints, metrics and curves.

Every epoch rank 0 writes ``OUT/checkpoint.pt`` atomically (model, optimizer, scheduler, grad
scaler, RNG state, metrics history, configuration), then ``metrics.json``/``metrics.csv`` and
``curves.png``. Resuming restores all of it, and the data order is a function of ``(seed, epoch)``
(``DistributedSampler``), so on the CPU a run interrupted at any moment and resumed ends bitwise
equal to an uninterrupted one (same world size, same machine) where ``impl="auto"`` makes a fixed choice of path
(``CBAM_CALIBRATE=0``; see ``cbam.ops.calibration``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from .. import models
from ..atomic import check_folder
from ..convert import load_weights
from ..validation import check_choice, check_int
from . import distributed
from .checkpoint import (
    FORMAT,
    RESUME_ENTRIES,
    RUN_SETTINGS,
    check_run_checkpoint,
    is_run_checkpoint,
    load_state,
    read_checkpoint,
    save_checkpoint,
)
from .data import load_split
from .metrics import curves_figure, write_metrics

OPTIMIZERS = {"sgd": 0.05, "adamw": 2e-3}  # name -> default learning rate
CHECKPOINT = "checkpoint.pt"
OUTPUTS = ("metrics.json", "metrics.csv", "curves.png")  # written beside the checkpoint every epoch


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``batch_size`` is the global batch (split evenly over ranks); ``lr=None``
    takes the optimizer's default (``OPTIMIZERS``); ``attention`` is ``"cbam"`` or ``"none"``. ``init_from`` (with
    ``init_prefix``, ``load_weights``' ``prefix=``) only starts a run: not among ``RUN_SETTINGS``, a checkpoint does
    not store it and ``--resume`` neither compares nor uses it."""

    out: str
    model: str = "resnet18"
    attention: str = "cbam"
    preset: str | None = None
    stem: str = "imagenet"
    data: str = "synthetic"
    image_size: int = 64
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float | None = None
    weight_decay: float = 5e-4
    seed: int = 0
    amp: bool = False
    channels_last: bool = False
    device: str = "cpu"
    workers: int = 0
    resume: bool = False
    init_from: str | None = None  # weights to start from (any layout load_weights reads); ignored on --resume
    init_prefix: str | None = None  # load_weights' prefix= for init_from ("ema": a LightningModule's self.ema)
    stop_after: int | None = None  # epochs to run in this call (a time-sliced job), then exit
    dist_timeout: float = 300.0
    progress: bool = True

    def __post_init__(self) -> None:
        check_choice("model", self.model, models.RESNETS)
        check_choice("attention", self.attention, ("cbam", "none"))
        check_choice("optimizer", self.optimizer, tuple(OPTIMIZERS))
        for name in ("epochs", "batch_size"):
            check_int(name, getattr(self, name))
        check_int("seed", self.seed, minimum=0)
        check_int("workers", self.workers, minimum=0)
        if self.stop_after is not None:
            check_int("stop_after", self.stop_after)
        if self.lr is None:
            object.__setattr__(self, "lr", OPTIMIZERS[self.optimizer])
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0 < self.dist_timeout < timedelta.max.total_seconds():  # NaN fails too
            raise ValueError(f"--dist-timeout must be a positive number of seconds below "
                             f"{timedelta.max.total_seconds():.0f}, got {self.dist_timeout}")
        if self.attention == "none" and self.preset is not None:
            raise ValueError(f"--attention none builds a plain ResNet and takes no --preset; got {self.preset!r}")
        if self.init_prefix is not None and self.init_from is None:
            raise ValueError(f"--init-prefix picks the keys --init-from loads; got --init-prefix {self.init_prefix!r} "
                             "without --init-from")

    def run_settings(self) -> dict:
        return {key: getattr(self, key) for key in RUN_SETTINGS}


class ChangedSettings(ValueError):
    """``--resume`` found a run with other settings; ``changes`` names them (``"seed 0 -> 1"``)."""

    def __init__(self, changes: list[str]) -> None:
        super().__init__(f"--resume must keep the run's settings; changed: {', '.join(changes)}")
        self.changes = changes


class TrainResult(NamedTuple):
    """The trained model (unwrapped, eval mode, on its device), the metrics of every epoch, the output folder."""

    model: nn.Module
    history: list[dict]
    out: Path


def model_for(settings: dict, num_classes: int) -> nn.Module:
    """``cbam.models.build_model`` with the model settings of ``settings`` (a ``TrainConfig.run_settings()``,
    as a checkpoint stores it) for ``num_classes`` classes."""
    return models.build_model(settings["model"], num_classes, attention=settings["attention"],
                              preset=settings["preset"], stem=settings["stem"])


def _autocast(config: TrainConfig, device: torch.device):
    if not config.amp:
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16)


def _batches(loader: DataLoader, config: TrainConfig, device: torch.device):
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    for x, y in loader:
        yield x.to(device, memory_format=memory_format, non_blocking=True), y.to(device, non_blocking=True)


def restore_scaler(scaler: torch.amp.GradScaler, state: dict) -> None:
    """Load a grad scaler's saved state; a disabled scaler's is empty (a CPU or float32 run), and an enabled
    one resuming it starts afresh (torch refuses to load an empty state)."""
    if state:
        scaler.load_state_dict(state)


def evaluate(model: nn.Module, dataset: Dataset, config: TrainConfig,
             context: distributed.Context) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of rank 0's ``model`` over all of ``dataset``; each rank takes every
    ``world_size``-th image."""
    distributed.broadcast_buffers(context, model)
    shard = Subset(dataset, range(context.rank, len(dataset), context.world_size))
    loader = DataLoader(shard, batch_size=config.batch_size, num_workers=config.workers)
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad(), _autocast(config, context.device):
        for x, y in _batches(loader, config, context.device):
            logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(1) == y).sum())
    loss_sum, correct = distributed.sum_over_ranks(context, [loss_sum, correct])
    return loss_sum / len(dataset), correct / len(dataset)


def _progress(iterable, total: int, enabled: bool, description: str):
    """A tqdm bar on stderr where tqdm is installed and ``enabled`` (it turns itself off off a terminal)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(iterable, total=total, desc=description, unit="batch", leave=False, disable=None, dynamic_ncols=True)


def _resume_state(config: TrainConfig, path: Path):
    """The checkpoint to continue from (``None``: start afresh), checked against ``config``. A fresh run
    refuses a folder that holds outputs of ours without the checkpoint: they are not a run's, so the user's."""
    if not path.exists():
        for name in OUTPUTS:
            if (path.parent / name).exists():
                raise FileExistsError(f"{str(path.parent / name)!r} exists but no {CHECKPOINT} of a run beside it: "
                                      "choose another --out (a run writes its metrics there)")
        return None
    if not config.resume:
        raise FileExistsError(f"{str(path)!r} exists: pass --resume to continue that run, or choose another --out")
    checkpoint = read_checkpoint(path)
    if not is_run_checkpoint(checkpoint):
        raise ValueError(f"checkpoint {str(path)!r} is not a cbam train checkpoint ({FORMAT})")
    saved = check_run_checkpoint(checkpoint, path, RESUME_ENTRIES)["config"]
    changed = [f"{key} {saved[key]!r} -> {value!r}" for key, value in config.run_settings().items()
               if saved[key] != value]
    if changed:
        raise ChangedSettings(changed)
    return checkpoint


def train(config: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Run (or continue, with ``config.resume``) the training ``config`` describes; see the module docstring."""
    out = check_folder(config.out)  # before any work
    context = distributed.setup(config.device, config.dist_timeout)
    created = [folder for folder in (out, *out.parents) if not folder.exists()] if context.main else []
    try:
        with distributed.failures(context, config.dist_timeout):
            return _train(config, context, log if context.main else (lambda message: None))
    except BaseException:
        _remove_empty(created)  # a failed run leaves no empty --out behind
        raise
    finally:
        distributed.teardown(context)


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (the run wrote something) or already gone
            return


def _train(config: TrainConfig, context: distributed.Context, log: Callable[[str], None]) -> TrainResult:
    out = Path(config.out)
    if context.main:
        out.mkdir(parents=True, exist_ok=True)
    checkpoint = _resume_state(config, out / CHECKPOINT)
    train_split, test_split = load_split(config.data, True, image_size=config.image_size), \
        load_split(config.data, False, image_size=config.image_size)
    if train_split.classes != test_split.classes:
        raise ValueError(f"--data {config.data}: the training and test splits have different classes")
    if config.batch_size % context.world_size:
        raise ValueError(f"--batch-size (global) must be divisible by the {context.world_size} processes, "
                         f"got {config.batch_size}")
    sampler = DistributedSampler(train_split.dataset, num_replicas=context.world_size, rank=context.rank,
                                 shuffle=True, seed=config.seed)
    loader = DataLoader(train_split.dataset, batch_size=config.batch_size // context.world_size, sampler=sampler,
                        num_workers=config.workers, drop_last=True)
    if len(loader) == 0:
        raise ValueError(f"--batch-size {config.batch_size} is larger than the {len(train_split.dataset)} "
                         f"training images")

    torch.manual_seed(config.seed)
    model = model_for(config.run_settings(), len(train_split.classes))
    if config.init_from is not None and checkpoint is None:
        # a backbone without attention leaves CBAM at its initialisation; another class count, the head
        log(str(load_weights(config.init_from, model, prefix=config.init_prefix, new_head=True)))
    model = model.to(context.device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * len(loader))
    scaler = torch.amp.GradScaler(context.device.type, enabled=config.amp and context.device.type == "cuda")
    history: list[dict] = []
    if checkpoint is not None:
        load_state(model, checkpoint["model"], out / CHECKPOINT)
        for entry, restore in (("optimizer", optimizer.load_state_dict), ("scheduler", scheduler.load_state_dict),
                               ("scaler", partial(restore_scaler, scaler)), ("rng", torch.set_rng_state)):
            try:
                restore(checkpoint[entry])
            except Exception as error:  # torch's KeyError, ValueError or RuntimeError on a state of another run
                raise ValueError(f"checkpoint {str(out / CHECKPOINT)!r}: its {entry!r} entry does not fit this "
                                 f"run ({type(error).__name__}: {error})") from None
        history = list(checkpoint["history"])
        log(f"resuming {out / CHECKPOINT} after epoch {checkpoint['epoch']} of {config.epochs}")
    network = DistributedDataParallel(model) if context.world_size > 1 else model

    first = len(history)
    last = config.epochs if config.stop_after is None else min(config.epochs, first + config.stop_after)
    if context.main and checkpoint is not None and first == last:  # killed after its last checkpoint, before metrics
        _write_metrics(config, out, history, train_split.classes)
    for epoch in range(first, last):
        sampler.set_epoch(epoch)
        network.train()
        lr = optimizer.param_groups[0]["lr"]
        loss_sum, correct, seen = 0.0, 0, 0
        bar = _progress(loader, len(loader), config.progress and context.main, f"epoch {epoch + 1}/{config.epochs}")
        start = time.perf_counter()
        for x, y in _batches(bar if bar is not None else loader, config, context.device):
            with _autocast(config, context.device):
                logits = network(x)
                loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            if bar is not None:
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.1%}",
                                img_s=f"{seen * context.world_size / elapsed:.0f}")
        seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()
        loss_sum, correct, seen = distributed.sum_over_ranks(context, [loss_sum, correct, seen])
        test_loss, test_accuracy = evaluate(model, test_split.dataset, config, context)
        history.append({
            "epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
            "test_loss": test_loss, "test_accuracy": test_accuracy, "train_seconds": seconds,
            "images_per_second": seen / seconds,
        })
        if context.main:
            _write_outputs(config, out, model, optimizer, scheduler, scaler, history, train_split.classes)
        log(f"epoch {epoch + 1}/{config.epochs}  loss {loss_sum / seen:.3f}  accuracy {correct / seen:.1%}  "
            f"test loss {test_loss:.3f}  test accuracy {test_accuracy:.1%}  {seen / seconds:.0f} images/s  "
            f"{seconds:.1f} s")
    return TrainResult(model.eval(), history, out)


def _write_outputs(config, out, model, optimizer, scheduler, scaler, history, classes) -> None:
    """The checkpoint first (what ``--resume`` needs), then metrics and curves (rank 0 only)."""
    save_checkpoint(out / CHECKPOINT, {
        "format": FORMAT, "config": config.run_settings(), "classes": list(classes), "epoch": len(history),
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(), "rng": torch.get_rng_state(), "history": history,
    })
    _write_metrics(config, out, history, classes)


def _write_metrics(config, out, history, classes) -> None:
    """``metrics.json``, ``metrics.csv`` and ``curves.png`` of ``history``."""
    write_metrics(out, history, {"config": config.run_settings(), "classes": list(classes)})
    try:
        figure = curves_figure({config.attention: history})
    except ImportError:  # matplotlib is optional: the metrics files hold the same numbers
        return
    from ..viz.save import save_figure

    save_figure(figure, out / "curves.png", dpi=100)
