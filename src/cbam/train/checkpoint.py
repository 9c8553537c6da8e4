"""Checkpoints: written atomically, read without ever unpickling code.

``save_checkpoint`` writes with ``torch.save`` through ``write_atomic`` (a crash mid-save leaves the
previous checkpoint whole). ``read_checkpoint`` uses ``torch.load(weights_only=True)``: tensors,
dicts, lists, tuples, strings, numbers, ``None``; anything else (a pickled class, a ``__reduce__``
payload) is refused with one line and never runs (both through ``cbam.convert``'s reader).
``load_checkpoint`` puts a checkpoint's model weights into a model, strictly, through
``cbam.convert.load_weights``. ``check_run_checkpoint`` checks that a file tagged ``FORMAT`` holds
what ``cbam train`` writes, so that a corrupt or crafted one is refused in one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..atomic import write_atomic
from ..convert import find_state_dict, load_weights, read_file
from ..models import RESNETS
from ..models.resnet import STEMS
from ..presets import PRESET_NAMES

FORMAT = "cbam-train-1"  # the "format" tag of cbam train's checkpoints
# The run's settings its checkpoint stores under "config" (what changes a run's trajectory: --resume must keep
# them), with their types.
RUN_SETTINGS = {"model": str, "attention": str, "preset": (str, type(None)), "stem": str, "data": str,
                "image_size": int, "epochs": int, "batch_size": int, "optimizer": str, "lr": (int, float),
                "weight_decay": (int, float), "seed": int, "amp": bool, "channels_last": bool}
_MODEL_CHOICES = {"model": RESNETS, "attention": ("cbam", "none"), "preset": (None, *PRESET_NAMES), "stem": STEMS}
MODEL_ENTRIES = ("config", "classes", "model")  # what rebuilding the trained model takes
RESUME_ENTRIES = (*MODEL_ENTRIES, "epoch", "optimizer", "scheduler", "scaler", "rng", "history")  # what --resume takes
_ENTRIES = {  # entry -> (what cbam train writes there, a test of it)
    "config": ("a dict of the run's settings", lambda value: isinstance(value, Mapping)),
    "classes": ("a non-empty list of class names (str)",
                lambda value: isinstance(value, (list, tuple)) and bool(value)
                and all(isinstance(name, str) for name in value)),
    "model": ("a state dict, a dict of str -> tensor",
              lambda value: isinstance(value, Mapping) and bool(value)
              and all(isinstance(key, str) and isinstance(item, Tensor) for key, item in value.items())),
    "epoch": ("an int >= 0", lambda value: type(value) is int and value >= 0),
    "optimizer": ("a dict, the optimizer's state_dict()", lambda value: isinstance(value, Mapping)),
    "scheduler": ("a dict, the scheduler's state_dict()", lambda value: isinstance(value, Mapping)),
    "scaler": ("a dict, the grad scaler's state_dict()", lambda value: isinstance(value, Mapping)),
    "rng": ("a uint8 tensor, torch.get_rng_state()",
            lambda value: isinstance(value, Tensor) and value.dtype == torch.uint8),
    "history": ("a list of dicts, one per epoch",
                lambda value: isinstance(value, list) and all(isinstance(row, Mapping) for row in value)),
}


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


def is_run_checkpoint(content) -> bool:
    """Whether ``content`` (what a checkpoint file holds) carries ``cbam train``'s format tag."""
    return isinstance(content, Mapping) and content.get("format") == FORMAT


def check_run_checkpoint(checkpoint: Mapping, path, entries=MODEL_ENTRIES) -> Mapping:
    """``checkpoint`` (read from ``path``, tagged ``FORMAT``) if it holds ``entries`` as ``cbam train`` writes
    them and every setting of ``RUN_SETTINGS`` under ``"config"``; else a one-line ``ValueError`` naming the file,
    the entry and what it should hold. A string under ``"model"`` is refused, never read as a path."""
    name = f"checkpoint {str(path)!r} is a {FORMAT} checkpoint but"
    for entry in entries:
        expected, valid = _ENTRIES[entry]
        if entry not in checkpoint:
            raise ValueError(f"{name} has no {entry!r} entry; expected {expected}")
        if not valid(checkpoint[entry]):
            raise ValueError(f"{name} its {entry!r} entry should be {expected}, got {_describe(checkpoint[entry])}")
    config = checkpoint["config"]
    for key, kind in RUN_SETTINGS.items():
        if key not in config:
            raise ValueError(f"{name} its 'config' entry has no {key!r} setting")
        if not isinstance(config[key], kind):
            kinds = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise ValueError(f"{name} its config's {key!r} should be {kinds}, got {_describe(config[key])}")
    for key, choices in _MODEL_CHOICES.items():  # what rebuilding the model reads: refused here, naming the file
        if config[key] not in choices:
            raise ValueError(f"{name} its config's {key!r} should be one of {', '.join(map(repr, choices))}, got "
                             f"{_describe(config[key])}")
    return checkpoint


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    shown = repr(value)
    return f"{type(value).__name__} {shown if len(shown) <= 40 else shown[:37] + '...'}"
