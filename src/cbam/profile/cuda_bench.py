"""The CUDA benchmark (``cbam bench --device cuda``): CBAM modules at ResNet-50 stage shapes in three
precisions, then ResNet-50 with and without CBAM; as data (``module_table``, ``resnet_table``, ``run``)
and as Markdown.

Modules, ``x: (batch, C, H, H)`` channels-last at the stage shapes of ``fused_bench.SHAPES``, in each
mode of ``MODES``: ``fp32`` (float32 input and weights), ``bf16`` (bfloat16 input and weights),
``bf16-autocast`` (float32 weights, bfloat16 input, run under ``torch.autocast(device, bfloat16)``).
Rows: timm's ``CbamModule`` eager and ``torch.compile``'d (when timm is installed), ``CBAM(preset="timm")``
on the reference path and with ``impl="auto"`` (the fused path on the engine ``engine_for(x)`` names,
``triton`` on CUDA; each row says which), optionally ``torch.compile`` of ours, and a copy of ``x`` into
preallocated memory as the floor. Forward: eval mode, no autograd. Forward+backward: train mode, input
and weight gradients from a fixed dense upstream gradient, reset to ``None`` first. On CUDA each time
is the median of ``triton.testing.do_bench`` (CUDA events, the L2 cache flushed before each call);
elsewhere (tests) ``host_timer``. "× copy" is time over the copy's (lower is better); "× timm" and
"× compiled" are timm's times over this row's (speed-up, higher is better); a CUDA-graph row's "× timm" is
over timm's CUDA-graph row.

ResNet-50 (``resnet_table``): batch 128, 224², channels-last, ``cudnn.benchmark=True``, SGD (momentum 0.9)
on cross-entropy of random labels; per model and precision (``bf16-autocast``, ``fp32``): a training step
(zero_grad, forward, backward, step) and an inference (eval, no autograd), each the median of ``steps``
after ``warmup`` steps (CUDA events per step), and the peak memory of the timed training steps
(``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; parameters, gradients, optimizer
state and activations). Models run one after another, each alone on the device. Every figure is also
given as a ratio to the plain ResNet-50 of the same precision (and compilation) in the same run.
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..convert import from_timm
from ..models import resnet50
from ..nn import CBAM
from ..ops import engine_for
from ..validation import check_int
from .fused_bench import SHAPES, _forward, _forward_backward, _ratio, _timm_cbam

MODES = ("fp32", "bf16", "bf16-autocast")
RESNET_PRECISIONS = ("bf16-autocast", "fp32")

TIMM = "timm CbamModule"
COMPILED_TIMM = "torch.compile(timm)"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")  # torch.compile's, for the ResNet-50s
REFERENCE = "cbam reference"
FUSED = "cbam auto"
COMPILED_OURS = "torch.compile(cbam auto)"
GRAPHED = {TIMM: "timm CbamModule, CUDA graph", FUSED: "cbam auto, CUDA graph"}  # --graphs: replayed, no host work
COPY = "copy"

PLAIN = "plain ResNet-50"
OURS = 'cbam.models.resnet50(preset="timm")'
TIMM_NET = "timm resnet50 attn_layer='cbam'"

Timer = Callable[[Callable[[], object]], float]  # a callable -> its median milliseconds


def require_cuda() -> None:
    """Raise a one-line ``RuntimeError`` where CUDA is not available."""
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda needs a CUDA GPU, and torch.cuda.is_available() is False here")


def do_bench_timer(warmup_ms: int = 10, rep_ms: int = 40) -> Timer:
    """Median milliseconds by ``triton.testing.do_bench`` (CUDA events; L2 flushed before each call)."""
    from triton.testing import do_bench

    return lambda fn: float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def graph_timer(rep_ms: int = 40) -> Timer:
    """Median milliseconds of one call by ``triton.testing.do_bench_cudagraph``: the calls captured in a
    CUDA graph and replayed, so the host's per-call work (Python, dispatch, launches) is left out."""
    from triton.testing import do_bench_cudagraph

    return lambda fn: float(do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))


def host_timer(repeats: int = 3, warmup: int = 1) -> Timer:
    """Median milliseconds of ``repeats`` calls after ``warmup``, by the host clock (synchronising CUDA)."""
    def timer(fn: Callable[[], object]) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            _synchronize()
            start = time.perf_counter()
            fn()
            _synchronize()
            times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times)
    return timer


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def environment(device: str) -> dict:
    """The card (or CPU), torch, Triton and timm versions."""
    versions = {}
    for name in ("triton", "timm"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    cuda = torch.device(device).type == "cuda"
    return {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
            "cuda": torch.version.cuda if cuda else None, **versions}


def _autocast(device: str, on: bool, cache: bool = True):
    """bf16 autocast on ``device`` (``cache=False``: no cache of cast weights, as CUDA graph capture needs)."""
    if not on:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, cache_enabled=cache)


