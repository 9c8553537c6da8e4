"""How the C++ engine is built: its files, its flags, the build's name and folder, and the build itself.

The build is named ``cbam_cpu_passes_<hash>``, a hash of the sources' paths and contents, the compiler
flags, the target ISA that ``-march=$CBAM_CPU_ARCH`` (default ``native``) means on this machine and the
toolchain (compiler, torch and Python versions, and the install's torch and Python folders). So two installs
on one machine (one checkout in two venvs too), machines of different ISAs sharing ``TORCH_EXTENSIONS_DIR``,
or builds for different ``CBAM_CPU_ARCH`` targets (``x86-64-v3``: AVX2 only, even on an AVX-512 machine)
never load or overwrite each other's builds, and an edited source builds anew under a new name instead of
over the old one. A build prints one line on stderr when it
starts (it takes about a minute, once) and one when it ends, with the seconds it took.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import re
import subprocess
import sys
import sysconfig
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).parent
UNITS = ("bindings.cpp", "forward.cpp", "backward.cpp", "small_steps.cpp", "batch_norm.cpp", "output_cache.cpp")

LDFLAGS = ("-fopenmp",)


@dataclass(frozen=True)
class Built:
    """A loaded build: the module, its name and folder, and the seconds its compile took (``None``: reused)."""

    module: ModuleType
    name: str
    directory: Path
    seconds: float | None


def source_files() -> list[Path]:
    """Every file of ours the build reads: the compiled units and the headers they include."""
    return sorted([*HERE.glob("*.cpp"), *HERE.glob("*.h")])


def build_name(sources: Mapping[str, bytes], flags: Sequence[str], isa: str, toolchain: str = "") -> str:
    """``cbam_cpu_passes_`` and 12 hex digits of a hash of ``sources`` (path -> contents), ``flags``,
    ``isa`` (what the ``-march=`` target resolves to) and ``toolchain``; a change to any of them changes it."""
    digest = hashlib.sha256()
    for part in [*(item for path in sorted(sources) for item in (path.encode(), sources[path])),
                 "\0".join(flags).encode(), isa.encode(), toolchain.encode()]:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return f"cbam_cpu_passes_{digest.hexdigest()[:12]}"


def _output(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_arch() -> str:
    """``CBAM_CPU_ARCH``, the ``-march=`` target to build for: ``native`` (the default), ``x86-64-v3``, ..."""
    arch = os.environ.get("CBAM_CPU_ARCH", "native")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", arch):
        raise ValueError("CBAM_CPU_ARCH must be a -march= target such as native or x86-64-v3 "
                         f"(letters, digits, '-', '_', '.'), got {arch!r}")
    return arch


def flags() -> tuple[str, ...]:
    """The compile flags, for the target ``cpu_arch()``."""
    return (  # -fopenmp: at::parallel_for uses torch's OpenMP runtime; the math flags let reductions vectorise
        "-O3", f"-march={cpu_arch()}", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
        "-fassociative-math", "-fno-signed-zeros",
    )


def compiler() -> str:
    """The C++ compiler torch's build uses: ``$CXX``, else ``c++``."""
    return os.environ.get("CXX", "c++")


def target_isa() -> str:
    """What ``-march=<cpu_arch()>`` means here: the target options the compiler resolves it to (GCC's
    ``-Q --help=target``), or, where the compiler cannot say, the machine and the CPU's flags."""
    return _resolved_isa(cpu_arch())


@functools.cache
def _resolved_isa(arch: str) -> str:
    resolved = _output([compiler(), f"-march={arch}", "-Q", "--help=target"])
    options = sorted(" ".join(line.split()) for line in resolved.splitlines() if line.strip().startswith("-m"))
    if options:
        return "\n".join(options)
    flags = next((line for line in _cpu_info().splitlines() if line.startswith(("flags", "Features"))), "")
    return f"{platform.machine()}\n{' '.join(sorted(flags.split(':', 1)[-1].split()))}"


def _cpu_info() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()


def architecture() -> str:
    """The short name of the target (``znver3``, ``x86-64-v3``, ...), else ``CBAM_CPU_ARCH`` or the machine's."""
    for line in target_isa().splitlines():
        if line.startswith("-march="):
            return line.split()[-1] if len(line.split()) > 1 else line.removeprefix("-march=")
    return cpu_arch() if cpu_arch() != "native" else platform.machine() or "this CPU"


@functools.cache
def toolchain() -> str:
    """The compiler's version, torch's and Python's, and the folders of this install that torch's build file
    names (torch's headers and libraries, Python's headers): two venvs of one checkout must not share a build,
    or each load rewrites the other's ``build.ninja`` and rebuilds."""
    import torch

    version = (_output([compiler(), "--version"]).splitlines() or ["unknown compiler"])[0]
    extension = _cpp_extension()
    folders = [*extension.include_paths(), sysconfig.get_paths()["include"], *extension.library_paths()]
    return "\n".join([version, f"torch {torch.__version__}", sys.implementation.cache_tag, *folders])


def current_name() -> str:
    """The build name for the files, flags and target here."""
    return build_name({str(path): path.read_bytes() for path in source_files()}, flags(), target_isa(), toolchain())


def build_directory(name: str) -> Path:
    """Where build ``name`` lives: ``$TORCH_EXTENSIONS_DIR/name``, else under torch's default root."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or _cpp_extension().get_default_build_root()
    return Path(root) / name


def needs_compile(library: Path, sources: Sequence[Path]) -> bool:
    """Whether ninja will compile: no library yet, or a source newer than it."""
    if not library.exists():
        return True
    built = library.stat().st_mtime
    return any(path.stat().st_mtime > built for path in sources)


def say(message: str) -> None:
    """One line on stderr."""
    print(message, file=sys.stderr, flush=True)


def _cpp_extension() -> ModuleType:
    """``torch.utils.cpp_extension``, imported without its warning that no CUDA runtime exists."""
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        quiet.setLevel(level)
    return cpp_extension


def compile_extension(**arguments) -> ModuleType:
    """torch's JIT build and load (ninja, the C++ compiler)."""
    return _cpp_extension().load(**arguments)


def load() -> Built:
    """Build (where needed, saying so on stderr) and load the engine; raises what the build raises."""
    name = current_name()
    directory = build_directory(name)
    directory.mkdir(parents=True, exist_ok=True)
    compiles = needs_compile(directory / f"{name}{'.pyd' if os.name == 'nt' else '.so'}", source_files())
    if compiles:
        say(f"cbam: building the fused CPU kernels for {architecture()} in {directory} "
            "(about a minute, once per install and machine)")
    start = time.perf_counter()
    try:
        module = compile_extension(name=name, sources=[str(HERE / unit) for unit in UNITS], extra_cflags=list(flags()),
                                   extra_ldflags=list(LDFLAGS), build_directory=str(directory))
    except BaseException:
        if compiles:
            say(f"cbam: the build of the fused CPU kernels failed after {time.perf_counter() - start:.0f} s")
        raise
    seconds = time.perf_counter() - start
    if compiles:
        say(f"cbam: built the fused CPU kernels in {seconds:.0f} s")
    return Built(module, name, directory, seconds if compiles else None)
