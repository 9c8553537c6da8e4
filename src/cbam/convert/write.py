"""``save_weights``: a state dict to ``.safetensors`` or a torch file, atomically."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..atomic import write_atomic
from .read import is_safetensors, safetensors_torch
from .rules import check_state_dict

TORCH_SUFFIXES = (".pt", ".pth", ".pth.tar", ".bin")


def check_weights_path(path) -> Path:
    """``path`` if its name ends in ``.safetensors`` or one of ``TORCH_SUFFIXES``, else ``ValueError``."""
    path = Path(path)
    if not (is_safetensors(path) or path.name.lower().endswith(TORCH_SUFFIXES)):
        raise ValueError(f"weights file must end in .safetensors, {', '.join(TORCH_SUFFIXES)}; got {str(path)!r}")
    return path


def save_weights(path, state: Mapping[str, Tensor]) -> Path:
    """Write ``state`` (str -> Tensor) to ``path``: safetensors (``{"format": "pt"}`` metadata, as timm and
    the Hugging Face hub write it) or ``torch.save`` of a plain dict; through ``write_atomic``, so a
    failure leaves ``path`` as it was. The folder must exist."""
    if isinstance(path, (Mapping, torch.nn.Module)):  # torch.save's order is (obj, path)
        raise TypeError(f"save_weights(path, state) takes the path first, got {type(path).__name__} as the path "
                        "(torch.save's order is the other way round)")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"save_weights expects a path (str or os.PathLike) first, got {type(path).__name__}")
    path = check_weights_path(path)
    if isinstance(state, torch.nn.Module):
        raise TypeError(f"save_weights expects a state dict, got the module {type(state).__name__}: pass "
                        "model.state_dict()")
    check_state_dict(state, "save_weights")
    if not state:
        raise ValueError(f"save_weights: the state dict is empty; nothing to write to {str(path)!r}")
    if is_safetensors(path):
        save = safetensors_torch().save
        # safetensors refuses tensors that share memory or are not contiguous: give it plain copies
        tensors = {key: value.detach().contiguous().clone() for key, value in state.items()}
        return write_atomic(path, lambda file: file.write(save(tensors, metadata={"format": "pt"})))
    plain = OrderedDict((key, value.detach()) for key, value in state.items())
    return write_atomic(path, lambda file: torch.save(plain, file))
