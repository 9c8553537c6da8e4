"""Edges of the GPU measurement tooling that a CPU can reach: ``benchmarks/gpu_check.sh`` run with a
stand-in Python (its files, budgets and exit status across reruns into one ``$OUT``), ``cuda_bench``'s
ratios of CUDA-graph rows, what a shape that fails to set up leaves standing and what a failed ResNet leaves
behind."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from cbam.profile import cuda_bench, fused_bench

ROOT = Path(__file__).resolve().parents[1]
HAS_TIMM = fused_bench._timm_cbam() is not None
STAND_IN = """#!/usr/bin/env bash
# stand-in python: the environment step names a device; every other step prints its arguments
case "$*" in
  -c*) echo "device: stand-in (CUDA available: True)";;
  *) echo "report of: $*";;
esac
"""
SKIP_ALL = {name: "0" for name in ("T_CHECK", "T_WARM", "T_MODULES", "T_RESNET", "T_HOST", "T_KERNELS", "T_GRAPHS")}


def gpu_check(tmp_path: Path, out: Path, **env: str) -> subprocess.CompletedProcess:
    """``benchmarks/gpu_check.sh`` from a copy of the repository layout, with the stand-in Python."""
    script = tmp_path / "repo" / "benchmarks" / "gpu_check.sh"
    if not script.exists():
        script.parent.mkdir(parents=True)
        shutil.copy(ROOT / "benchmarks" / "gpu_check.sh", script)
        (tmp_path / "python").write_text(STAND_IN)
        (tmp_path / "python").chmod(0o755)
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": "/usr/bin:/bin", "OUT": str(out), "PYTHON": str(tmp_path / "python"), **env})


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_a_rerun_into_the_same_out_keeps_what_it_skips(tmp_path):
    """The GPU session's second run (``GPU_CHECK_COMPILE=1``, every other budget 0) into the first run's
    ``$OUT`` adds the compiled step and leaves the first run's reports and step statuses alone."""
    out = tmp_path / "out"
    first = gpu_check(tmp_path, out)
    assert first.returncode == 0, first.stderr
    reports = {path.name: path.read_text() for path in out.glob("*.md")}
    assert reports["modules_fp32.md"].startswith("report of: -m cbam bench --device cuda --modes fp32")
    second = gpu_check(tmp_path, out, GPU_CHECK_COMPILE="1", COMPILE_MODE="reduce-overhead", **SKIP_ALL)
    assert second.returncode == 0, second.stderr
    for name, text in reports.items():
        if name != "environment.md":
            assert (out / name).read_text() == text, name
    assert "--compile-mode reduce-overhead" in (out / "compiled.md").read_text()
    steps = [line.split()[0] for line in (out / "steps.txt").read_text().splitlines() if not line.startswith("#")]
    assert "modules_fp32" in steps and "compiled" in steps
    assert "report of: -m cbam bench --device cuda --modes fp32" not in second.stdout  # not shown as this run's


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_the_exit_status_is_the_last_runs(tmp_path):
    """A failed step of an earlier run into the same ``$OUT`` does not fail a later run."""
    out = tmp_path / "out"
    gpu_check(tmp_path, out)
    (tmp_path / "python").write_text(STAND_IN.replace('echo "report of: $*";;', 'exit 3;;'))
    assert gpu_check(tmp_path, out, T_CHECK="0", T_WARM="0").returncode == 1
    (tmp_path / "python").write_text(STAND_IN)
    assert gpu_check(tmp_path, out, **SKIP_ALL).returncode == 0


def _scripted(values):
    """A timer that returns ``values`` one after another, whatever it times."""
    found = iter(values)
    return lambda fn: next(found)


