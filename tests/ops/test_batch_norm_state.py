"""``BatchNormState.update`` moves a BatchNorm's running statistics as the module's own forward does
(momentum or cumulative average, unbiased variance, the batch count): on the CPU in double, as torch's
CPU kernel; elsewhere in the statistics' dtype in one multi-tensor launch (``update_in_place``),
checked here on CPU tensors against the float64 formula."""

import pytest
import torch
from torch import nn

from cbam.ops.batch_norm_state import BatchNormState, update_in_place


@pytest.mark.parametrize("momentum", [0.1, None])
def test_the_cpu_update_is_the_modules(momentum):
    torch.manual_seed(0)
    module, twin = nn.BatchNorm2d(5, momentum=momentum), nn.BatchNorm2d(5, momentum=momentum)
    x = torch.randn(4, 5, 3, 3) * 3 + 1
    for _ in range(3):
        twin(x)
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        BatchNormState.step(module).update(mean, var, x.numel() // 5)
    torch.testing.assert_close(module.running_mean, twin.running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(module.running_var, twin.running_var, rtol=1e-6, atol=1e-7)
    assert module.num_batches_tracked.item() == twin.num_batches_tracked.item() == 3


def test_the_one_launch_update_follows_the_formula():
    torch.manual_seed(0)
    running = [torch.randn(7), torch.rand(7) + 0.5]
    want = [t.double() for t in running]
    mean, var = torch.randn(7), torch.rand(7)
    update_in_place(running, mean, var, 12, 0.25)
    torch.testing.assert_close(running[0].double(), 0.75 * want[0] + 0.25 * mean.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(running[1].double(), 0.75 * want[1] + 0.25 * var.double() * 12 / 11, rtol=1e-6,
                               atol=1e-7)
