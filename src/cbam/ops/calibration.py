"""One-time calibration of ``impl="auto"`` on the C++ engine, cached for the process (like
``torch.backends.cudnn.benchmark``): the first time a CBAM meets a ``Key`` (input shape, dtype and
layout, inference or training, residual tail, folded BatchNorm, the module's settings, threads), its fused
path and its reference path are timed on detached copies of that call's inputs, and the faster one
is kept for every later call with that key.

Why: the fused C++ passes are several times faster than the reference on some CPUs and slower on
others for some shapes and modes (issue 16: on an AMD Zen 3 the fused inference forward took 2× the
reference's time at 512×28²); no fixed rule measured on the CPUs we had holds on the ones we did not.

How: ``REPEATS`` interleaved rounds after one warm-up of each path (the order alternates between
rounds), the fastest run of each compared; ties go to the fused path (it saves less for backward: for float32,
and for bfloat16 read as stored, about half what the reference saves; a widened float16 input, its float32
copy, about as much). The
fastest, not the median: on a shared machine a run is delayed by others (with two OpenMP threads and
other jobs on two cores, every parallel region could wait a scheduler slice: a 3 MB copy took 8 ms),
never sped up; a median of three such runs once chose the reference at 2048×7², where the fused
forward was 2–3× faster in every other measurement. Inference times a
forward; training a forward and ``torch.autograd.grad`` of it to the inputs and parameters that
require grad (so no ``.grad`` is touched). The buffers the runs may update (BatchNorm running
statistics, ``num_batches_tracked``) are restored afterwards. The clock is ``timer`` (tests replace it).

Off switch: ``CBAM_CALIBRATE=0``, or ``torch.use_deterministic_algorithms(True)`` (then ``"auto"`` fuses
wherever a compiled engine covers the input, as before calibration existed: runs repeat bitwise). Never
under ``torch.compile``, tracing or export: the caller decides there as before. ``decisions()`` shows what
was chosen; ``clear()`` forgets it.

This module knows nothing of modules: the caller (``CBAM.fuses``) passes the key and two callables.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .engines import engine_for

ENV = "CBAM_CALIBRATE"
REPEATS = 5  # timed rounds per path after one warm-up
_ON, _OFF = ("1", "true", "yes", "on", ""), ("0", "false", "no", "off")


@dataclass(frozen=True)
class Key:
    """What a decision is cached under: ``x``'s shape and dtype, ``training`` (autograd records the call:
    forward+backward timed) or inference (forward timed), a residual tail, a folded BatchNorm, the
    module's settings that change its cost (``config``), torch's intra-op threads, the CPU ``autocast``
    dtype (``None`` where off; ``choose`` fills it in) and whether ``x`` is channels-last (both paths
    cost otherwise than on a contiguous ``x``)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    training: bool
    residual: bool
    fold: bool
    config: tuple = ()
    threads: int = 0
    autocast: torch.dtype | None = None
    channels_last: bool = False


@dataclass(frozen=True)
class Decision:
    """The path chosen for a key and the fastest run of each path, in seconds."""

    fused: bool
    fused_s: float
    reference_s: float

    @property
    def path(self) -> str:
        return "fused" if self.fused else "reference"


def enabled() -> bool:
    """``CBAM_CALIBRATE``: on unless ``0``/``false``/``no``/``off`` (default on)."""
    value = os.environ.get(ENV, "1").strip().lower()
    if value not in _ON + _OFF:
        raise ValueError(f"{ENV} must be 1 or 0 (or true/false, yes/no, on/off), got {value!r}")
    return value in _ON


def applies(x: Tensor) -> bool:
    """Whether a call on ``x`` is calibrated: switched on, not compiling or tracing, torch not asked for
    deterministic algorithms (``torch.use_deterministic_algorithms``: a choice by timing may differ from run to
    run, and the two paths round differently), and on the C++ engine (the Triton engine and an explicitly
    requested torch engine are used as before)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting() or x.numel() == 0:
        return False
    if torch.are_deterministic_algorithms_enabled():
        return False
    return enabled() and engine_for(x) == "cpp"


def autocast_dtype() -> torch.dtype | None:
    """The CPU autocast dtype calls run under (``None`` where off): the reference then computes its MLP and conv
    in it, the fused path in float32, so a decision taken under autocast says nothing without it."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None


