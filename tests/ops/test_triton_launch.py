"""``triton_ops.launch`` launches what ``kernel[grid](...)`` launches: the same compiled kernel, grid, stream
and arguments reach the launcher, through Triton's own launch path for an H100 compiled without a GPU
(``cbam.profile.triton_host``). Each launch of a workload of fused CBAM calls goes both ways in turn, and
the two launcher calls are compared: identical but for the launch metadata and hooks, which the direct
path leaves out only where Triton's would call nothing."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import json, sys, torch
from torch import nn
import cbam
from cbam.ops import engines
from cbam.profile.triton_host import launch_path_without_gpu

record = []
with launch_path_without_gpu(record=record), engines.using("triton"):
    from cbam.ops.engines.triton_ops import launch as launching
    direct = launching.launch
    pairs = []

    def both(kernel, grid, *args, **constants):
        start = len(record)
        direct(kernel, grid, *args, **constants)
        kernel[grid](*args, **constants)
        pairs.append((kernel.fn.__name__, record[start:]))

    for name, module in list(sys.modules.items()):
        if name.startswith("cbam.ops.engines.triton_ops.") and getattr(module, "launch", None) is direct:
            module.launch = both
    for dtype in (torch.float32, torch.bfloat16):
        for preset in ("timm", "paper"):
            for training, residual, fold in ((False, False, False), (True, True, True), (True, False, False)):
                torch.manual_seed(0)
                module = cbam.CBAM(24, preset=preset, impl="fused").train(training)
                norm = nn.BatchNorm2d(24).train(training) if fold else None
                x = torch.randn(2, 24, 5, 6, dtype=dtype, requires_grad=True)
                shortcut = torch.randn(2, 24, 5, 6, dtype=dtype) if residual else None
                for repeat in range(2):
                    out = module(x, shortcut, input_norm=norm)
                    if training:
                        out.float().sum().backward()
    # the same shapes at an address 4 bytes off 16-byte alignment, after the aligned ones: another specialisation
    module = cbam.CBAM(24, preset="timm", impl="fused").eval()
    aligned = torch.randn(2, 24, 5, 6)
    misaligned = torch.randn(aligned.numel() + 1)[1:].view(aligned.shape)
    for x in (aligned, misaligned, aligned, misaligned):
        module(x)

hooks_empty = True
compared, direct_launches, failures = 0, 0, []
for name, launches in pairs:
    if len(launches) != 2:
        failures.append(f"{name}: {len(launches)} launcher calls for one launch each way")
        continue
    (ours_kernel, ours), (theirs_kernel, theirs) = launches
    metadata, enter, leave = ours[6:9]
    if (metadata, enter, leave) == (None, None, None):
        direct_launches += 1
    for hook in theirs[7:9]:
        hooks_empty &= hook is None or not getattr(hook, "calls", [None])
    same = (ours_kernel is theirs_kernel and len(ours) == len(theirs) and ours[:6] == theirs[:6]
            and all(a is b if isinstance(a, torch.Tensor) else a == b for a, b in zip(ours[9:], theirs[9:])))
    compared += 1
    if not same:
        failures.append(f"{name}: {ours!r} != {theirs!r}")
print(json.dumps({"compared": compared, "direct": direct_launches, "hooks_empty": hooks_empty,
                  "capable": launching.DIRECT, "failures": failures[:5],
                  "kernels": len({id(launches[1][0]) for _, launches in pairs if len(launches) == 2}),
                  "kernels_aligned": len({id(launches[1][0]) for _, launches in pairs[:-24] if len(launches) == 2})}))
"""


def _run_without_interpreter(script: str) -> dict:
    """The JSON that ``script`` prints last, run in a process where the kernels are decorated for a GPU."""
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("TRITON_INTERPRET", "CBAM_DIRECT_LAUNCH")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="compiles for a GPU in a process of its own")
def test_direct_launch_passes_the_launcher_what_triton_passes():
    found = _run_without_interpreter(SCRIPT)
    assert found["failures"] == []
    assert found["hooks_empty"]
    assert found["compared"] > 100
    assert found["kernels"] > found["kernels_aligned"]  # the misaligned input launched kernels of its own
    if found["capable"]:  # Triton 3.6-3.8 (torch 2.8's 3.4 takes Triton's own path, its hooks None as well)
        # every launch but each specialisation's first (it compiles) went direct
        assert found["direct"] > found["compared"] // 2


MISMATCH = """
import json, torch, cbam
from cbam.ops import engines
from cbam.profile.triton_host import launch_path_without_gpu

with launch_path_without_gpu() as launches, engines.using("triton"):
    from cbam.ops.engines.triton_ops import launch as launching
    launching.compute_cache_key = lambda *args: "a key Triton never made"  # as a Triton with another key would
    module = cbam.CBAM(24, preset="timm", impl="fused").eval()
    x = torch.randn(2, 24, 5, 6)
    module(x)  # compiles every kernel through Triton's path: the direct path still on
    still_direct = launching.DIRECT
    before = launches[0]
    module(x)
    print(json.dumps({"after_compiling": still_direct, "after_a_miss": launching.DIRECT,
                      "launches": launches[0] - before}))
"""


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="compiles for a GPU in a process of its own")
def test_a_key_that_misses_compiled_kernels_turns_the_direct_path_off():
    """Where the direct lookup misses a kernel Triton's own path then finds compiled, every later launch
    is Triton's: each kernel still launches once per call."""
    found = _run_without_interpreter(MISMATCH)
    from cbam.ops.engines.triton_ops import launch as launching

    assert found["after_compiling"] == launching.DIRECT  # compiling launches never count as a miss
    assert found["after_a_miss"] is False
    assert found["launches"] == 6  # an eval call's kernels, each launched once


def test_only_the_checked_triton_releases_launch_directly():
    from cbam.ops.engines.triton_ops import launch as launching

    assert launching._checked_release("3.6.0") and launching._checked_release("3.8.0")
    assert launching._checked_release("3.7.1+git1234")
    assert not launching._checked_release("3.4.0") and not launching._checked_release("3.9.0")
    assert not launching._checked_release("4.0.0") and not launching._checked_release("nightly")
