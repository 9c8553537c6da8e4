"""``floating_tensors``: the floating-point tensors inside a module's inputs or outputs, in order."""

from __future__ import annotations

from torch import Tensor


def floating_tensors(value) -> list[Tensor]:
    """Floating tensors in ``value``: a tensor, or any nesting of lists, tuples and dicts of them."""
    if isinstance(value, Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in floating_tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in floating_tensors(item)]
    return []
