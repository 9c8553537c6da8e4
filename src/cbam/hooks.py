"""Whether hooks see a module's calls: fused paths that skip a module's own call (CBAM's residual
tail, a BatchNorm folded into CBAM's passes) run only where nothing would notice."""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as torch_module

_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
_GLOBAL_HOOKS = tuple(f"_global{name}" for name in _HOOKS)


def watched(module: nn.Module) -> bool:
    """Whether hooks (the module's own or global ones) see ``module``'s calls; ``True`` where torch keeps
    them elsewhere than these private dicts (a later torch), so that hooks always see the module."""
    return _has_hooks(module, _HOOKS) or _has_hooks(torch_module, _GLOBAL_HOOKS)


def parts_watched(module: nn.Module) -> bool:
    """Whether hooks see the calls of any module inside ``module`` (its submodules, not itself): a fused
    CBAM calls none of its parts. Checked on every fused call, so it walks ``_modules`` itself (``modules()``
    takes twice as long), in plain Python that ``torch.compile`` traces."""
    if _has_hooks(torch_module, _GLOBAL_HOOKS):
        return True
    parts = list(module._modules.values())
    while parts:
        part = parts.pop()
        if part is not None:
            if _has_hooks(part, _HOOKS):
                return True
            parts.extend(part._modules.values())
    return False


def _has_hooks(owner, names: tuple[str, str, str, str]) -> bool:
    """Whether any of the four hook dicts ``names`` of ``owner`` holds a hook (a missing one counts as one)."""
    pre, forward, backward_pre, backward = names
    return bool(getattr(owner, pre, True) or getattr(owner, forward, True) or getattr(owner, backward_pre, True)
                or getattr(owner, backward, True))
