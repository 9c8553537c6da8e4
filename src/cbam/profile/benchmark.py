"""``benchmark``: latency and memory of modules, side by side in one run.

Latency is the median over repeats after warm-up, with every module run once per round so that
drift (other processes, clock changes) hits all of them alike; CUDA work is synchronised before
each clock read. Memory is the bytes autograd saves for backward (recorded with
``torch.autograd.graph.saved_tensors_hooks``; each storage counted once, parameters and buffers
left out, the input included), which is what a layer adds to training memory per step, and on
CUDA the peak allocated during a training step. ``tracemalloc`` cannot see tensor memory, so no
CPU peak is reported.
"""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from ..debug.buffers import restored_buffers
from ..debug.outputs import floating_tensors
from ..tables import format_bytes, format_table
from ..validation import check_int

VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "sve")  # /proc/cpuinfo's names, as lscpu's


def cpu_name() -> str:
    """The CPU's model and which of ``VECTOR_FLAGS`` it has, as a speed figure must name them:
    ``"AMD EPYC (avx2 avx512f avx512_bf16)"``; the machine's type where ``/proc/cpuinfo`` cannot be read."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first CPU's
    model = fields.get("model name") or fields.get("Model") or platform.machine()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    present = [flag for flag in VECTOR_FLAGS if flag in flags]
    return f"{model} ({' '.join(present)})" if present else model


def _leaves(inputs: tuple) -> tuple:
    """``inputs`` with each floating tensor (also inside lists, tuples, dicts) replaced by a fresh leaf
    that requires grad."""
    return pytree.tree_map(lambda x: x.detach().clone().requires_grad_()
                           if isinstance(x, Tensor) and x.is_floating_point() else x, inputs)


def _train_step(module: nn.Module, inputs: tuple) -> None:
    """Forward and backward of ``sum(outputs)`` to every input and parameter, without touching ``.grad``
    (with autograd on, whatever the caller's grad mode)."""
    leaves = _leaves(inputs)
    wanted = [t for t in (*floating_tensors(list(leaves)), *module.parameters()) if t.requires_grad]
    with torch.enable_grad():
        loss = sum(t.sum() for t in floating_tensors(module(*leaves)))
        torch.autograd.grad(loss, wanted, allow_unused=True)


def saved_bytes(module: nn.Module, *inputs) -> int:
    """Bytes of the distinct storages autograd saves for backward in ``module(*inputs)``, parameters
    and buffers excluded (floating inputs are made leaves that require grad, as inside a network)."""
    own = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = module(*_leaves(inputs))
    del output
    return sum(storages.values())


def _peak_bytes(module: nn.Module, inputs: tuple, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    _train_step(module, inputs)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


@dataclass
class BenchmarkRow:
    """One module: median milliseconds of a forward (no autograd) and of a training step (forward +
    backward), bytes saved for backward, and the CUDA peak of a training step (``None`` elsewhere)."""

    name: str
    forward_ms: float
    train_ms: float | None
    saved_bytes: int
    peak_bytes: int | None


@dataclass
class BenchmarkReport:
    """``benchmark``'s result: ``rows`` in the order given; ratios in ``str()`` are against the first."""

    rows: list[BenchmarkRow]
    device: str
    machine: str
    threads: int
    warmup: int
    repeats: int

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        base = self.rows[0]

        def ratio(value, reference) -> str:
            return f"{value / reference:.2f}" if value is not None and reference else "-"

        table = format_table(
            ["module", "forward ms", "ratio", "train step ms", "ratio", "saved for backward", "peak"],
            [[r.name, f"{r.forward_ms:.3f}", ratio(r.forward_ms, base.forward_ms),
              "-" if r.train_ms is None else f"{r.train_ms:.3f}", ratio(r.train_ms, base.train_ms),
              format_bytes(r.saved_bytes), "-" if r.peak_bytes is None else format_bytes(r.peak_bytes)]
             for r in self.rows],
            align="lrrrrrr",
        )
        head = (f"{self.device} ({self.machine}, {self.threads} threads, torch {torch.__version__}); "
                f"median of {self.repeats} after {self.warmup} warm-up")
        return f"{head}\n{table}"


def interleaved_samples(runs: Mapping[str, Callable[[], object]], repeats: int,
                        warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each of ``runs`` (``{name: callable}``, CPU work) in each of ``repeats`` rounds after
    ``warmup`` rounds, every run once per round so that drift hits all alike; round ``r`` starts at the
    ``r``-th run (in turn), so that no run always follows the same one."""
    repeats, warmup = check_int("repeats", repeats), check_int("warmup", warmup, minimum=0)
    for _ in range(warmup):
        for run in runs.values():
            run()
    names = list(runs)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            runs[name]()
            samples[name].append(time.perf_counter() - start)
    return samples


def interleaved_medians(runs: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each of ``runs`` over the rounds of ``interleaved_samples``."""
    return {name: statistics.median(times) for name, times in interleaved_samples(runs, repeats, warmup).items()}


def _clock(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 1e3 * (time.perf_counter() - start)


def benchmark(modules: nn.Module | Mapping[str, nn.Module], *inputs, warmup: int = 3, repeats: int = 10,
              backward: bool = True) -> BenchmarkReport:
    """Time and measure ``modules`` (one module, or ``{name: module}`` to compare) on the same ``inputs``.

    Modules run in their current mode (``eval()`` for inference numbers) on the inputs' device; their
    buffers (BatchNorm statistics, counters) are restored afterwards. ``backward=False`` skips the
    training-step timing. Gradients are computed with ``torch.autograd.grad``, so no ``.grad``
    attribute is changed.
    """
    if isinstance(modules, nn.Module):
        modules = {type(modules).__name__: modules}
    if not isinstance(modules, Mapping) or not modules:
        raise TypeError(f"benchmark expects an nn.Module or a non-empty {{name: module}} mapping, got {modules!r}")
    for name, module in modules.items():
        if not isinstance(module, nn.Module):
            raise TypeError(f"benchmark expects nn.Module values, got {type(module).__name__} for {name!r}")
    warmup, repeats = check_int("warmup", warmup, minimum=0), check_int("repeats", repeats)
    tensors = floating_tensors(list(inputs))
    device = tensors[0].device if tensors else torch.device("cpu")

    def forward(module: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                module(*inputs)
        return run

    def train(module: nn.Module) -> Callable[[], None]:
        return lambda: _train_step(module, inputs)

    runs = {name: [forward(m)] + ([train(m)] if backward else []) for name, m in modules.items()}
    times: dict[str, list[list[float]]] = {name: [[] for _ in fns] for name, fns in runs.items()}
    with contextlib.ExitStack() as restore:
        for module in modules.values():
            restore.enter_context(restored_buffers(module))
        for round_index in range(warmup + repeats):
            for name, fns in runs.items():
                for fn, samples in zip(fns, times[name]):
                    elapsed = _clock(fn, device)
                    if round_index >= warmup:
                        samples.append(elapsed)
        rows = [
            BenchmarkRow(name, statistics.median(times[name][0]),
                         statistics.median(times[name][1]) if backward else None,
                         saved_bytes(module, *inputs), _peak_bytes(module, inputs, device))
            for name, module in modules.items()
        ]
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return BenchmarkReport(rows, str(device), machine, torch.get_num_threads(), warmup, repeats)