def _in_autocast(fn: Callable[[], None], device: str, on: bool, cache: bool = True) -> Callable[[], None]:
    if not on:
        return fn

    def run() -> None:
        with _autocast(device, True, cache):
            fn()
    return run


@dataclass
class CudaModuleRow:
    """One module in one mode at ``x: (batch, channels, side, side)``: median milliseconds, and ratios
    (``None`` where the peer is missing or the value does not apply). ``engine``: what ``engine_for(x)``
    names for our ``auto`` rows (``fused`` says whether ``auto`` took the fused path)."""

    mode: str
    channels: int
    side: int
    name: str
    forward_ms: float
    train_ms: float | None
    forward_vs_copy: float | None
    train_vs_copy: float | None
    forward_vs_timm: float | None
    train_vs_timm: float | None
    forward_vs_compiled: float | None
    train_vs_compiled: float | None
    engine: str | None = None
    fused: bool | None = None


@dataclass
class CudaModuleTable:
    rows: list[CudaModuleRow]
    batch: int
    layout: str
    modes: list[str]
    device: str
    timer: str
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _cast(module: nn.Module, mode: str) -> nn.Module:
    return module.to(torch.bfloat16) if mode == "bf16" else module


def _module_set(channels: int, mode: str, device: str, compile_timm: bool, compile_ours: bool) -> dict[str, nn.Module]:
    """The modules of one shape and mode, all with timm's (or, without timm, the reference's) weights."""
    found: dict[str, nn.Module] = {}
    timm_class = _timm_cbam()
    reference = CBAM(channels, preset="timm", impl="reference")
    if timm_class is not None:
        timm_module = timm_class(channels)
        reference.load_state_dict(from_timm(timm_module.state_dict()))
        found[TIMM] = timm_module
        if compile_timm:
            twin = timm_class(channels)
            twin.load_state_dict(timm_module.state_dict())
            found[COMPILED_TIMM] = torch.compile(twin, dynamic=False)
    found[REFERENCE] = reference
    found[FUSED] = CBAM(channels, preset="timm", impl="auto")
    found[FUSED].load_state_dict(reference.state_dict())
    if compile_ours:
        ours = CBAM(channels, preset="timm", impl="auto")
        ours.load_state_dict(reference.state_dict())
        found[COMPILED_OURS] = torch.compile(ours, dynamic=False)
    return {name: _cast(module.to(device), mode) for name, module in found.items()}


