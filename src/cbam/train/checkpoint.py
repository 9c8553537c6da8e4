"""Checkpoints: written atomically, read without ever unpickling code.

``save_checkpoint`` writes with ``torch.save`` through ``write_atomic`` (a crash mid-save leaves the
previous checkpoint whole). ``read_checkpoint`` uses ``torch.load(weights_only=True)``: tensors,
dicts, lists, tuples, strings, numbers, ``None``; anything else (a pickled class, a ``__reduce__``
payload) is refused with one line and never runs (both through ``cbam.convert``'s reader).
``load_checkpoint`` puts a checkpoint's model weights into a model, strictly, through
``cbam.convert.load_weights``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..atomic import write_atomic
from ..convert import find_state_dict, load_weights, read_file


def save_checkpoint(path, checkpoint: Mapping) -> Path:
    """``torch.save(checkpoint)`` to ``path`` atomically; keep it to tensors and plain containers."""
    return write_atomic(path, lambda file: torch.save(dict(checkpoint), file))


def read_checkpoint(path):
    """What ``path`` holds, loaded on the CPU with ``weights_only=True``; ``ValueError`` for anything else."""
    return read_file(path)


def model_state(checkpoint, path) -> Mapping[str, Tensor]:
    """The state dict in ``checkpoint``: itself, or the one under ``"model"`` (or another usual entry)."""
    return find_state_dict(checkpoint, f"checkpoint {str(path)!r}")[0]


def load_state(model: nn.Module, state: Mapping[str, Tensor], path) -> None:
    """``model.load_state_dict(state)`` with every key required, failures as one-line ``ValueError``s."""
    load_weights(state, model, allow_missing_attention=False, source_name=f"checkpoint {str(path)!r}")


def load_checkpoint(model: nn.Module, path):
    """Load weights from ``path`` into ``model``, strictly; only tensors and plain containers are unpickled.

    Any checkpoint ``cbam.convert.load_weights`` reads (``cbam train``'s, the official code's, timm's,
    torchvision's, ``.safetensors``), converted to the model's layout; returns its ``LoadReport``.
    """
    return load_weights(path, model, allow_missing_attention=False)