def timer(path: str, run: Callable[[], None]) -> float:
    """Wall seconds of ``run()``, one call of ``path`` (``"fused"`` or ``"reference"``)."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


_decisions: dict[Key, Decision] = {}
_answers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # owner -> {quick key: fused?}
_lock = threading.RLock()


def decisions() -> dict[Key, Decision]:
    """Every decision of this process so far (a copy)."""
    with _lock:
        return dict(_decisions)


def clear() -> None:
    """Forget every decision: the next call of each key is timed again."""
    with _lock:
        _decisions.clear()
        _answers.clear()


Run = Callable[[Tensor, Tensor | None], Tensor]


def decide(owner: object, quick: tuple, call: Callable[[], tuple]) -> bool:
    """Whether ``owner`` (a module) takes the fused path for a call it describes cheaply by ``quick``: its
    answer for ``quick`` if it has one, else ``choose(*call())`` (``call`` builds the ``Key`` and the runs,
    which costs more than a lookup: a ResNet-50 asks 32 times per forward)."""
    quick = (*quick, autocast_dtype())
    with _lock:
        answers = _answers.get(owner)
        if answers is None:
            answers = _answers[owner] = {}
        if quick not in answers:
            answers[quick] = choose(*call())
        return answers[quick]


def choose(key: Key, fused: Run, reference: Run, x: Tensor, residual: Tensor | None = None,
           params: Sequence[Tensor] = (), buffers: Sequence[Tensor] = ()) -> bool:
    """Whether the call of ``key`` (under this call's autocast) takes the fused path: the cached decision, else
    ``calibrate``'s."""
    key = replace(key, autocast=autocast_dtype())
    with _lock:
        found = _decisions.get(key)
        if found is None:
            found = _decisions[key] = calibrate(key, fused, reference, x, residual, params, buffers)
    return found.fused


def calibrate(key: Key, fused: Run, reference: Run, x: Tensor, residual: Tensor | None = None,
              params: Sequence[Tensor] = (), buffers: Sequence[Tensor] = ()) -> Decision:
    """Time ``fused(x, residual)`` against ``reference(x, residual)`` on detached copies of the inputs (for
    ``key.training`` a forward and ``torch.autograd.grad`` to the copies and ``params`` that require grad,
    else a forward without autograd) and restore ``buffers`` afterwards."""
    inputs = [None if t is None else t.detach().clone().requires_grad_(key.training and t.requires_grad)
              for t in (x, residual)]
    wanted = [t for t in (*inputs, *params) if t is not None and t.requires_grad] if key.training else []
    saved = [b.detach().clone() for b in buffers]

    def step(run: Run) -> Callable[[], None]:
        def go() -> None:
            if not wanted:
                with torch.no_grad():
                    run(*inputs)
                return
            with torch.enable_grad():
                out = run(*inputs)
                torch.autograd.grad(out, wanted, torch.ones_like(out), allow_unused=True)
        return go

    runs = {"fused": step(fused), "reference": step(reference)}
    times: dict[str, list[float]] = {"fused": [], "reference": []}
    try:  # identity hooks shadow a caller's saved-tensor hooks (``saved_bytes`` must not see these runs)
        with torch.autograd.graph.saved_tensors_hooks(_same, _same):
            _time(runs, times)
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)
    fused_s, reference_s = min(times["fused"]), min(times["reference"])
    return Decision(fused_s <= reference_s, fused_s, reference_s)


def _same(t: Tensor) -> Tensor:
    return t


def _time(runs: dict[str, Callable[[], None]], times: dict[str, list[float]]) -> None:
    """One warm-up of each run, then ``REPEATS`` interleaved rounds, the order alternating."""
    for name, run in runs.items():
        timer(name, run)  # warm-up: lazy loads, output blocks, caches
    for round_ in range(REPEATS):
        for name in (("fused", "reference") if round_ % 2 == 0 else ("reference", "fused")):
            times[name].append(timer(name, runs[name]))


def describe(decision_map: dict[Key, Decision] | None = None) -> list[str]:
    """One line per decision: shape, mode, tail, fold, the path and both times."""
    lines = []
    for key, decision in (decisions() if decision_map is None else decision_map).items():
        shape = "×".join(str(n) for n in key.shape)
        extras = ", ".join(name for name, on in (("channels-last", key.channels_last), ("residual", key.residual),
                                                 ("fold", key.fold)) if on)
        lines.append(f"{shape} {str(key.dtype).removeprefix('torch.')} {'training' if key.training else 'inference'}"
                     f"{f' ({extras})' if extras else ''}: {decision.path} "
                     f"(fused {1e3 * decision.fused_s:.2f} ms, reference {1e3 * decision.reference_s:.2f} ms)")
    return lines


__all__ = ["ENV", "REPEATS", "Decision", "Key", "applies", "autocast_dtype", "calibrate", "choose", "clear", "decide",
           "decisions", "describe", "enabled", "timer"]
