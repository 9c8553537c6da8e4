"""Triton's own host launch path, timed on a machine without a GPU.

On a GPU an eager CBAM call costs the host our wrappers' Python plus Triton's launch of each kernel
(binding and specialising the arguments, the cache lookup, the launch metadata) plus the driver call.
``launch_path_without_gpu`` runs all of it but the driver call on the CPU: a stand-in CUDA driver
reports an H100 (``sm_<arch>``), each kernel compiles for it through Triton's own compiler (as
``triton_targets`` does), and the compiled kernel's launcher is replaced by a counter. The kernels do
not run, so what they would write stays unwritten: the calls are for timing the host, never for
their results.

The Triton engine's kernels must have been decorated without ``TRITON_INTERPRET`` (as on a GPU), so
call it in a process that has not imported ``cbam.ops.engines.triton_ops`` under the interpreter.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def _stand_in_driver(arch: int):
    """A CUDA driver that answers what Triton's launch path asks: the target, device 0, stream 0."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class StandInDriver(DriverBase):
        @classmethod
        def is_active(cls) -> bool:
            return True

        def map_python_to_cpp_type(self, ty: str) -> str:
            return ty

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise NotImplementedError("the stand-in driver times nothing on a device")

        def get_current_device(self) -> int:
            return 0

        def get_current_stream(self, device: int | None = None) -> int:
            return 0

    return StandInDriver()


@contextlib.contextmanager
def launch_path_without_gpu(arch: int = 90, record: list | None = None) -> Iterator[list[int]]:
    """Within it, the Triton engine takes CPU tensors and each launch goes through Triton's host path
    (``JITFunction.run``) to a launcher that only counts: yields ``[launches so far]``. With a ``record``
    list, each launch also appends ``(compiled kernel, the launcher's arguments)`` to it."""
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime import driver

    import cbam.ops.engines.triton_ops  # noqa: F401 - the kernels, decorated as for a GPU
    from cbam.ops.engines.triton_ops import pooling

    if not hasattr(pooling._pool_kernel, "device_caches"):
        raise RuntimeError("launch_path_without_gpu needs the Triton engine's kernels decorated without "
                           "TRITON_INTERPRET; run it in a process that did not import them under the interpreter")
    launches = [0]

    def load_counter(kernel: CompiledKernel) -> None:
        if kernel.module is not None:
            return

        def counted(*args) -> None:
            launches[0] += 1
            if record is not None:
                record.append((kernel, args))

        kernel.module, kernel.function = "stand-in", 0
        if isinstance(getattr(type(kernel), "run", None), property):  # Triton 3.6+: ``run`` reads ``_run``
            kernel._run = counted
        else:  # Triton 3.4: the launcher is ``run`` itself
            kernel.run = counted

    previous_env, previous_load = os.environ.get("TRITON_INTERPRET"), CompiledKernel._init_handles
    os.environ["TRITON_INTERPRET"] = "1"  # the engine covers CPU tensors (the kernels are already decorated)
    driver.set_active(_stand_in_driver(arch))
    CompiledKernel._init_handles = load_counter
    try:
        yield launches
    finally:
        CompiledKernel._init_handles = previous_load
        try:
            driver.reset_active()
        except RuntimeError:  # no GPU driver at all: back to none chosen yet
            driver.set_active(None)
        if previous_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous_env
