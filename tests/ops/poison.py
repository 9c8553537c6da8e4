"""Poisoned allocations for the engine tests: an element a kernel fails to write shows as NaN (indices:
``POISON``) instead of whatever the allocator's memory held. The helper lives in ``cbam.debug.poison``
(the GPU check, ``cbam.profile.cuda_check``, uses it too)."""

from cbam.debug.poison import POISON, poisoned

__all__ = ["POISON", "poisoned"]
