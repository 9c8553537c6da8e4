"""The C++ engine's build: a name per sources/flags/ISA, the CBAM_CPU_ARCH target, a message when it
starts and ends, the fallback to torch ops when it fails, and ``python -m cbam.ops.build``. Stub builds
stand in for the compiler (a real one takes a minute); the last test reuses the build the test session
already has."""

import functools
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import cbam
from cbam.ops import build as build_command
from cbam.ops import engine_for
from cbam.ops.engines import cpp
from cbam.ops.engines.cpp import build

SOURCES = {"/a/forward.cpp": b"int f();", "/a/passes.h": b"#pragma once"}
FLAGS = ("-O3", "-march=native")
ISA = "-march= znver3\n-mavx2 [enabled]\n-mavx512f [disabled]"


def name(sources=SOURCES, flags=FLAGS, isa=ISA, toolchain="gcc 12"):
    return build.build_name(sources, flags, isa, toolchain)


def test_the_build_name_is_a_short_hash_of_its_inputs():
    assert re.fullmatch(r"cbam_cpu_passes_[0-9a-f]{12}", name())
    assert name() == name(dict(reversed(SOURCES.items())), list(FLAGS))  # order of the mapping, sequence type


@pytest.mark.parametrize("changed", [
    {"sources": {**SOURCES, "/a/forward.cpp": b"int f(int);"}},  # an edited source
    {"sources": {**SOURCES, "/a/vector.h": b""}},  # a new header
    {"sources": {path.replace("/a/", "/b/"): text for path, text in SOURCES.items()}},  # a second install
    {"flags": ("-O2", "-march=native")},
    {"flags": ("-O3", "-march=native", "-fopenmp")},
    {"isa": ISA.replace("-mavx512f [disabled]", "-mavx512f [enabled]")},  # an AVX-512 machine
    {"isa": ISA.replace("znver3", "znver4")},
    {"toolchain": "gcc 13"},
])
def test_the_build_name_changes_with_sources_flags_and_isa(changed):
    assert name(**changed) != name()


def test_parts_cannot_run_into_each_other():
    assert name(flags=("-O3", "-march=native"), isa="x") != name(flags=("-O3",), isa="-march=native\x00x")


def test_the_target_isa_is_resolved_here():
    isa = build.target_isa()
    assert isa and "native" not in isa  # what -march=native means, not the words
    assert build.architecture()
    assert re.fullmatch(r"cbam_cpu_passes_[0-9a-f]{12}", build.current_name())


def test_the_target_is_native_by_default(monkeypatch):
    monkeypatch.delenv("CBAM_CPU_ARCH", raising=False)
    assert build.cpu_arch() == "native" and "-march=native" in build.flags()


def test_each_target_resolves_and_builds_under_its_own_name(monkeypatch):
    def resolved(arch):
        monkeypatch.setenv("CBAM_CPU_ARCH", arch)
        return build.target_isa(), build.architecture(), build.current_name()

    (native_isa, _, native_name), (isa, arch, v3_name) = resolved("native"), resolved("x86-64-v3")
    assert "-march=x86-64-v3" in build.flags() and arch == "x86-64-v3"
    assert v3_name != native_name
    assert isa != native_isa or "-march=" not in isa  # the compiler's own answer, where it gives one


@pytest.mark.parametrize("value", ["", "x86-64 -O0", "-O0", "x86;rm", "native\n"])
def test_a_bad_target_is_refused(monkeypatch, value):
    monkeypatch.setenv("CBAM_CPU_ARCH", value)
    with pytest.raises(ValueError, match=rf"CBAM_CPU_ARCH must be a -march= target .*got {re.escape(repr(value))}"):
        build.current_name()


def test_the_package_ships_every_source_file():
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    patterns = re.findall(r'"(ops/engines/cpp/[^"]+)"', pyproject.split("[tool.setuptools.package-data]")[1])
    package = Path(cbam.__file__).parent
    for path in build.source_files():
        assert any(path.match(str(package / pattern)) for pattern in patterns), path
    assert {unit for unit in build.UNITS} <= {path.name for path in build.source_files()}


def test_needs_compile_without_a_library_or_with_a_newer_source(tmp_path):
    source, library = tmp_path / "a.cpp", tmp_path / "x.so"
    source.write_text("")
    assert build.needs_compile(library, [source])
    library.write_text("")
    os.utime(source, (time.time() - 60,) * 2)
    assert not build.needs_compile(library, [source])
    os.utime(source, (time.time() + 60,) * 2)
    assert build.needs_compile(library, [source])


