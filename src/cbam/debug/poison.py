"""``poisoned()``: allocations that show where a kernel failed to write.

Inside the block ``torch.empty`` and ``torch.empty_like`` hand out tensors filled with NaN (integer
tensors: ``POISON``, or the dtype's largest value where it does not fit, as in ``uint8``) instead of
whatever the allocator's memory held, so an output element that a kernel never writes shows as NaN
rather than as a plausible stale value.

>>> import torch
>>> with poisoned():
...     torch.empty(2).isnan().all().item(), torch.empty(1, dtype=torch.int64).item()
(True, -7777)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

POISON = -7777


@contextlib.contextmanager
def poisoned() -> Iterator[None]:
    """``torch.empty`` and ``torch.empty_like`` hand out NaN-filled (integers: ``POISON``) tensors."""
    originals = torch.empty, torch.empty_like

    def poison(t: torch.Tensor):
        if t.is_floating_point():
            return math.nan
        if t.is_complex() or t.dtype == torch.bool:
            return POISON  # bool: True
        info = torch.iinfo(t.dtype)
        return POISON if info.min <= POISON else info.max

    def filled(make):
        def fill(*args, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(poison(t))
        return fill

    torch.empty, torch.empty_like = (filled(make) for make in originals)
    try:
        yield
    finally:
        torch.empty, torch.empty_like = originals


__all__ = ["POISON", "poisoned"]
