"""One kernel launch with less of Triton's Python per call: ``launch(kernel, grid, *args, **constants)``
does what ``kernel[grid](*args, **constants)`` does.

On a GPU an eager CBAM call is bound by its host time, and about two fifths of it is Triton's launch
path (``JITFunction.run``: the argument binder, then the cache key, hooks, knobs, the globals check and
the launch metadata around it). Once a specialisation is compiled, ``launch`` keeps only what decides
and performs the launch: Triton's own binder and cache key pick the compiled kernel exactly as
``run`` would, and its launcher is called with the same arguments ``run`` passes. The kernel picked
is remembered under the launch's signature (each tensor's dtype and address modulo 16, every other
argument's value), so that a later launch with the same signature (the same shapes, another batch of
data) skips the binder and the key too; each call site passes the same types at each position, so a
value decides its specialisation (``True == 1`` would not tell a flag from an integer). Anything else takes
Triton's own path: the interpreter, a first (compiling) launch, launch hooks (profilers such as
proton), pre-run hooks, an asynchronous compile, a Triton outside the releases checked (3.6 to 3.8), or
``CBAM_DIRECT_LAUNCH=0`` in the environment. Where Triton's path then finds a compiled kernel that
the direct lookup missed (a Triton whose cache key is built otherwise), every later launch takes
Triton's path. Skipped from ``run``: its check that the globals a kernel read at compile time are
unchanged (the engine's kernels read only constants of their own modules).
"""

from __future__ import annotations

import os

import triton
from torch import Tensor
from triton import knobs
from triton.runtime import driver

try:  # the internals the direct path relies on (Triton 3.6 to 3.8); without them every launch is Triton's own
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.jit import compute_cache_key
except ImportError:  # pragma: no cover - an older or newer Triton
    CompiledKernel = compute_cache_key = None

CHECKED = ((3, 6), (3, 8))  # the Triton releases whose JITFunction.run the direct path follows (read in both)


def _checked_release(version: str) -> bool:
    """Whether Triton ``version`` lies between the releases the direct path was checked against."""
    try:
        release = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return CHECKED[0] <= release <= CHECKED[1]


REMEMBERED = 256  # launch signatures kept per kernel (one per shape and alignment a network meets), then forgotten
_REMEMBERED: dict = {}  # kernel -> {signature: (compiled kernel, its parameters after the positional arguments)}
DIRECT = (compute_cache_key is not None and _checked_release(triton.__version__)
          and os.environ.get("CBAM_DIRECT_LAUNCH", "1") != "0")


def _active(hook) -> bool:
    """Whether a launch hook would call anything: Triton 3.6-3.8 keep each as a chain of calls, empty unless
    a profiler added one (older releases: ``None`` or a function)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _hooked() -> bool:
    """Whether a launch hook or a stage-inspection hook is set: those need Triton's own path."""
    runtime = knobs.runtime
    return (_active(runtime.launch_enter_hook) or _active(runtime.launch_exit_hook)
            or getattr(runtime, "add_stages_inspection_hook", None) is not None)


def _give_up() -> None:
    """Send every later launch through Triton's own path."""
    global DIRECT
    DIRECT = False


def _signature(device: int, debug, mode, args: tuple, constants: dict) -> tuple:
    """What decides a launch's compiled kernel, exactly: the device and knobs, each tensor's dtype and address
    modulo 16 (Triton specialises pointers on 16-byte alignment), every other argument's value, the constants'
    (stricter than Triton's specialisation, which sees only an integer's divisibility by 16 and whether it is 1)."""
    found = [(a.dtype, a.data_ptr() & 15) if isinstance(a, Tensor) else a for a in args]
    return device, debug, mode, *found, *constants.items()


def launch(kernel, grid: tuple[int, ...], *args, **constants) -> None:
    """``kernel[grid](*args, **constants)``; ``grid`` a tuple of 1-3 ints."""
    caches = getattr(kernel, "device_caches", None)  # absent in the interpreter
    if not DIRECT or caches is None or kernel.pre_run_hooks or _hooked():
        kernel[grid](*args, **constants)
        return
    device = driver.active.get_current_device()
    debug, mode = kernel.debug or knobs.runtime.debug, knobs.compilation.instrumentation_mode
    signature = _signature(device, debug, mode, args, constants)
    remembered = _REMEMBERED.setdefault(kernel, {})
    found = remembered.get(signature)
    if found is None:  # Triton's binder and cache key, as ``run``: the options in its order (the key is their text)
        kernel_cache, key_cache, _, _, binder = caches[device]
        bound, specialisation, options = binder(*args, **constants, debug=debug, instrumentation_mode=mode)
        compiled = kernel_cache.get(compute_cache_key(key_cache, specialisation, options))
        if type(compiled) is not CompiledKernel:  # not compiled yet, or a future of an asynchronous compile
            known = len(kernel_cache)
            kernel[grid](*args, **constants)
            if len(kernel_cache) == known:  # Triton found a kernel under another key: its internals differ
                _give_up()
            return
        if len(remembered) >= REMEMBERED:
            remembered.clear()
        found = remembered[signature] = compiled, tuple(bound)[len(args):]
    compiled, named = found
    stream = driver.active.get_current_stream(device)
    size = len(grid)
    # no launch metadata and no hooks: the launcher calls a hook only when it is not None, and the chains are empty
    compiled.run(grid[0], grid[1] if size > 1 else 1, grid[2] if size > 2 else 1, stream, compiled.function,
                 compiled.packed_metadata, None, None, None, *args, *[constants[name] for name in named])
