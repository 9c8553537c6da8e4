"""``benchmarks/tile_sweep.py``, what a CPU can reach: every tile policy launches other tiles than the
default's and computes the same CBAM (in Triton's interpreter), a policy that changes nothing is named,
the policy switch restores the engine's constants, and the per-kernel table picks each kernel's best."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def tile_sweep():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("tile_sweep", BENCHMARKS / "tile_sweep.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the check runs in Triton's interpreter here")
def test_every_policy_changes_tiles_and_agrees_with_the_default(tile_sweep):
    assert tile_sweep.check([(64, 8), (512, 4)], batch=2, device="cpu") == []


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the check runs in Triton's interpreter here")
def test_a_policy_that_changes_no_tile_is_named(tile_sweep):
    problems = tile_sweep.check([(24, 5)], batch=2, device="cpu")  # too small for any tile to reach TILE's limit
    assert "TILE=1024: launched the default's tiles at every shape" in problems
    assert not any(name in line for line in problems for name in ("BUSY", "PROGRAMS"))  # GPU-only: not expected


def test_policy_switch_restores_the_constants_and_refuses_unknown_names(tile_sweep):
    from cbam.ops.engines.triton_ops import channel_mlp, common, gradients, spatial

    before = (common.TILE, spatial.TILE, common.BUSY, gradients.BUSY, channel_mlp.PRODUCTS)
    with tile_sweep.tile_policy({"TILE": 512, "BUSY": 8, "PRODUCTS": 1024}):
        assert (common.TILE, spatial.TILE, common.BUSY, gradients.BUSY, channel_mlp.PRODUCTS) == (512, 512, 8, 8, 1024)
        assert common.elementwise_tile(64, 64) == (64, 8)  # the tile functions read the new value
    assert (common.TILE, spatial.TILE, common.BUSY, gradients.BUSY, channel_mlp.PRODUCTS) == before
    with pytest.raises(ValueError, match="TILES"):
        with tile_sweep.tile_policy({"TILES": 1}):
            pass


def test_table_takes_each_kernels_fastest_policy(tile_sweep):
    timed = {"default": {"_pool_kernel": 40.0, "_hidden_kernel": 20.0},
             "TILE=1024": {"_pool_kernel": 30.0, "_hidden_kernel": 25.0},
             "PROGRAMS=512": {"_pool_kernel": 41.0, "_hidden_kernel": 5.0}}
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in
            tile_sweep.shape_table("2048x7", timed).splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == [["_pool_kernel", "40.0", "30.0", "TILE=1024"],
                        ["_hidden_kernel", "20.0", "5.0", "PROGRAMS=512"],
                        ["**all kernels**", "60.0", "46.0", "PROGRAMS=512"]]


def test_sweep_needs_cuda_and_shapes_are_checked(tile_sweep, capsys):
    if not torch.cuda.is_available():
        assert tile_sweep.main([]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="CxH"):
        tile_sweep.main(["--check", "--shapes", "64by8"])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the check runs in Triton's interpreter here")
def test_a_wrong_gradient_under_a_policy_is_named(tile_sweep, monkeypatch):
    """Every parameter's gradient is compared, the last one too (here made wrong under one policy)."""
    real = tile_sweep._training_results

    def spoiled(*args):
        results = real(*args)
        from cbam.ops.engines.triton_ops import common

        if common.TILE == 1024:
            results[-1] = results[-1] + 1
        return results

    monkeypatch.setattr(tile_sweep, "_training_results", spoiled)
    problems = tile_sweep.check([(64, 8)], batch=2, device="cpu")
    assert any(line.startswith("64x8, TILE=1024: parameter") for line in problems)
    assert not any("TILE=4096" in line and "differs" in line for line in problems)


def test_the_check_turns_the_interpreter_on_by_itself():
    """``--check`` on a CPU without ``TRITON_INTERPRET`` set: it turns the interpreter on before the engine's
    kernels are defined, so the policies' launches are seen and each changes the tiles (run without it, the
    torch engine ran and every policy that changes tiles was named as changing none)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, str(BENCHMARKS / "tile_sweep.py"), "--check", "--shapes", "512x4"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "every policy agrees with the default on cpu"
