"""Compile every Triton kernel the fused CBAM launches for a GPU, on a machine without one.

    python -m cbam.profile.triton_targets [--arch 90] [--json FILE]

Two steps, in two processes: a workload of fused CBAM calls (float32/bfloat16/float16, presets with
and without a spatial BatchNorm, training and eval, the residual tail, the folded BatchNorm) runs on
the Triton engine in Triton's interpreter, recording each kernel's arguments as Triton would
specialise them on a GPU (pointer and integer divisibility by 16, integers equal to 1 made
constant); then each recorded specialisation is compiled with Triton's own compiler for CUDA
``sm_<arch>`` (through PTX to a cubin with ``ptxas``), and each cubin's registers per thread and
spills read back (``cuobjdump -res-usage``), and its ``tt.dot`` operations counted (Triton rewrites some
reductions of products into a dot, TF32 for float32: none may hold one). It proves the kernels lower for
the GPU and that no specialisation spills registers to memory (a bandwidth-bound pass that spills reads and writes local
memory besides its tensors), not that they are right there: the interpreter's tests say that, and
``cbam.profile.cuda_check`` on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable

import torch

# (B, C, H, W): odd sizes, and one whose tiles are full (TILE elements, 8 warps: the most registers per thread,
# as a network's shapes on a GPU have)
SHAPES = ((2, 17, 3, 4), (2, 64, 8, 8))
TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
         torch.int64: "i64", torch.int32: "i32"}


def _encoded(value):
    """A constant as JSON holds it (a Triton dtype by its name)."""
    import triton.language as tl

    return {"dtype": value.name} if isinstance(value, tl.dtype) else value


def _argument(value) -> tuple[str, object, bool]:
    """``(signature type, constant or None, divisible by 16)`` of a launch argument that is not declared
    constant, as Triton specialises it on a GPU (``None`` and integers equal to 1 become constants)."""
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype], None, value.data_ptr() % 16 == 0
    if value is None or isinstance(value, bool) or (isinstance(value, int) and value == 1):
        return "constexpr", value, False
    if isinstance(value, int):
        return ("i32" if -2**31 <= value < 2**31 else "i64"), None, value % 16 == 0
    if isinstance(value, float):
        return "fp32", None, False
    raise TypeError(f"a Triton launch argument of type {type(value).__name__} is not recorded: {value!r}")


def _specialisation(function, args, kwargs) -> dict:
    """One interpreted launch as ``compile_for`` takes it."""
    kernel = function.fn
    declared = inspect.signature(kernel).parameters
    values = dict(zip(function.arg_names, args), **kwargs)
    signature, constants, divisible = {}, {}, []
    for index, name in enumerate(function.arg_names):
        if "constexpr" in str(declared[name].annotation):
            signature[name], constants[name] = "constexpr", _encoded(values[name])
            continue
        signature[name], constant, aligned = _argument(values.get(name))
        if signature[name] == "constexpr":
            constants[name] = constant
        if aligned:
            divisible.append(index)
    options = {key: kwargs[key] for key in ("num_warps", "num_stages") if key in kwargs}
    return {"module": kernel.__module__, "kernel": kernel.__name__, "signature": signature, "constants": constants,
            "divisible": divisible, "options": options}


@contextlib.contextmanager
def interpreted_launches(note: Callable[[object, tuple, dict], None]):
    """Call ``note(function, args, kwargs)`` at each kernel launch the interpreter runs. A launch goes through
    ``InterpretedFunction.run`` in Triton 3.6 and 3.8, through ``__getitem__`` (which returns the launcher
    of a grid) in Triton 3.4."""
    from triton.runtime import interpreter

    interpreted = interpreter.InterpretedFunction
    if hasattr(interpreted, "run"):
        name, original = "run", interpreted.run

        def patched(function, *args, grid, warmup, **kwargs):
            note(function, args, kwargs)
            return original(function, *args, grid=grid, warmup=warmup, **kwargs)
    else:
        name, original = "__getitem__", interpreted.__getitem__

        def patched(function, grid):
            launch = original(function, grid)

            def recorded(*args, **kwargs):
                note(function, args, kwargs)
                return launch(*args, **kwargs)
            return recorded

    setattr(interpreted, name, patched)
    try:
        yield
    finally:
        setattr(interpreted, name, original)


@contextlib.contextmanager
def recording(found: dict):
    """Record, into ``found``, each interpreted kernel launch's specialisation (one entry per distinct one)."""
    def note(function, args, kwargs) -> None:
        row = _specialisation(function, args, kwargs)
        found.setdefault(json.dumps(row, sort_keys=True), row)

    with interpreted_launches(note):
        yield found