def module_table(batch: int = 64, shapes: Sequence[tuple[int, int]] = SHAPES, modes: Sequence[str] = MODES,
                 device: str = "cuda", timer: Timer | None = None, compile_timm: bool | None = None,
                 compile_ours: bool = False, layout: str = "channels_last",
                 progress: Callable[[str], None] | None = None, graphs: bool = False,
                 replay_timer: Timer | None = None) -> CudaModuleTable:
    """Time the modules (see the module docstring) at each ``(C, H)`` of ``shapes`` in each of ``modes``.
    ``timer`` defaults to ``do_bench_timer()`` on CUDA and ``host_timer()`` elsewhere; ``compile_timm``
    (default: on CUDA) adds ``torch.compile(timm)`` (when timm is installed), ``compile_ours``
    ``torch.compile`` of ours; ``graphs`` timm's module and ours once more by ``replay_timer`` (default
    ``graph_timer()`` on CUDA, ``timer`` elsewhere), their rows named as in ``GRAPHED`` and their "× timm"
    over timm's replayed row (no "× compiled": compiled timm is not replayed).
    Each shape and mode starts from ``torch._dynamo.reset()``, so recompilation limits never apply."""
    batch = check_int("batch", batch)
    shapes = [(check_int("channels", c), check_int("side", h)) for c, h in shapes]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes or not shapes:
        raise ValueError(f"module_table expects modes among {', '.join(MODES)} and at least one shape, "
                         f"got modes {list(modes)} and shapes {shapes}")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        require_cuda()
    described = "given timer" if timer is not None else ("triton.testing.do_bench medians" if cuda
                                                          else "host-clock medians")
    timer = timer or (do_bench_timer() if cuda else host_timer())
    replay_timer = replay_timer or (graph_timer() if cuda else timer)
    compile_timm = cuda if compile_timm is None else compile_timm
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    notes = [] if _timm_cbam() is not None else ["timm is not installed: no timm rows and no ratios to timm"]
    rows: list[CudaModuleRow] = []
    for mode in modes:
        dtype = torch.float32 if mode == "fp32" else torch.bfloat16
        autocast = mode == "bf16-autocast"
        for channels, side in shapes:
            try:  # a shape that cannot be set up (on a GPU: a sticky CUDA error, memory) leaves the others standing
                torch._dynamo.reset()
                torch.manual_seed(0)
                x = torch.randn(batch, channels, side, side, device=device, dtype=dtype).contiguous(
                    memory_format=memory_format)
                leaf, upstream, target = x.clone().requires_grad_(), torch.randn_like(x), torch.empty_like(x)
                modules = _module_set(channels, mode, device, compile_timm, compile_ours)
                times: dict[str, tuple[float, float | None]] = {
                    COPY: (timer(lambda x=x, target=target: target.copy_(x)), None)}
            except Exception as error:
                notes.append(f"{mode} {channels}x{side}² failed, shape left out: {_first_line(error)}")
                if progress is not None:
                    progress(notes[-1])
                continue
            runs = [(name, module, timer, True) for name, module in modules.items()]
            if graphs:  # autocast's cache of cast weights would be freed under a captured graph
                runs += [(GRAPHED[name], modules[name], replay_timer, False) for name in GRAPHED if name in modules]
            for name, module, clock, cache in runs:
                try:
                    module.eval()
                    forward = clock(_in_autocast(_forward(module, x), device, autocast, cache))
                    module.train()
                    train = clock(_in_autocast(_forward_backward(module, leaf, upstream), device, autocast, cache))
                except Exception as error:  # one failing module leaves the others' numbers standing
                    notes.append(f"{mode} {channels}x{side}² {name} failed, row left out: {_first_line(error)}")
                    if progress is not None:
                        progress(notes[-1])
                    continue
                times[name] = (forward, train)
                if progress is not None:
                    progress(f"{mode} {channels}x{side}² {name}: forward {forward:.3f} ms, fwd+bwd {train:.3f} ms")
            copy_ms = times[COPY][0]
            eager_peers = times.get(TIMM, (None, None)), times.get(COMPILED_TIMM, (None, None))
            replayed_peers = times.get(GRAPHED[TIMM], (None, None)), (None, None)  # no compiled timm is replayed
            for name, (forward, train) in times.items():
                if name == COPY:
                    continue
                timm_times, compiled_times = replayed_peers if name in GRAPHED.values() else eager_peers
                ours, fused_row = name in (FUSED, COMPILED_OURS, GRAPHED[FUSED]), name in (FUSED, GRAPHED[FUSED])
                rows.append(CudaModuleRow(
                    mode, channels, side, name, forward, train, _ratio(forward, copy_ms), _ratio(train, copy_ms),
                    _ratio(timm_times[0], forward), _ratio(timm_times[1], train),
                    _ratio(compiled_times[0], forward), _ratio(compiled_times[1], train),
                    engine_for(x) if ours else None, modules[FUSED].fuses(x) if fused_row else None))
            rows.append(CudaModuleRow(mode, channels, side, COPY, copy_ms, None, 1.0, None, None, None, None, None))
    return CudaModuleTable(rows, batch, layout, list(modes), device, described, notes)


@dataclass
class CudaResNetRow:
    """One ResNet-50 in one precision: median milliseconds per training step and per inference, the
    peak memory (GB, 1e9 bytes; ``None`` off CUDA) of the timed training steps, and each over the plain
    ResNet-50's of the same precision and compilation. ``graph_breaks``: dynamo's count while compiling
    (``None`` when not compiled)."""

    precision: str
    name: str
    compiled: bool
    train_ms: float
    inference_ms: float
    peak_gb: float | None
    train_vs_plain: float | None = None
    inference_vs_plain: float | None = None
    peak_vs_plain: float | None = None
    graph_breaks: int | None = None


@dataclass
class CudaResNetTable:
    rows: list[CudaResNetRow]
    batch: int
    image_size: int
    steps: int
    warmup: int
    device: str
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _timm_resnet50() -> Callable[[], nn.Module] | None:
    try:
        import timm
    except ImportError:
        return None
    return lambda: timm.create_model("resnet50", block_args={"attn_layer": "cbam"})


