"""Every Triton kernel of the engine compiles for an H100 (sm_90, through ptxas) on this GPU-less machine,
as the fused CBAM launches it (``cbam.profile.triton_targets``), full tiles included, without spilling
registers and without a ``tt.dot`` (TF32); and a kernel that does not compile is reported, not skipped."""

import inspect
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from cbam.ops.engines import triton_ops  # noqa: E402
from cbam.ops.engines.triton_ops.common import TILE  # noqa: E402
from cbam.profile.triton_targets import dots, spills  # noqa: E402


def _without_interpreter() -> dict:
    return {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}


def _engine_kernels() -> set[str]:
    """The names of the kernels the engine's modules define."""
    modules = {inspect.getmodule(function) for function in map(triton_ops.__dict__.get, triton_ops.__all__)}
    return {name for module in modules for name in vars(module) if name.startswith("_") and name.endswith("_kernel")}


def test_every_kernel_compiles_for_sm90(tmp_path):
    rows_file = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, "-m", "cbam.profile.triton_targets", "--arch", "90", "--json",
                           str(rows_file)], capture_output=True, text=True, env=_without_interpreter(), timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(rows_file.read_text())
    assert {row["kernel"] for row in rows} == _engine_kernels()  # the workload reaches every kernel
    assert f"compiled {len(rows)} of {len(rows)} specialisations" in done.stdout
    assert {(row["constants"]["BLOCK_C"] * row["constants"]["BLOCK_S"], row["options"]["num_warps"]) for row in rows
            if row["kernel"] == "_gate_grads_kernel"} >= {(TILE, 8)}  # full tiles, as a network's shapes have
    assert all(row["resources"]["REG"] > 0 for row in rows)  # read back from every cubin
    # none spills with Triton 3.6 and 3.8; Triton 3.4 keeps one 64-bit value of the pooling pass on the stack
    # (one store and one load per program, outside its loop), which costs nothing worth a failure
    assert spills(rows, tolerated=8) == []
    assert dots(rows) == []  # float32 sums stay FMAs: Triton's TF32 dot took gradients 1e-3 off on an H100


def test_a_kernel_that_does_not_compile_is_reported(tmp_path):
    row = {"module": "cbam.ops.engines.triton_ops.output", "kernel": "_apply_kernel", "divisible": [], "options": {},
           "signature": {"x_ptr": "fp32"}, "constants": {}}  # a float where the kernel loads through a pointer
    script = ("import json, sys\nfrom cbam.profile.triton_targets import compile_for\n"
              "print(json.dumps(compile_for([json.loads(sys.argv[1])], 90)))")
    done = subprocess.run([sys.executable, "-c", script, json.dumps(row)], capture_output=True, text=True,
                          env=_without_interpreter(), timeout=300)
    assert done.returncode == 0, done.stderr
    failures = json.loads(done.stdout)
    assert len(failures) == 1 and failures[0].startswith("_apply_kernel")


def test_spills_lists_the_specialisations_with_stack_or_local_memory():
    rows = [{"kernel": name, "constants": {}, "options": {}, "resources": {"REG": 255, **usage}}
            for name, usage in (("a", {"STACK": 0, "LOCAL": 0}), ("b", {"STACK": 16, "LOCAL": 0}),
                                ("c", {"STACK": 0, "LOCAL": 8}))]
    rows.append({"kernel": "d", "constants": {}, "options": {}, "resources": None})  # no cuobjdump: nothing known
    assert [line.split()[0] for line in spills(rows)] == ["b", "c"]
    assert [line.split()[0] for line in spills(rows, tolerated=8)] == ["b"]


def test_dots_lists_the_specialisations_holding_a_dot():
    rows = [{"kernel": "a", "constants": {}, "dots": 0}, {"kernel": "b", "constants": {}, "dots": 2},
            {"kernel": "c", "constants": {}}]  # not compiled: nothing known
    assert [line.split()[0] for line in dots(rows)] == ["b"]