def workload() -> None:
    """Fused CBAM forwards and backwards covering the kernels' specialisations a network meets."""
    from torch import nn

    import cbam
    from cbam.ops import engines

    configurations = [(dtype, preset, training, residual, fold)
                      for dtype in (torch.float32, torch.bfloat16, torch.float16) for preset in ("timm", "paper")
                      for training in (True, False) for residual in (False, True) for fold in (False, True)]
    with engines.using("triton"):
        for shape in SHAPES:
            for dtype, preset, training, residual, fold in configurations:
                torch.manual_seed(0)
                module = cbam.CBAM(shape[1], preset=preset, impl="fused").train(training)
                norm = nn.BatchNorm2d(shape[1]).train(training) if fold else None
                x = torch.randn(shape, dtype=dtype, requires_grad=True)
                shortcut = torch.randn(shape, dtype=dtype) if residual else None
                module(x, shortcut, input_norm=norm).float().sum().backward()


def recorded_specialisations() -> list[dict]:
    """The workload's kernel specialisations (run with ``TRITON_INTERPRET=1`` set before Triton loads)."""
    found: dict = {}
    with recording(found):
        workload()
    return list(found.values())


def compile_for(rows: list[dict], arch: int) -> list[str]:
    """Compile each recorded specialisation for CUDA ``sm_<arch>`` and note its ``resources`` in its row;
    one line per failure."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    dtypes = {dtype.name: dtype for dtype in (tl.float32, tl.float64)}
    failures = []
    for row in rows:
        kernel = getattr(importlib.import_module(row["module"]), row["kernel"])
        constants = {(kernel.arg_names.index(name),): dtypes[value["dtype"]] if isinstance(value, dict) else value
                     for name, value in row["constants"].items()}
        attributes = {(index,): [["tt.divisibility", 16]] for index in row["divisible"]}
        source = ASTSource(kernel, row["signature"], constants, attributes)
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=row["options"])
        except Exception as error:  # noqa: BLE001 - every failure is reported, none stops the others
            failures.append(f"{row['kernel']} {row['constants']}: {type(error).__name__}: {str(error)[:400]}")
            continue
        row["resources"] = resources(compiled.asm["cubin"])
        row["dots"] = compiled.asm["ttgir"].count("tt.dot")
    return failures


def resources(cubin: bytes) -> dict[str, int] | None:
    """A compiled kernel's registers per thread (``REG``), spill memory per thread (``STACK``, ``LOCAL``: 0
    where nothing spills) and static shared memory (``SHARED``, bytes), by ``cuobjdump -res-usage``; ``None``
    without Triton's cuobjdump."""
    from triton.tools.disasm import path_to_cuobjdump

    try:
        tool = path_to_cuobjdump()
    except Exception:  # noqa: BLE001 - a Triton without the tool: nothing to report
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        report = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    found = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", report)}
    return found if "REG" in found else None


def spills(rows: list[dict], tolerated: int = 0) -> list[str]:
    """One line per compiled specialisation that spills more than ``tolerated`` bytes per thread to memory."""
    def spilled(found: dict | None) -> int:
        return 0 if found is None else found.get("STACK", 0) + found.get("LOCAL", 0)
    return [f"{row['kernel']} {row['constants']} {row['options']}: {row['resources']}" for row in rows
            if spilled(row.get("resources")) > tolerated]


def dots(rows: list[dict]) -> list[str]:
    """One line per compiled specialisation whose products Triton turned into ``tt.dot`` (TF32 for float32 on
    a GPU: the engine's sums must stay float32 FMAs)."""
    return [f"{row['kernel']} {row['constants']}: {row['dots']} tt.dot" for row in rows if row.get("dots")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability as one number (90: H100)")
    parser.add_argument("--json", help="write the recorded specialisations here")
    parser.add_argument("--record", action="store_true", help=argparse.SUPPRESS)  # the interpreter step
    args = parser.parse_args(argv)
    if args.record:
        json.dump(recorded_specialisations(), sys.stdout)
        return 0
    environment = dict(os.environ, TRITON_INTERPRET="1")
    recorded = subprocess.run([sys.executable, "-m", "cbam.profile.triton_targets", "--record"],
                              capture_output=True, text=True, env=environment)
    if recorded.returncode != 0:
        print(f"triton_targets: the interpreted workload failed: {recorded.stderr.strip().splitlines()[-1:]}")
        return 1
    rows = json.loads(recorded.stdout)
    failures = compile_for(rows, args.arch)
    if args.json:
        from ..atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps(rows, indent=1))
    kernels = sorted({row["kernel"] for row in rows})
    print(f"compiled {len(rows) - len(failures)} of {len(rows)} specialisations of {len(kernels)} Triton kernels "
          f"for sm_{args.arch}")
    for kernel in kernels:
        registers = [row["resources"]["REG"] for row in rows if row["kernel"] == kernel and row.get("resources")]
        if registers:
            print(f"  {kernel}: {min(registers)}-{max(registers)} registers per thread")
    spilled = spills(rows)
    print(f"{len(spilled)} specialisations spill registers" + "".join(f"\nSPILLS {line}" for line in spilled))
    dotted = dots(rows)
    print(f"{len(dotted)} specialisations hold a tt.dot" + "".join(f"\nDOT {line}" for line in dotted))
    for line in failures:
        print(f"FAILED {line}")
    return 1 if failures or dotted else 0


if __name__ == "__main__":
    raise SystemExit(main())
