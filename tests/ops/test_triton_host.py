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
