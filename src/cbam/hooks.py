"""Whether hooks see a module's calls: fused paths that skip a module's own call (CBAM's residual
tail, a BatchNorm folded into CBAM's passes) run only where nothing would notice."""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as torch_module

_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def watched(module: nn.Module) -> bool:
    """Whether hooks (the module's own or global ones) see ``module``'s calls; ``True`` where torch keeps
    them elsewhere than these private dicts (a later torch), so that hooks always see the module."""
    default = {"": True}  # a missing dict counts as a hook
    own = (getattr(module, name, default) for name in _HOOKS)
    shared = (getattr(torch_module, f"_global{name}", default) for name in _HOOKS)
    return any(bool(hooks) for hooks in (*own, *shared))
