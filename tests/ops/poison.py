"""Poisoned allocations for the engine tests: an element a kernel fails to write shows as NaN (indices:
``POISON``) instead of whatever the allocator's memory held."""

import contextlib
import math

import torch

POISON = -7777


@contextlib.contextmanager
def poisoned():
    """``torch.empty`` and ``torch.empty_like`` hand out NaN-filled (integers: POISON) tensors."""
    originals = torch.empty, torch.empty_like

    def filled(make):
        def fill(*args, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(math.nan if t.is_floating_point() else POISON)
        return fill

    torch.empty, torch.empty_like = (filled(make) for make in originals)
    try:
        yield
    finally:
        torch.empty, torch.empty_like = originals