@pytest.fixture
def stub_build(monkeypatch, tmp_path):
    """build.load() compiles with a stub into a fresh TORCH_EXTENSIONS_DIR: the stub raises ``outcome``
    where it is an exception, and lists its calls."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stub = SimpleNamespace(calls=[], outcome=None)

    def compile_extension(**arguments):
        stub.calls.append(arguments)
        if stub.outcome is not None:
            raise stub.outcome
        return SimpleNamespace(set_output_cache_limit=lambda limit: None)

    monkeypatch.setattr(build, "compile_extension", compile_extension)
    return stub


def test_a_build_says_when_it_starts_and_how_long_it_took(stub_build, capsys, tmp_path):
    built = build.load()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("cbam: building the fused CPU kernels") and "about a minute" in lines[0]
    assert str(tmp_path) in lines[0]
    assert re.fullmatch(r"cbam: built the fused CPU kernels in \d+ s", lines[1])
    (call,) = stub_build.calls
    assert call["name"] == built.name == build.current_name()
    assert Path(call["build_directory"]) == built.directory == tmp_path / built.name
    assert {Path(source).name for source in call["sources"]} == set(build.UNITS)
    assert list(build.flags()) == call["extra_cflags"] and built.seconds is not None


def test_a_build_follows_cbam_cpu_arch(stub_build, monkeypatch, capsys):
    monkeypatch.setenv("CBAM_CPU_ARCH", "x86-64-v3")
    built = build.load()
    assert "cbam: building the fused CPU kernels for x86-64-v3 in" in capsys.readouterr().err
    (call,) = stub_build.calls
    assert "-march=x86-64-v3" in call["extra_cflags"] and "-march=native" not in call["extra_cflags"]
    assert call["name"] == built.name == build.current_name()


def test_a_build_already_there_loads_in_silence(stub_build, capsys):
    directory = build.build_directory(build.current_name())
    directory.mkdir(parents=True)
    library = directory / f"{build.current_name()}.so"
    library.write_text("")
    os.utime(library, (time.time() + 60,) * 2)
    assert build.load().seconds is None
    assert capsys.readouterr().err == ""


def test_a_failed_build_says_so_and_raises(stub_build, capsys):
    stub_build.outcome = RuntimeError("Ninja is required to load C++ extensions")
    with pytest.raises(RuntimeError, match="Ninja"):
        build.load()
    assert re.fullmatch(r"cbam: the build of the fused CPU kernels failed after \d+ s",
                        capsys.readouterr().err.splitlines()[-1])


@pytest.fixture
def fresh_engine(monkeypatch):
    """cpp.engine with an empty cache for the test; the session's cached engine comes back after it."""
    monkeypatch.setattr(cpp, "engine", functools.cache(cpp.engine.__wrapped__))
    monkeypatch.delenv("CBAM_ENGINE", raising=False)
    monkeypatch.delenv("CBAM_NO_EXTENSION", raising=False)


def test_a_failed_build_falls_back_to_torch_ops_with_one_warning(stub_build, fresh_engine, capsys):
    stub_build.outcome = RuntimeError("Ninja is required to load C++ extensions\nmore detail")
    x = torch.randn(2, 16, 6, 6)
    module, reference = cbam.CBAM(16, reduction_ratio=4), cbam.CBAM(16, reduction_ratio=4, impl="reference")
    reference.load_state_dict(module.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert engine_for(x) == "torch"
        out = module(x)
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == [
        "cbam: the fused CPU kernels are unavailable (Ninja is required to load C++ extensions); using plain torch ops"]
    assert len(stub_build.calls) == 1  # tried once per process
    torch.testing.assert_close(out, reference(x))


def test_build_command_reports_a_failure_in_one_line(stub_build, capsys):
    stub_build.outcome = RuntimeError("error: command 'c++' failed\ntraceback...")
    assert build_command.main() == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == ("cbam: the C++ CPU engine did not build (error: command 'c++' failed); "
                       "the fused path will run on torch ops")


def test_build_command_reports_a_bad_target_in_one_line(stub_build, monkeypatch, capsys):
    monkeypatch.setenv("CBAM_CPU_ARCH", "x86-64 -O0")
    assert build_command.main() == 1
    assert "did not build (CBAM_CPU_ARCH must be a -march= target" in capsys.readouterr().err.splitlines()[-1]
    assert not stub_build.calls


def test_build_command_without_the_extension(monkeypatch, capsys):
    monkeypatch.setenv("CBAM_NO_EXTENSION", "1")
    assert build_command.main() == 0
    assert "CBAM_NO_EXTENSION=1" in capsys.readouterr().out


def test_python_m_cbam_ops_build_reports_the_build():
    if cpp.engine() is None:
        pytest.skip("the C++ engine does not build here")
    done = subprocess.run([sys.executable, "-m", "cbam.ops.build"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert str(build.build_directory(build.current_name())) in done.stdout
    assert re.search(r"\d+(\.\d)? s", done.stdout)


def test_every_install_path_the_build_file_names_is_in_the_build_name():
    """torch writes the include and library folders of this venv's torch and Python into ``build.ninja``; two
    installs that shared a name (one checkout, two venvs) rewrote it in turn and rebuilt on every load."""
    if cpp.engine() is None:
        pytest.skip("the C++ engine does not build here")
    ninja = (build.build_directory(build.current_name()) / "build.ninja").read_text()
    folders = re.findall(r"(?:-isystem |-I|-L)(\S+)", ninja)
    assert folders and any("torch" in folder for folder in folders)
    for folder in folders:
        assert folder in build.toolchain(), folder