def step_times(fn: Callable[[], object], steps: int, cuda: bool) -> list[float]:
    """Milliseconds of each of ``steps`` calls (CUDA events on CUDA, else the host clock)."""
    if not cuda:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters
    return int(sum(counters["graph_break"].values()))


def resnet_steps(model: nn.Module, precision: str, *, batch: int, image_size: int, device: str,
                 runner: nn.Module | None = None) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(train_step, inference)`` for ``model`` on random channels-last images and labels: an SGD step
    (momentum 0.9) and a no-grad forward, under bf16 autocast for ``bf16-autocast``, both calling
    ``runner`` (default ``model``; e.g. its compiled twin). The caller sets train or eval mode."""
    autocast = precision == "bf16-autocast"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device=device)
    runner = model if runner is None else runner

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, autocast):
            loss = F.cross_entropy(runner(x), labels)
        loss.backward()
        optimizer.step()

    def inference() -> None:
        with torch.no_grad(), _autocast(device, autocast):
            runner(x)

    return train_step, inference


def measure_resnet(build: Callable[[], nn.Module], precision: str, *, batch: int, image_size: int, steps: int,
                   warmup: int, device: str, compile: bool = False,
                   compile_mode: str = "default") -> tuple[float, float, float | None, int | None]:
    """``(train ms, inference ms, peak GB, graph breaks)`` of one model (see the module docstring); with
    ``compile``, ``torch.compile`` in ``compile_mode`` (one of ``COMPILE_MODES``)."""
    cuda = torch.device(device).type == "cuda"
    torch.manual_seed(0)
    model = build().to(device, memory_format=torch.channels_last)
    breaks = None
    if compile:
        torch._dynamo.reset()
        from torch._dynamo.utils import counters
        counters.clear()
    runner = torch.compile(model, mode=None if compile_mode == "default" else compile_mode) if compile else model
    train_step, inference = resnet_steps(model, precision, batch=batch, image_size=image_size, device=device,
                                         runner=runner)
    model.train()
    for _ in range(warmup):
        train_step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    train = statistics.median(step_times(train_step, steps, cuda))
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    model.zero_grad(set_to_none=True)  # the gradients go before inference is timed
    model.eval()
    for _ in range(warmup):
        inference()
    inference_ms = statistics.median(step_times(inference, steps, cuda))
    if compile:
        breaks = _graph_breaks()
    return train, inference_ms, peak, breaks


def resnet_table(batch: int = 128, image_size: int = 224, steps: int = 20, warmup: int = 5,
                 precisions: Sequence[str] = RESNET_PRECISIONS, compile: bool = False, device: str = "cuda",
                 peer: bool = True, progress: Callable[[str], None] | None = None,
                 compile_mode: str = "default") -> CudaResNetTable:
    """Plain ResNet-50, ``cbam.models.resnet50(preset="timm")`` and (with ``peer``, when timm is installed)
    timm's resnet50 with ``attn_layer="cbam"``, in each of ``precisions``; with ``compile`` each also
    ``torch.compile``'d in ``compile_mode`` (``reduce-overhead``: replayed from CUDA graphs; graph breaks
    counted)."""
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"resnet_table expects compile_mode among {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
    batch, steps = check_int("batch", batch), check_int("steps", steps)
    warmup, image_size = check_int("warmup", warmup, minimum=0), check_int("image_size", image_size, minimum=32)
    unknown = [p for p in precisions if p not in RESNET_PRECISIONS]
    if unknown or not precisions:
        raise ValueError(f"resnet_table expects precisions among {', '.join(RESNET_PRECISIONS)}, "
                         f"got {list(precisions)}")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        require_cuda()
        torch.backends.cudnn.benchmark = True
    models: dict[str, Callable[[], nn.Module]] = {PLAIN: lambda: resnet50(attention=None),
                                                   OURS: lambda: resnet50(preset="timm")}
    notes = []
    timm_net = _timm_resnet50() if peer else None
    if timm_net is not None:
        models[TIMM_NET] = timm_net
    elif peer:
        notes.append("timm is not installed: no timm peer")
    rows: list[CudaResNetRow] = []
    for precision in precisions:
        for compiled in (False, True) if compile else (False,):
            plain = None
            for name, build in models.items():
                try:
                    train, inference, peak, breaks = measure_resnet(
                        build, precision, batch=batch, image_size=image_size, steps=steps, warmup=warmup,
                        device=device, compile=compiled, compile_mode=compile_mode)
                except Exception as error:  # one failing model leaves the others' numbers standing
                    notes.append(f"{precision}{' compiled' if compiled else ''} {name} failed, row left out: "
                                 f"{_first_line(error)}")
                    if progress is not None:
                        progress(notes[-1])
                    plain = plain or False  # without the plain twin, no ratios in this group
                    continue
                finally:  # a failed model's memory too, or it would count in the next one's peak
                    if compiled:
                        torch._dynamo.reset()  # compiled code (and CUDA graphs) may hold the model's tensors
                    gc.collect()  # the model, its gradients and optimizer state go before the next is built
                    if cuda:
                        torch.cuda.empty_cache()
                row = CudaResNetRow(precision, name, compiled, train, inference, peak, graph_breaks=breaks)
                plain = row if plain is None else plain
                if plain:
                    row.train_vs_plain = _ratio(train, plain.train_ms)
                    row.inference_vs_plain = _ratio(inference, plain.inference_ms)
                    row.peak_vs_plain = _ratio(peak, plain.peak_gb)
                rows.append(row)
                if progress is not None:
                    progress(f"{precision}{' compiled' if compiled else ''} {name}: train {train:.1f} ms, "
                             f"inference {inference:.1f} ms, peak {peak if peak is None else f'{peak:.2f} GB'}")
    return CudaResNetTable(rows, batch, image_size, steps, warmup, device, notes)


def _cell(value: float | None, spec: str) -> str:
    return "" if value is None or not math.isfinite(value) else format(value, spec)


def _change(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio - 1:+.0%}"


def format_module_table(table: CudaModuleTable) -> str:
    """One Markdown table per mode."""
    parts = []
    for mode in table.modes:
        parts += [f"{mode}, batch {table.batch}, {table.layout} ({table.timer}, ms); × copy: time over the copy's; "
                  "× timm, × compiled: timm's time over this one's (speed-up; a CUDA-graph row: over timm's "
                  "CUDA-graph row)",
                  "| shape C×H² | module | engine | forward ms | × copy | × timm | × compiled | fwd+bwd ms | × copy | "
                  "× timm | × compiled |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in (r for r in table.rows if r.mode == mode):
            engine = "" if r.engine is None else (r.engine if r.fused is not False else f"reference ({r.engine})")
            parts.append(f"| {r.channels}×{r.side}² | {r.name} | {engine} | {r.forward_ms:.3f} | "
                         f"{_cell(r.forward_vs_copy, '.1f')} | {_cell(r.forward_vs_timm, '.2f')} | "
                         f"{_cell(r.forward_vs_compiled, '.2f')} | {_cell(r.train_ms, '.3f')} | "
                         f"{_cell(r.train_vs_copy, '.1f')} | {_cell(r.train_vs_timm, '.2f')} | "
                         f"{_cell(r.train_vs_compiled, '.2f')} |")
        parts.append("")
    return "\n".join(parts).rstrip()


def format_resnet_table(table: CudaResNetTable) -> str:
    """One Markdown table; "vs plain" is the change over the plain ResNet-50 of the same precision."""
    lines = [f"ResNet-50, batch {table.batch}, {table.image_size}², channels_last, SGD step; medians of {table.steps} "
             f"steps after {table.warmup} warm-up; peak memory of the timed training steps",
             "| model | precision | compiled | train step ms | vs plain | peak GB | vs plain | inference ms | "
             "vs plain | graph breaks |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r.name} | {r.precision} | {'yes' if r.compiled else 'no'} | {r.train_ms:.1f} | "
              f"{_change(r.train_vs_plain)} | {_cell(r.peak_gb, '.2f')} | {_change(r.peak_vs_plain)} | "
              f"{r.inference_ms:.1f} | {_change(r.inference_vs_plain)} | "
              f"{'' if r.graph_breaks is None else r.graph_breaks} |" for r in table.rows]
    return "\n".join(lines)


@dataclass
class Goal:
    """One goal of issue 15 against this run: ``value`` (a ratio) against ``limit``; ``met`` is
    ``value <= limit`` for "at most" goals and ``value >= limit`` for "at least" ones."""

    goal: str
    value: float
    limit: float
    at_most: bool

    @property
    def met(self) -> bool:
        return self.value <= self.limit if self.at_most else self.value >= self.limit


GOAL_SHAPES = ((256, 56), (512, 28))  # where the "× copy" goals apply


def goals(modules: CudaModuleTable | None, resnet: CudaResNetTable | None) -> list[Goal]:
    """The goals of issue 15 that this run measured: module level in fp32 and bf16 (our ``auto`` row:
    forward ≤ 3× copy and forward+backward ≤ 8× copy at 256×56² and 512×28²; forward+backward ≥ 5×
    timm and ≥ 2.5× compiled timm at every shape), ResNet-50 in bf16 autocast and fp32 (ours over
    plain: train step ≤ 1.10, inference ≤ 1.05, peak memory ≤ 1.05; compiled: train step ≤ 1.10)."""
    found: list[Goal] = []
    for r in (modules.rows if modules is not None else []):
        if r.name != FUSED or r.mode not in ("fp32", "bf16"):
            continue
        where = f"{r.mode} {r.channels}×{r.side}²"
        if (r.channels, r.side) in GOAL_SHAPES:
            found += [Goal(f"{where} {what} × copy", v, limit, True)
                      for what, v, limit in (("forward", r.forward_vs_copy, 3.0), ("fwd+bwd", r.train_vs_copy, 8.0))
                      if v is not None]
        found += [Goal(f"{where} fwd+bwd × {peer}", v, limit, False)
                  for v, peer, limit in ((r.train_vs_timm, "timm", 5.0), (r.train_vs_compiled, "compiled timm", 2.5))
                  if v is not None]
    for r in (resnet.rows if resnet is not None else []):
        if r.name != OURS:
            continue
        where = f"ResNet-50 {r.precision}{' compiled' if r.compiled else ''}"
        limits = (("train step", r.train_vs_plain, 1.10),) if r.compiled else (
            ("train step", r.train_vs_plain, 1.10), ("inference", r.inference_vs_plain, 1.05),
            ("peak memory", r.peak_vs_plain, 1.05))
        found += [Goal(f"{where} {what} vs plain", v, limit, True) for what, v, limit in limits if v is not None]
    return found


def format_goals(found: Sequence[Goal]) -> str:
    lines = ["| goal (issue 15) | measured | limit | met |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {g.goal} | {g.value:.2f} | {'≤' if g.at_most else '≥'} {g.limit:.2f} | {'yes' if g.met else 'no'} |"
              for g in found]
    return "\n".join(lines)


@dataclass
class CudaBenchReport:
    """``run``'s result: the environment and the tables asked for."""

    environment: dict
    modules: CudaModuleTable | None
    resnet: CudaResNetTable | None

    def as_dict(self) -> dict:
        data = asdict(self)
        data["goals"] = [{**asdict(g), "met": g.met} for g in goals(self.modules, self.resnet)]
        return data

    def __str__(self) -> str:
        env = self.environment
        parts = [f"{env['device']}: torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
                 f"timm {env['timm']}"]
        for table in (self.modules, self.resnet):
            if table is not None:
                parts += [f"Note: {note}" for note in table.notes]
        if self.modules is not None:
            parts += ["", format_module_table(self.modules)]
        if self.resnet is not None:
            parts += ["", format_resnet_table(self.resnet)]
        found = goals(self.modules, self.resnet)
        if found:
            parts += ["", format_goals(found)]
        return "\n".join(parts)


