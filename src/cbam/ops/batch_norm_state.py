"""``BatchNormState``: a plain BatchNorm as the fused passes use it, one forward at a time.

The fused CBAM applies two BatchNorms without calling them as modules: the spatial gate's (on the
``(B, S)`` logits) and, folded, the one before CBAM. A state holds the module's tensors and what its
forward decides once per call (batch or running statistics, the momentum factor after counting the
batch in ``num_batches_tracked``), so that the same code runs on the module's own buffers (eager) or on
copies inside a ``torch.library`` op (which must not mutate its inputs: it returns the new running
statistics and the caller copies them back).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class BatchNormState:
    """``weight``, ``bias`` (``None`` where not affine), ``running_mean``, ``running_var`` (``None`` where
    not tracked, or not updated in training), ``eps``, the ``momentum`` (0 where ``None``), whether it
    normalises with the ``batch``'s statistics and, for a cumulative average, the batch ``count`` (the
    ``num_batches_tracked`` that counted this batch: the factor is read from it when used, so that traced
    code can pass the tensor)."""

    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    eps: float
    momentum: float
    batch: bool
    count: Tensor | None = None

    @classmethod
    def step(cls, module: nn.Module) -> BatchNormState:
        """The state of one forward of a plain BatchNorm ``module``; counts the batch in its
        ``num_batches_tracked`` as its forward does (call it once per forward)."""
        count = None
        tracking = module.training and module.track_running_stats
        if tracking and module.num_batches_tracked is not None:
            module.num_batches_tracked.add_(1)
            count = module.num_batches_tracked if module.momentum is None else None
        batch = module.training or module.running_mean is None
        # in training without tracking torch neither reads nor updates the running statistics it may still hold
        mean, var = (module.running_mean, module.running_var) if tracking or not module.training else (None, None)
        momentum = 0.0 if module.momentum is None else module.momentum
        return cls(module.weight, module.bias, mean, var, module.eps, momentum, batch, count)

    @property
    def factor(self) -> float:
        """The running-average factor of this forward: ``momentum``, or ``1 / count`` for a cumulative average."""
        return self.momentum if self.count is None else 1.0 / float(self.count)

    @property
    def updates(self) -> bool:
        """Whether this forward updates running statistics."""
        return self.batch and self.running_mean is not None

    def detached_copy(self) -> BatchNormState:
        """The same state on copies of the running statistics (for a forward that must not mutate them)."""
        if not self.updates:
            return self
        return replace(self, running_mean=self.running_mean.clone(), running_var=self.running_var.clone())

    def normalize(self, z: Tensor) -> Tensor:
        """The BatchNorm of ``z: (B, C, *spatial)``, updating the running statistics on batch statistics."""
        return F.batch_norm(z, self.running_mean, self.running_var, self.weight, self.bias, self.batch, self.factor,
                            self.eps)

    def update(self, mean: Tensor, var: Tensor, count: int) -> None:
        """Update the running statistics with a batch's ``mean`` and biased ``var`` over ``count`` values per
        channel, as the module's forward does (unbiased variance): on the CPU in double, as torch's CPU
        kernel does; elsewhere in their own dtype, as torch's CUDA kernel does, in one launch."""
        if not self.updates:
            return
        if self.running_mean.device.type != "cpu":
            update_in_place([self.running_mean, self.running_var], mean, var, count, self.factor)
            return
        unbiased = var * count / (count - 1)
        for running, batch in ((self.running_mean, mean), (self.running_var, unbiased)):
            running.copy_(self.factor * batch.double() + (1 - self.factor) * running.double())


def update_in_place(running: list[Tensor], mean: Tensor, var: Tensor, count: int, factor: float) -> None:
    """``running = [mean, var]`` moved towards the batch's ``mean`` and unbiased ``var`` (from the biased one
    over ``count`` values) by ``factor``, in their dtype: two launches on a GPU instead of a dozen."""
    torch._foreach_lerp_(running, [mean, var * (count / (count - 1))], factor)
