"""``launch_path_without_gpu`` sends every kernel the Triton engine runs through Triton's own launch path:
as many launches per CBAM call as the interpreter runs kernels for the same call, and it refuses kernels
decorated for the interpreter."""

import json
import os
import subprocess
import sys

import pytest
import torch

import cbam
from cbam.ops import engines
from cbam.profile.triton_targets import interpreted_launches

SCRIPT = """
import json, torch, cbam
from cbam.ops import engines
from cbam.profile.triton_host import launch_path_without_gpu
torch.manual_seed(0)
module = cbam.CBAM(24, preset="timm", impl="fused")
x = torch.randn(2, 24, 5, 6, requires_grad=True)
found = {}
with launch_path_without_gpu() as launches, engines.using("triton"):
    for training in (False, True):
        module.train(training)
        before = launches[0]
        out = module(x)
        if training:
            out.sum().backward()
        found["training" if training else "eval"] = launches[0] - before
print(json.dumps(found))
"""


def _interpreted_kernels(module: torch.nn.Module, x: torch.Tensor, training: bool) -> int:
    launches = []
    with interpreted_launches(lambda function, args, kwargs: launches.append(function)), engines.using("triton"):
        out = module.train(training)(x)
        if training:
            out.sum().backward()
    return len(launches)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the comparison runs in the interpreter")
def test_every_kernel_goes_through_the_launch_path():
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=environment,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    launched = json.loads(done.stdout.strip().splitlines()[-1])
    torch.manual_seed(0)
    module = cbam.CBAM(24, preset="timm", impl="fused")
    x = torch.randn(2, 24, 5, 6, requires_grad=True)
    expected = {mode: _interpreted_kernels(module, x, mode == "training") for mode in ("eval", "training")}
    assert launched == expected
    assert launched["eval"] > 0 and launched["training"] > launched["eval"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs kernels decorated for the interpreter")
def test_interpreted_kernels_are_refused():
    import cbam.ops.engines.triton_ops  # noqa: F401 - decorated for the interpreter in this process
    from cbam.profile.triton_host import launch_path_without_gpu

    with pytest.raises(RuntimeError, match="without TRITON_INTERPRET"):
        with launch_path_without_gpu():
            pass


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the comparison runs in the interpreter")
def test_host_profile_counts_one_launch_per_kernel():
    """``benchmarks/host_profile.py`` on the CPU profiles our calls through the launch path: the engine's
    ``launch`` is called once per kernel the interpreter runs for the same eval call, and timm's calls
    spend nothing in Triton."""
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "host_profile.py")
    done = subprocess.run([sys.executable, script, "--calls", "3", "--top", "80"], capture_output=True, text=True,
                          env=environment, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    sections = done.stdout.split("\n\n")
    header, *shares = [line.split(" | ") for line in sections[0].splitlines()[1:] if not line.startswith("| ---")]
    triton_column = header.index("Triton launch path")
    by_row = {row[0].lstrip("| "): row for row in shares}
    assert {name for name in by_row} == {f"{who}, {mode}" for who in ("timm CbamModule", "cbam fused")
                                         for mode in ("training", "eval")}
    assert by_row["timm CbamModule, eval"][triton_column] == "0%"
    assert by_row["cbam fused, eval"][triton_column] != "0%"
    eval_functions = next(section for section in sections if section.startswith("cbam fused, eval:"))
    runs = [line for line in eval_functions.splitlines()
            if line.startswith("| `launch.py:") and line.split("`")[1].endswith(" launch")]
    assert len(runs) == 1
    torch.manual_seed(0)
    expected = _interpreted_kernels(cbam.CBAM(64, preset="timm", impl="fused"), torch.randn(2, 64, 4, 4), False)
    assert float(runs[0].split(" | ")[1]) == expected
