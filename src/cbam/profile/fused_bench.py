"""The fused-CBAM benchmark: CBAM modules side by side at ResNet-50 stage shapes, then CBAM's
overhead in a ResNet-50; as data (``run``, ``module_table``, ``resnet_overhead``) and as Markdown.

fp32 on the CPU, or (``amp``) under CPU bfloat16 autocast with ``x`` in bfloat16, as a conv under autocast
hands it on (the ResNet-50s take a float32 image; backward outside autocast, as training loops run it),
``x: (batch, C, H, H)``, contiguous or (``channels_last``) channels-last. Forward:
eval mode, no autograd. Forward+backward: train mode, gradients for the input and the weights from a
fixed dense upstream gradient, reset to ``None`` before each step as in a training loop. Times are
medians of interleaved repeats (``interleaved_medians``). A speed-up is the peer's time over the
module's: the peer is timm's ``CbamModule`` when timm is installed, else our reference path. "× copy"
is the module's time over that of copying ``x`` into preallocated memory (one read and one write, the
floor for any layer that writes an output). "saved / input" is the bytes autograd keeps for backward over ``x``'s bytes.
Each table also says which path ``impl="auto"`` took (``AutoChoice``; on the C++ engine the one-time
calibration of ``cbam.ops.calibration`` picks it, ``CBAM_CALIBRATE=0`` turns that off) with the
calibration's own times of the fused and the reference path (the fastest of its runs).

>>> from cbam.profile import fused_bench
>>> table = fused_bench.module_table(batch=1, repeats=1, shapes=[(16, 8)])  # doctest: +SKIP
>>> print(fused_bench.format_module_table(table))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..convert import from_timm
from ..models import resnet50
from ..nn import CBAM
from ..ops import calibration, engines
from ..validation import check_int
from .benchmark import cpu_name, interleaved_medians, interleaved_samples, saved_bytes

SHAPES: tuple[tuple[int, int], ...] = ((256, 56), (512, 28), (1024, 14), (2048, 7))  # (C, H): ResNet-50's stages

TIMM = "timm CbamModule"
REFERENCE = "cbam reference"
SEPARATE_TAIL = "cbam fused, block ops separate"  # the block's BatchNorm, add and ReLU outside CBAM's passes
TORCH_OPS = "cbam fused, torch ops"
CPP = "cbam fused, C++"
COMPILED = "torch.compile(reference)"
COPY = "copy"
AUTO = "cbam auto"  # impl="auto": fused or reference, as the calibration chose


class TorchOpsCBAM(CBAM):
    """``CBAM(impl="fused")`` on the plain-torch passes (``cbam.ops.engines.torch_ops``) even where a
    compiled engine exists: each forward runs under ``engines.using("torch")``; the backward keeps the
    engine its forward saw."""

    def forward(self, x):
        with engines.using("torch"):
            return super().forward(x)


def _timm_cbam() -> type[nn.Module] | None:
    """timm's ``CbamModule`` class, or ``None`` when timm is not installed."""
    try:
        from timm.layers.cbam import CbamModule
    except ImportError:
        return None
    return CbamModule


def geometric_mean(values: Iterable[float]) -> float:
    """``exp(mean(log(values)))`` of positive numbers: the mean of ratios that treats ×2 and ×½ alike."""
    values = [float(v) for v in values]
    if not values or any(not v > 0 or not math.isfinite(v) for v in values):
        raise ValueError(f"geometric_mean expects a non-empty sequence of positive finite numbers, got {values}")
    return math.exp(math.fsum(math.log(v) for v in values) / len(values))


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"256x56,2048x7"`` -> ``[(256, 56), (2048, 7)]``: comma-separated ``CxH`` pairs of positive ints."""
    pairs = [part.strip() for part in str(text).split(",")]
    found = [re.fullmatch(r"(\d+)\s*[x×]\s*(\d+)", part, flags=re.IGNORECASE) for part in pairs]
    shapes = [(int(m[1]), int(m[2])) for m in found if m]
    if len(shapes) != len(pairs) or any(c < 1 or h < 1 for c, h in shapes):
        raise ValueError(f"--shapes expects comma-separated CxH pairs of positive ints such as 256x56,2048x7, "
                         f"got {text!r}")
    return shapes


def environment() -> dict:
    """Where the numbers come from: torch version, threads, CPUs, machine, and the CPU's model and vector ISA."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "machine": platform.machine(), "cpu": cpu_name()}


