"""Argument and input checks shared by every public entry point.

Each check raises ``TypeError`` (wrong kind of thing) or ``ValueError`` (right kind, wrong value)
with a message that names what was expected and what came.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from .presets import GATES, POOL_TYPES, PRESET_NAMES, PRESETS, Preset

LAYOUTS = {1: "(B, C, L)", 2: "(B, C, H, W)", 3: "(B, C, D, H, W)"}


def _describe(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_int(name: str, value, *, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``; accepts anything with ``__index__`` (e.g. a 0-d int tensor)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int >= {minimum}, got {_describe(value)}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int >= {minimum}, got {_describe(value)}") from None
    if number < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {number}")
    return number


def check_kernel_size(value) -> int:
    """A positive odd kernel size: odd so that padding ``k // 2`` keeps the spatial size."""
    size = check_int("kernel_size", value)
    if size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int (padding k // 2 keeps the size), got {size}")
    return size


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_describe(value)}")
    return value


def check_callable(name: str, value):
    if not callable(value):
        raise TypeError(f"{name} must be a callable (a module such as nn.BatchNorm2d), got {_describe(value)}")
    return value


def check_choice(name: str, value, choices: Sequence):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_dims(value) -> int:
    """Number of spatial dimensions: 1, 2 or 3."""
    return check_choice("dims", check_int("dims", value), tuple(LAYOUTS))


def check_gate(value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"gate must be one of {', '.join(map(repr, GATES))}; got {_describe(value)}")
    return check_choice("gate", value.replace("_", "-"), GATES)


def check_pool_types(value) -> tuple[str, ...]:
    """A non-empty sequence of distinct pool names from ``POOL_TYPES``."""
    expected = f"a non-empty sequence of distinct names from {POOL_TYPES}"
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"pool_types must be {expected}, got {_describe(value)}")
    pools = tuple(value)
    if not pools or any(p not in POOL_TYPES for p in pools) or len(set(pools)) != len(pools):  # names hash
        raise ValueError(f"pool_types must be {expected}, got {pools!r}")
    return pools


def check_spatial_kernels(weights: Sequence[torch.Tensor], owner: str) -> None:
    """A spatial conv chain ``[(1, I, *kernel), ...]``: non-empty, odd kernels (padding ``k // 2`` keeps the size)."""
    if not weights:
        raise ValueError(f"{owner} expects a conv weight or a non-empty chain of them, got an empty sequence")
    for weight in weights:
        if any(k % 2 == 0 for k in weight.shape[2:]):
            raise ValueError(f"{owner} expects odd kernel sizes (padding k // 2 keeps the size), "
                             f"got a conv weight of shape {tuple(weight.shape)}")


def check_preset(value) -> Preset:
    """The ``Preset`` named by ``value`` (``None`` is the paper's form)."""
    if value is not None and not isinstance(value, str):
        raise TypeError(f"preset must be None or one of {list(PRESET_NAMES)}; got {_describe(value)}")
    return PRESETS[check_choice("preset", value, tuple(PRESETS))]


def check_input(x, owner: str, *, dims: int | None = None, channels: int | None = None) -> None:
    """Check that ``x`` is a floating ``(B, C, *spatial)`` tensor fit for ``owner``.

    ``dims`` fixes the number of spatial dims, ``channels`` the size of dim 1; ``None`` accepts any.
    An empty batch (B = 0) is fine; empty spatial dims are not (there is nothing to pool).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner} expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{owner} expects a floating-point tensor, got dtype {x.dtype}")
    shape = tuple(x.shape)
    if dims is not None and x.dim() != dims + 2:
        raise ValueError(f"{owner} expects a {dims + 2}-D input {LAYOUTS[dims]}, got shape {shape}")
    if x.dim() < 3:
        raise ValueError(f"{owner} expects an input (B, C, *spatial) with at least 3 dims, got shape {shape}")
    if channels is not None and shape[1] != channels:
        raise ValueError(f"{owner} expects {channels} channels at dim 1, got {shape[1]} (shape {shape})")
    if shape[1] == 0:
        raise ValueError(f"{owner} expects at least 1 channel at dim 1, got shape {shape}")
    if 0 in shape[2:]:
        raise ValueError(f"{owner} expects non-empty spatial dims, got shape {shape}")


def check_residual(residual, x: torch.Tensor, owner: str) -> None:
    """Check that ``residual`` can be added to ``x`` as is: a tensor of its shape, dtype and device."""
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"{owner} expects residual to be a torch.Tensor, got {type(residual).__name__}")
    for what in ("shape", "dtype", "device"):
        expected, actual = getattr(x, what), getattr(residual, what)
        if expected != actual:
            shown = tuple if what == "shape" else str
            raise ValueError(f"{owner} expects residual with the input's {what} {shown(expected)}, "
                             f"got {shown(actual)}")
