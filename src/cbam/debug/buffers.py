"""``restored_buffers``: run extra forwards for a check without leaving a trace in the module's state."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def restored_buffers(module: nn.Module) -> Iterator[None]:
    """Copy ``module``'s buffers (BatchNorm running statistics, counters) back in on exit, even on error."""
    saved = [buffer.clone() for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(module.buffers(), saved):
                buffer.copy_(value)