def _precision(amp: bool) -> contextlib.AbstractContextManager:
    """CPU bfloat16 autocast where ``amp``, else nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or ``None`` where either is missing or the ratio is not finite."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    value = numerator / denominator
    return value if math.isfinite(value) else None


@dataclass
class ModuleRow:
    """One module at ``x: (batch, channels, side, side)``: median milliseconds of a forward and of a
    forward+backward, speed-ups over the peer (peer's time / this time), multiples of the copy (this
    time / copy's time) and bytes saved for backward per input byte. ``None`` where a value does not
    apply (the copy has no backward; a compiled module's saved bytes are not measured)."""

    channels: int
    side: int
    name: str
    forward_ms: float
    train_ms: float | None
    forward_speedup: float | None
    train_speedup: float | None
    forward_vs_copy: float | None
    train_vs_copy: float | None
    saved_per_input: float | None


@dataclass
class GeometricMean:
    """A module's speed-ups over the peer across the shapes, as geometric means."""

    name: str
    forward: float
    train: float


@dataclass
class AutoChoice:
    """The path ``CBAM(preset="timm")`` with ``impl="auto"`` takes at ``(batch, channels, side, side)`` in
    inference (eval, no autograd) and in training (train mode, gradients), with the calibration's times
    ``(fused ms, reference ms)`` (the fastest of its runs) where it timed them (``None``: not calibrated
    here: ``CBAM_CALIBRATE=0``, or not the C++ engine)."""

    channels: int
    side: int
    inference: str
    training: str
    inference_ms: tuple[float, float] | None
    training_ms: tuple[float, float] | None


@dataclass
class ModuleTable:
    """``module_table``'s result: rows per shape (modules, then the copy), the geometric means, the
    peer the speed-ups are over, notes on what was left out, what ``impl="auto"`` chose per shape and
    whether ``x`` was channels-last."""

    rows: list[ModuleRow]
    geometric_means: list[GeometricMean]
    peer: str
    batch: int
    repeats: int
    train_repeats: int
    notes: list[str] = field(default_factory=list)
    auto: list[AutoChoice] = field(default_factory=list)
    channels_last: bool = False
    amp: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ResNetRow:
    """One ResNet-50: median seconds per training step and per inference, and its overhead over the
    ResNet-50 without attention: the median over rounds of ``time / time_none - 1`` measured in the
    same round (paired, so that drift between rounds cancels), with its quartiles."""

    name: str
    train_s: float
    train_overhead: float
    train_quartiles: tuple[float, float]
    inference_s: float
    inference_overhead: float
    inference_quartiles: tuple[float, float]


@dataclass
class ResNetTable:
    """``resnet_overhead``'s result; ``auto``: the calibration's decisions made while timing
    (``cbam.ops.calibration.describe``), empty where it is off or they were made before."""

    rows: list[ResNetRow]
    batch: int
    image_size: int
    repeats: int
    auto: list[str] = field(default_factory=list)
    channels_last: bool = False
    amp: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def _peer_names(compile_reference: bool, notes: list[str]) -> list[str]:
    """The modules this run can compare, the peer first; a note for each one left out."""
    names = [TIMM] if _timm_cbam() is not None else []
    if not names:
        notes.append(f"timm is not installed: speed-ups are over '{REFERENCE}' instead of timm's CbamModule")
    names += [REFERENCE, TORCH_OPS]
    if engines.ENGINES["cpp"].load() is not None:
        names.append(CPP)
    else:
        notes.append(f"the C++ engine is unavailable (no compiler or ninja, a failed build, or "
                     f"CBAM_NO_EXTENSION=1): the '{CPP}' row is skipped")
    return names + ([COMPILED] if compile_reference else [])


def _modules(channels: int, names: Sequence[str]) -> dict[str, nn.Module]:
    """The modules ``names`` (from ``_peer_names``) at ``channels``, all with the same weights."""
    found: dict[str, nn.Module] = {}
    state = None
    if TIMM in names:
        found[TIMM] = _timm_cbam()(channels)
        state = from_timm(found[TIMM].state_dict())
    reference = found[REFERENCE] = CBAM(channels, preset="timm", impl="reference")
    state = reference.state_dict() if state is None else state
    if TORCH_OPS in names:
        found[TORCH_OPS] = TorchOpsCBAM(channels, preset="timm", impl="fused")
    if CPP in names:
        found[CPP] = CBAM(channels, preset="timm", impl="fused")
    for module in found.values():
        if isinstance(module, CBAM):
            module.load_state_dict(state)
    if COMPILED in names:
        found[COMPILED] = torch.compile(reference, dynamic=False)
    return found


def _forward(module: nn.Module, x: torch.Tensor, amp: bool = False) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad(), _precision(amp):
            module(x)
    return run


def _forward_backward(module: nn.Module, leaf: torch.Tensor, upstream: torch.Tensor | None = None,
                      amp: bool = False) -> Callable[[], None]:
    """One training step's forward (under autocast with ``amp``) and backward, as inside a network: gradients
    start from ``None`` (``zero_grad(set_to_none=True)``), and ``upstream`` is the dense gradient a next layer
    would send (``None``: the output is summed, for a model's small logits)."""
    def run() -> None:
        module.zero_grad(set_to_none=True)
        leaf.grad = None
        with _precision(amp):
            out = module(leaf)
        out.backward(upstream) if upstream is not None else out.float().sum().backward()
    return run


def _calibrated(before: dict, training: bool) -> tuple[float, float] | None:
    """The ``(fused ms, reference ms)`` of the one decision made since ``before`` in this mode, if any."""
    new = [d for k, d in calibration.decisions().items() if k not in before and k.training == training]
    return (1e3 * new[0].fused_s, 1e3 * new[0].reference_s) if len(new) == 1 else None


def auto_choice(channels: int, side: int, x: torch.Tensor, leaf: torch.Tensor,
                state: dict | None = None, amp: bool = False) -> AutoChoice:
    """What ``impl="auto"`` takes for ``x`` in inference and for ``leaf`` (requiring grad) in training (under
    CPU bfloat16 autocast with ``amp``), timing it where the calibration has not yet (``CBAM.fuses``)."""
    module = CBAM(channels, preset="timm")
    if state is not None:
        module.load_state_dict(state)
    before = calibration.decisions()
    with torch.no_grad(), _precision(amp):
        inference = module.eval().fuses(x)
    with _precision(amp):
        training = module.train().fuses(leaf)
    path = {True: "fused", False: "reference"}
    return AutoChoice(channels, side, path[inference], path[training], _calibrated(before, False),
                      _calibrated(before, True))


def module_table(batch: int = 8, repeats: int = 5, shapes: Sequence[tuple[int, int]] = SHAPES,
                 compile_reference: bool = False, train_repeats: int | None = None,
                 channels_last: bool = False, amp: bool = False) -> ModuleTable:
    """Time the CBAM modules and a copy at each ``(C, H)`` of ``shapes`` on ``x: (batch, C, H, H)``
    (``channels_last``: in ``torch.channels_last`` memory format; ``amp``: ``x`` in bfloat16 and the modules
    under CPU bfloat16 autocast).

    Modules: timm's ``CbamModule`` (when timm is installed), ``CBAM(preset="timm")`` on the reference
    path, fused on the plain-torch passes, fused on the C++ engine (when it builds) and, with
    ``compile_reference``, ``torch.compile`` of the reference. ``repeats`` rounds time the forward,
    ``train_repeats`` (default ``max(3, repeats // 2)``) the forward+backward. Then, per shape, what
    ``impl="auto"`` takes there (``auto_choice``).
    """
    batch, repeats = check_int("batch", batch), check_int("repeats", repeats)
    train_repeats = max(3, repeats // 2) if train_repeats is None else check_int("train_repeats", train_repeats)
    shapes = [(check_int("channels", c), check_int("side", h)) for c, h in shapes]
    if not shapes:
        raise ValueError("module_table expects at least one (C, H) shape, got none")
    notes: list[str] = []
    names = _peer_names(compile_reference, notes)
    peer = names[0]
    rows: list[ModuleRow] = []
    auto: list[AutoChoice] = []
    speedups: dict[str, list[tuple[float, float]]] = {}
    for channels, side in shapes:
        torch.manual_seed(0)
        x = _laid_out(torch.randn(batch, channels, side, side, dtype=torch.bfloat16 if amp else None), channels_last)
        leaf, upstream = x.clone().requires_grad_(), torch.randn_like(x)
        modules = _modules(channels, names)
        target = torch.empty_like(x)
        runs = {COPY: lambda x=x, target=target: target.copy_(x)}
        for module in modules.values():
            module.eval()
        forward = interleaved_medians({**runs, **{n: _forward(m, x, amp) for n, m in modules.items()}}, repeats)
        for module in modules.values():
            module.train()
        train = interleaved_medians({n: _forward_backward(m, leaf, upstream, amp) for n, m in modules.items()},
                                    train_repeats)
        for name, module in modules.items():
            with _precision(amp):
                saved = None if name == COMPILED else saved_bytes(module, x) / (x.numel() * x.element_size())
            row = ModuleRow(channels, side, name, 1e3 * forward[name], 1e3 * train[name],
                            _ratio(forward[peer], forward[name]), _ratio(train[peer], train[name]),
                            _ratio(forward[name], forward[COPY]), _ratio(train[name], forward[COPY]), saved)
            rows.append(row)
            if row.forward_speedup is not None and row.train_speedup is not None:
                speedups.setdefault(name, []).append((row.forward_speedup, row.train_speedup))
        rows.append(ModuleRow(channels, side, COPY, 1e3 * forward[COPY], None, None, None, 1.0, None, None))
        auto.append(auto_choice(channels, side, x, leaf, modules[REFERENCE].state_dict(), amp))
    means = [GeometricMean(name, geometric_mean(f for f, _ in pairs), geometric_mean(t for _, t in pairs))
             for name, pairs in speedups.items()]
    return ModuleTable(rows, means, peer, batch, repeats, train_repeats, notes, auto, channels_last, amp)


def _laid_out(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _paired_overheads(samples: dict[str, list[float]], name: str) -> tuple[float, tuple[float, float]]:
    """Median and quartiles of ``name``'s per-round time over ``"none"``'s, minus one."""
    ratios = [t / base - 1 for t, base in zip(samples[name], samples["none"])]
    if len(ratios) == 1:
        return ratios[0], (ratios[0], ratios[0])
    low, _, high = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), (low, high)


def _with_watched_cbams(model: nn.Module) -> nn.Module:
    """``model`` with a forward hook that does nothing on every CBAM: a watched CBAM leaves the block's
    last BatchNorm, addition and ReLU to the block, so this times the fused CBAM alone with those as
    separate ops."""
    for module in model.modules():
        if isinstance(module, CBAM):
            module.register_forward_hook(lambda module, inputs, output: None)
    return model


def resnet_overhead(batch: int = 8, repeats: int = 3, image_size: int = 224,
                    channels_last: bool = False, amp: bool = False) -> ResNetTable:
    """Seconds per training step (forward+backward) and per inference of ResNet-50 on
    ``(batch, 3, image_size, image_size)`` without attention, with CBAM (``preset="timm"``, default
    ``impl="auto"``: fused where the calibration found it faster, the block's last BatchNorm in its passes
    and the residual add and ReLU in its output pass), with the fused CBAM but those block ops separate,
    and with CBAM on the reference path, over ``repeats`` rounds after one
    warm-up (which makes the calibration's decisions, listed in ``auto``); overheads are paired within
    rounds (``ResNetRow``). ``channels_last``: the networks and the input in ``torch.channels_last``; ``amp``:
    their forwards under CPU bfloat16 autocast."""
    batch, repeats = check_int("batch", batch), check_int("repeats", repeats)
    image_size = check_int("image_size", image_size, minimum=32)
    torch.manual_seed(0)
    x = _laid_out(torch.randn(batch, 3, image_size, image_size), channels_last)
    models = {"none": resnet50(attention=None),
              AUTO: resnet50(attention="cbam", preset="timm"),
              SEPARATE_TAIL: _with_watched_cbams(resnet50(attention="cbam", preset="timm")),
              "cbam reference": resnet50(attention="cbam", preset="timm", impl="reference")}
    if channels_last:
        models = {name: model.to(memory_format=torch.channels_last) for name, model in models.items()}
    before = calibration.decisions()
    for model in models.values():
        model.train()
    train = interleaved_samples({n: _forward_backward(m, x, amp=amp) for n, m in models.items()}, repeats, warmup=1)
    for model in models.values():
        model.eval()
    inference = interleaved_samples({n: _forward(m, x, amp) for n, m in models.items()}, repeats, warmup=1)
    rows = [ResNetRow(name, statistics.median(train[name]), *_paired_overheads(train, name),
                      statistics.median(inference[name]), *_paired_overheads(inference, name)) for name in models]
    made = {k: d for k, d in calibration.decisions().items() if k not in before}
    return ResNetTable(rows, batch, image_size, repeats, calibration.describe(made), channels_last, amp)


def _cell(value: float | None, digits: int, suffix: str = "") -> str:
    return "" if value is None else f"{value:.{digits}f}{suffix}"


def _peer_label(peer: str) -> str:
    return "timm" if peer == TIMM else "reference"


def format_module_table(table: ModuleTable) -> str:
    """``table`` as a Markdown table, then the geometric-mean speed-ups as a list."""
    label = _peer_label(table.peer)
    lines = [f"| shape C×H² | module | forward ms | × {label} | × copy | fwd+bwd ms | × {label} | × copy | "
             "saved / input |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in table.rows:
        lines.append(f"| {r.channels}×{r.side}² | {r.name} | {r.forward_ms:.2f} | {_cell(r.forward_speedup, 2)} | "
                     f"{_cell(r.forward_vs_copy, 1)} | {_cell(r.train_ms, 1)} | {_cell(r.train_speedup, 2)} | "
                     f"{_cell(r.train_vs_copy, 1)} | {_cell(r.saved_per_input, 2)} |")
    peer = "timm" if table.peer == TIMM else table.peer
    lines += ["", f"Geometric mean speed-up over {peer} (forward, forward+backward):"]
    lines += [f"- {m.name}: {m.forward:.2f}×, {m.train:.2f}×" for m in table.geometric_means]
    if table.auto:
        lines += ["", format_auto_choices(table.auto)]
    return "\n".join(lines)


def _choice(path: str, ms: tuple[float, float] | None) -> str:
    return path if ms is None else f"{path} (fused {ms[0]:.2f} ms, reference {ms[1]:.2f} ms)"


def format_auto_choices(choices: Sequence[AutoChoice]) -> str:
    """What ``impl="auto"`` took per shape, as a list under a one-line title."""
    how = ("one-time calibration, the fastest of its interleaved runs" if calibration.enabled()
           else f"{calibration.ENV}=0: fused wherever the C++ engine covers the input")
    lines = [f'impl="auto" chose ({how}):']
    lines += [f"- {c.channels}×{c.side}²: inference {_choice(c.inference, c.inference_ms)}, "
              f"training {_choice(c.training, c.training_ms)}" for c in choices]
    return "\n".join(lines)


def _overhead(median: float, quartiles: tuple[float, float]) -> str:
    return f"{median:+.1%} ({quartiles[0]:+.1%} .. {quartiles[1]:+.1%})"


def format_resnet_table(table: ResNetTable) -> str:
    """``table`` as a Markdown table under a one-line title."""
    side = table.image_size
    amp = ", CPU bf16 autocast" if table.amp else ""
    lines = [f"ResNet-50, batch {table.batch}, {side}²{amp}: time per training step (forward+backward) and per "
             "inference, "
             f"{table.repeats} rounds; overhead: median of per-round ratios to 'none' (quartiles)",
             "| attention | train s | overhead | inference s | overhead |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r.name} | {r.train_s:.3f} | {_overhead(r.train_overhead, r.train_quartiles)} | "
              f"{r.inference_s:.3f} | {_overhead(r.inference_overhead, r.inference_quartiles)} |" for r in table.rows]
    if table.auto:
        lines += ["", f'impl="auto" in the ResNet-50 (\'{AUTO}\' row), the calibration\'s decisions:']
        lines += [f"- {line}" for line in table.auto]
    return "\n".join(lines)


@dataclass
class FusedBenchReport:
    """``run``'s result: the environment, the module table and (optionally) the ResNet-50 table."""

    environment: dict
    modules: ModuleTable
    resnet: ResNetTable | None

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        env, modules = self.environment, self.modules
        precision = "bf16 input under CPU bf16 autocast" if modules.amp else "fp32 CPU"
        parts = [f"{env['cpu']}; torch {env['torch']}, {env['threads']} threads, {env['cpus']} CPUs, {env['machine']}",
                 f"{precision}, batch {modules.batch}{', channels-last' if modules.channels_last else ''}; medians of "
                 f"interleaved repeats: {modules.repeats} forward (eval, no autograd), {modules.train_repeats} "
                 "forward+backward (train mode)"]
        parts += [f"Note: {note}" for note in modules.notes]
        parts += ["", format_module_table(modules)]
        if self.resnet is not None:
            parts += ["", format_resnet_table(self.resnet)]
        return "\n".join(parts)


def run(batch: int = 8, repeats: int = 5, shapes: Sequence[tuple[int, int]] = SHAPES, resnet: bool = False,
        compile_reference: bool = False, channels_last: bool = False, amp: bool = False) -> FusedBenchReport:
    """The whole benchmark: ``module_table``, then with ``resnet`` ``resnet_overhead`` at 224² over
    ``max(3, repeats)`` rounds; everything channels-last with ``channels_last``, under CPU bfloat16 autocast
    with ``amp``."""
    modules = module_table(batch, repeats, shapes, compile_reference, channels_last=channels_last, amp=amp)
    overhead = resnet_overhead(batch, max(3, repeats), channels_last=channels_last, amp=amp) if resnet else None
    return FusedBenchReport(environment(), modules, overhead)