def test_cuda_graph_rows_are_over_timms_cuda_graph_row():
    """A CUDA-graph row's "× timm" is timm's replayed time over its own (like with like), not timm's eager
    time; no compiled timm is replayed, so it has no "× compiled"."""
    if not HAS_TIMM:
        pytest.skip("timm is not installed: no timm rows")
    eager = {cuda_bench.TIMM: (4.0, 8.0), cuda_bench.REFERENCE: (3.0, 7.0), cuda_bench.FUSED: (3.0, 6.0)}
    replayed = {cuda_bench.GRAPHED[cuda_bench.TIMM]: (2.0, 5.0), cuda_bench.GRAPHED[cuda_bench.FUSED]: (0.5, 1.0)}
    table = cuda_bench.module_table(  # off CUDA no compiled timm: the eager rows are timm, reference, ours
        batch=1, shapes=[(8, 4)], modes=["fp32"], device="cpu", graphs=True,
        timer=_scripted([1.0, *(t for pair in eager.values() for t in pair)]),  # the copy first
        replay_timer=_scripted([t for pair in replayed.values() for t in pair]))
    found = {r.name: r for r in table.rows}
    assert {n: (found[n].forward_ms, found[n].train_ms) for n in [*eager, *replayed]} == {**eager, **replayed}
    ours = found[cuda_bench.GRAPHED[cuda_bench.FUSED]]
    assert ours.forward_vs_timm == pytest.approx(2.0 / 0.5) and ours.train_vs_timm == pytest.approx(5.0 / 1.0)
    assert ours.forward_vs_compiled is None and ours.train_vs_compiled is None
    assert ours.forward_vs_copy == pytest.approx(0.5 / 1.0)
    assert found[cuda_bench.GRAPHED[cuda_bench.TIMM]].train_vs_timm == pytest.approx(1.0)
    assert found[cuda_bench.FUSED].train_vs_timm == pytest.approx(8.0 / 6.0)  # eager rows: over eager timm


def test_a_shape_that_fails_to_set_up_is_a_note_not_the_end(monkeypatch):
    """A shape whose modules cannot be built (on a GPU: a sticky CUDA error, memory) leaves a note, and the
    shapes measured before and after it keep their rows."""
    real = cuda_bench._module_set

    def module_set(channels, *args):
        if channels == 16:
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")
        return real(channels, *args)

    monkeypatch.setattr(cuda_bench, "_module_set", module_set)
    table = cuda_bench.module_table(batch=1, shapes=[(8, 4), (16, 4), (4, 4)], modes=["fp32"], device="cpu",
                                    timer=cuda_bench.host_timer(1, warmup=0))
    assert sorted({r.channels for r in table.rows}) == [4, 8]
    assert table.notes[-1] == ("fp32 16x4² failed, shape left out: RuntimeError: CUDA error: an illegal memory "
                               "access was encountered")


@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")
def test_a_short_check_budget_still_starts_cases(tmp_path):
    """``T_CHECK`` under 20 s gives each correctness process a positive budget for starting cases."""
    out = tmp_path / "out"
    assert gpu_check(tmp_path, out, **{**SKIP_ALL, "T_CHECK": "10"}).returncode == 0
    words = (out / "correctness_fp32.md").read_text().split()
    assert 0 < float(words[words.index("--budget") + 1]) < 10


def test_a_failed_model_is_cleared_away_before_the_next_one_is_built(monkeypatch):
    """What a failed model left (its tensors, compiled code) is collected before the next model is built, as
    after a model that ran: otherwise it counts in the next one's peak memory."""
    events = []

    def build(attention="cbam", **options):  # a tiny classifier in place of each ResNet-50; ours fails
        events.append(f"build {attention}")
        if attention == "cbam":
            raise RuntimeError("CUDA out of memory")
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 1000))

    monkeypatch.setattr(cuda_bench, "resnet50", build)
    monkeypatch.setattr(cuda_bench, "_timm_resnet50", lambda: lambda: build("timm"))
    monkeypatch.setattr(cuda_bench.gc, "collect", lambda: events.append("collect"))
    cuda_bench.resnet_table(batch=2, image_size=32, steps=1, warmup=0, precisions=["fp32"], device="cpu")
    assert events == ["build None", "collect", "build cbam", "collect", "build timm", "collect"]