def run(batch: int = 64, shapes: Sequence[tuple[int, int]] = SHAPES, modes: Sequence[str] = MODES,
        modules: bool = True, resnet: bool = False, resnet_batch: int = 128, steps: int = 20,
        compile: bool = False, device: str = "cuda", progress: Callable[[str], None] | None = None,
        graphs: bool = False, compile_mode: str = "default") -> CudaBenchReport:
    """The whole CUDA benchmark: ``module_table`` (with ``modules``), then with ``resnet`` ``resnet_table``
    in the modes of ``modes`` it has (``fp32``, ``bf16-autocast``); ``compile`` adds the compiled variants
    of ours (modules) and of every ResNet-50 (those in ``compile_mode``), ``graphs`` the modules replayed
    from CUDA graphs."""
    if torch.device(device).type == "cuda":
        require_cuda()
    table = module_table(batch, shapes, modes, device, compile_ours=compile, progress=progress,
                         graphs=graphs) if modules else None
    precisions = [p for p in RESNET_PRECISIONS if p in modes]
    if resnet and not precisions:
        raise ValueError(f"--resnet runs in {' and '.join(RESNET_PRECISIONS)}; --modes has neither: {list(modes)}")
    nets = resnet_table(resnet_batch, steps=steps, precisions=precisions, compile=compile, device=device,
                        progress=progress, compile_mode=compile_mode) if resnet else None
    return CudaBenchReport(environment(device), table, nets)
