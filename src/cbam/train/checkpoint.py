"""Checkpoints: written atomically, read without ever unpickling code.

``save_checkpoint`` writes with ``torch.save`` through ``write_atomic`` (a crash mid-save leaves the
previous checkpoint whole). ``read_checkpoint`` uses ``torch.load(weights_only=True)``: tensors,
dicts, lists, tuples, strings, numbers, ``None``; anything else (a pickled class, a ``__reduce__``
payload) is refused with one line and never runs. ``load_checkpoint`` puts a checkpoint's model
weights into a model, strictly.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..atomic import write_atomic


def save_checkpoint(path, checkpoint: Mapping) -> Path:
    """``torch.save(checkpoint)`` to ``path`` atomically; keep it to tensors and plain containers."""
    return write_atomic(path, lambda file: torch.save(dict(checkpoint), file))


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


def _load_error(error: Exception) -> str:
    """One line for why ``torch.load`` failed; torch's weights-only refusal is a paragraph with the cause inside."""
    marker = "WeightsUnpickler error:"
    if isinstance(error, pickle.UnpicklingError) and marker in str(error):
        cause = _first_line(str(error).split(marker, 1)[1]).split(". ")[0]
        return f"weights-only loading (tensors and plain containers, never code) refused it: {cause}"
    return _first_line(str(error)) or type(error).__name__


def read_checkpoint(path):
    """What ``path`` holds, loaded on the CPU with ``weights_only=True``; ``ValueError`` for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # torch.load raises pickle, zip, EOF and runtime errors for a bad file
        raise ValueError(f"cannot read checkpoint {str(path)!r}: {_load_error(error)}") from None


def model_state(checkpoint, path) -> Mapping[str, Tensor]:
    """The state dict in ``checkpoint``: itself, or the one under ``"model"``."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    if not isinstance(state, Mapping) or not all(isinstance(value, Tensor) for value in state.values()):
        raise ValueError(f"checkpoint {str(path)!r} holds no state dict: expected a dict of tensors, or a dict "
                         f"with one under 'model'; got {type(state).__name__}")
    return state


def load_state(model: nn.Module, state: Mapping[str, Tensor], path) -> None:
    """``model.load_state_dict(state)`` with every key required, failures as one-line ``ValueError``s."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches: one line per key after a header line
        details = "; ".join(line.strip() for line in str(error).splitlines()[1:] if line.strip())
        raise ValueError(f"checkpoint {str(path)!r} does not fit the model: {details}") from None
    if missing or unexpected:
        first = ", ".join(f"{kind} {keys[0]!r}" for kind, keys in (("missing", missing), ("unexpected", unexpected))
                          if keys)
        raise ValueError(f"checkpoint {str(path)!r} does not fit the model: {len(missing)} missing and "
                         f"{len(unexpected)} unexpected keys (first: {first})")


def load_checkpoint(model: nn.Module, path) -> None:
    """Load weights from ``path`` into ``model``, strictly; only tensors and plain containers are unpickled.

    Accepts a bare state dict or a dict with the state dict under ``"model"`` (what ``cbam train`` writes).
    """
    load_state(model, model_state(read_checkpoint(path), path), path)
