"""Reading weights: a file or a dict -> the state dict inside it, wrappers stripped.

``read_file`` loads ``.safetensors`` with the ``safetensors`` package and everything else
(``.pt``, ``.pth``, ``.pth.tar``, ``.bin``, ...) with ``torch.load(weights_only=True)``: tensors,
dicts, lists, tuples, strings, numbers, ``None``, and ``argparse.Namespace`` (timm's ``train.py`` stores its
arguments as one, under ``args``); a pickled class or a ``__reduce__`` payload is
refused with one line and never runs. ``find_state_dict`` looks where training scripts put the
weights (the official ``train_imagenet.py``: ``{'epoch', 'arch', 'state_dict', 'best_prec1',
'optimizer'}``; timm's ``train.py``: ``state_dict`` and ``state_dict_ema``; ``cbam train``:
``model``; Lightning's ``.ckpt``: ``state_dict``). ``strip_wrappers`` removes ``module.`` (``DataParallel``/DDP)
and ``_orig_mod.`` (``torch.compile``) from the keys, and ``torch.optim.swa_utils.AveragedModel``'s (SWA, EMA)
``module.`` with its ``n_averaged`` counter; ``unwrap`` does so below a prefix the caller names (``ema.`` of a
LightningModule holding the model and its EMA); ``describe_stripped`` says what was removed in words.
"""

from __future__ import annotations

import argparse
import pickle
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from .rules import check_state_dict

ENTRIES = ("state_dict", "model", "state_dict_ema", "model_ema", "module")  # searched in this order
WRAPPERS = ("module.", "_orig_mod.")
AVERAGED_COUNT = "n_averaged"  # torch.optim.swa_utils.AveragedModel's buffer, beside its "module." keys


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


def _load_error(error: Exception) -> str:
    """One line for why loading failed; torch's weights-only refusal is a paragraph with the cause inside."""
    text, marker = str(error), "WeightsUnpickler error:"
    if isinstance(error, pickle.UnpicklingError) and (marker in text or text.startswith("Weights only load failed")):
        # torch's refusal: a line of advice, then the cause (after the marker, or on the next line that has text)
        rest = text.split(marker, 1)[1] if marker in text else "\n".join(text.splitlines()[1:])
        cause = _first_line(rest).split(". ")[0].rstrip(".") or "a global outside the allowed types"
        return f"weights-only loading (tensors and plain containers, never code) refused it: {cause}"
    cause = _first_line(text).split(". ")[0]
    detail = f"{type(error).__name__}: {cause}" if cause else type(error).__name__
    return f"expected a complete file written by torch.save or safetensors ({detail})"


def is_safetensors(path) -> bool:
    return str(path).lower().endswith(".safetensors")


def safetensors_torch():
    """``safetensors.torch``, or ``RuntimeError`` naming the extra that installs it."""
    try:
        import safetensors.torch
    except ImportError:
        raise RuntimeError(".safetensors files need the safetensors package: pip install 'cbam[convert]'") from None
    return safetensors.torch


def read_file(path):
    """What ``path`` holds, on the CPU: a safetensors file's tensors, or a ``torch.load(weights_only=True)``.

    ``FileNotFoundError`` for a missing path, ``ValueError`` (one line: the file and why) for anything
    unreadable: truncated, not a checkpoint, or a pickle that would run code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    load_safetensors = safetensors_torch().load_file if is_safetensors(path) else None
    try:
        if load_safetensors is not None:
            return load_safetensors(path, device="cpu")
        with torch.serialization.safe_globals([argparse.Namespace]):  # timm's train.py saves its arguments as one
            return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # torch.load raises pickle, zip, EOF and runtime errors; safetensors its own
        reason = _load_error(error) if load_safetensors is not None else _not_torch_save(path) or _load_error(error)
        raise ValueError(f"cannot read checkpoint {str(path)!r}: {reason}") from None


def _not_torch_save(path: Path) -> str | None:
    """Why ``path`` is no ``torch.save`` file by its first bytes (neither a zip archive nor a pickle), else ``None``."""
    with open(path, "rb") as file:
        head = file.read(16)
    if head.startswith((b"PK", b"\x80")):
        return None
    if len(head) > 8 and head[8:9] == b"{":
        return "it is no torch.save file but looks like a safetensors file: name it .safetensors"
    return f"expected a file written by torch.save (a zip archive or a pickle); it starts with {head[:8]!r}"


def _is_state_dict(value) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(key, str) and isinstance(item, Tensor) for key, item in value.items())


def _describe(value) -> str:
    if isinstance(value, Mapping):
        keys = list(value)
        shown = ", ".join(repr(key) for key in keys[:5]) + (", ..." if len(keys) > 5 else "")
        return f"a dict with keys [{shown}]" if keys else "an empty dict"
    return type(value).__name__


def _almost_state_dict(content) -> str:
    """Where ``content`` (or one of its ``ENTRIES``) holds tensors beside other values: ``"; under 'state_dict',
    'epoch' holds an int, not a tensor"``; else ``""``."""
    for where, value in [(None, content)] + [(name, content.get(name)) for name in ENTRIES
                                             if isinstance(content, Mapping)]:
        if isinstance(value, Mapping) and any(isinstance(item, Tensor) for item in value.values()):
            key, item = next((key, item) for key, item in value.items()
                             if not (isinstance(key, str) and isinstance(item, Tensor)))
            place = f"under {where!r}, " if where else ""
            return f"; {place}{key!r} holds {type(item).__name__}, not a tensor"
    return ""


def find_state_dict(content, source: str, entry: str | None = None) -> tuple[Mapping[str, Tensor], str | None]:
    """``(state dict, the entry it was under or None for the top level)``; ``source`` names it in errors
    (``"checkpoint 'x.pt'"``).

    ``entry`` picks one (``"state_dict_ema"`` for timm's EMA weights); else the first of ``ENTRIES``
    holding a dict of tensors, else ``content`` itself if it is one.
    """
    if entry is not None:
        if not isinstance(content, Mapping) or entry not in content:
            found = type(content).__name__
            if isinstance(content, Mapping):
                names = [k for k in content if isinstance(k, str)]
                found = f"entries {names}" if len(names) <= 5 else \
                    f"{len(names)} entries [{', '.join(map(repr, names[:5]))}, ...]"
            raise ValueError(f"{source} has no entry {entry!r}: found {found}")
        if not _is_state_dict(content[entry]):
            raise ValueError(f"{source}: entry {entry!r} is no state dict (a dict of tensors), "
                             f"got {_describe(content[entry])}{_almost_state_dict(content[entry])}")
        return content[entry], entry
    if _is_state_dict(content):
        return content, None
    if isinstance(content, Mapping):
        for name in ENTRIES:
            if _is_state_dict(content.get(name)):
                return content[name], name
    raise ValueError(f"{source} holds no state dict: expected a dict of tensors, or a dict with one "
                     f"under 'model'; got {_describe(content)} (also looked under "
                     f"{', '.join(repr(name) for name in ENTRIES if name != 'model')}){_almost_state_dict(content)}")


def other_entries(content, entry: str | None) -> list[str]:
    """The other ``ENTRIES`` in ``content`` that hold a state dict (``state_dict_ema`` beside ``state_dict``)."""
    if not isinstance(content, Mapping) or entry is None:
        return []
    return [name for name in ENTRIES if name != entry and _is_state_dict(content.get(name))]


class Stripped(NamedTuple):
    state: OrderedDict
    removed: tuple[str, ...]  # the wrapper prefixes removed, e.g. ("module.",), and AveragedModel's "n_averaged"
    dropped: Mapping[str, Tensor] = {}  # the keys dropped, as in the input ("module.n_averaged" for DDP(SWA)): values


def _is_averaged_model(state: Mapping[str, Tensor]) -> bool:
    """Whether ``state`` is an ``AveragedModel``'s: ``n_averaged`` (one integer) and keys that all start ``module.``."""
    count = state.get(AVERAGED_COUNT)
    return (count is not None and count.numel() == 1 and len(state) > 1
            and not (count.dtype.is_floating_point or count.dtype.is_complex or count.dtype == torch.bool)
            and all(key.startswith("module.") for key in state if key != AVERAGED_COUNT))


def strip_wrappers(state: Mapping[str, Tensor]) -> Stripped:
    """``state`` without ``module.`` where every key starts with it (repeatedly), without ``_orig_mod.``
    anywhere (``torch.compile`` of a submodule puts it mid-key), and without an ``AveragedModel``'s
    ``n_averaged`` where every other key starts with ``module.`` (its count of averaged models: no weight)."""
    check_state_dict(state, "strip_wrappers")
    state, removed, dropped, prefix = OrderedDict(state), [], {}, ""
    while state:
        averaged = _is_averaged_model(state)
        if averaged:
            dropped[prefix + AVERAGED_COUNT] = state.pop(AVERAGED_COUNT)
        wrapper = next((w for w in WRAPPERS if all(key.startswith(w) for key in state)), None)
        if wrapper is None:
            break
        state = OrderedDict((key[len(wrapper):], value) for key, value in state.items())
        removed += [wrapper, AVERAGED_COUNT] if averaged else [wrapper]
        prefix += wrapper
    keys = list(state)
    if any("._orig_mod." in key for key in keys):
        keys = [key.replace("._orig_mod.", ".") for key in keys]
        removed.append("_orig_mod.")
    if len(set(keys)) != len(keys):
        twice = next(key for index, key in enumerate(keys) if key in keys[:index])
        raise ValueError(f"stripping wrapper prefixes made two keys {twice!r}; the checkpoint mixes wrapped and "
                         "unwrapped names")
    return Stripped(OrderedDict(zip(keys, state.values())), tuple(dict.fromkeys(removed)), dropped)


def top_prefixes(keys) -> list[str]:
    """The first components of the dotted ``keys`` (``"net"`` of ``"net.conv1.weight"``), once each, in order."""
    return list(dict.fromkeys(key.partition(".")[0] for key in keys if "." in key))


def listed(names: Sequence[str], shown: int = 5) -> str:
    """``"'net', 'ema'"``; past ``shown`` names, ``", ... (N in all)"``."""
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(map(repr, names[:shown])) + more


def unwrap(state: Mapping[str, Tensor], source: str, prefix: str | None = None) -> Stripped:
    """``strip_wrappers(state)``; with ``prefix`` (``"ema"``: a LightningModule's ``self.ema``; a trailing ``.``
    added where missing), of only the keys under it, without it (first among ``removed``). ``ValueError`` naming
    the top-level prefixes ``state`` has where no key is under ``prefix``; ``source`` names it."""
    if prefix is None:
        return strip_wrappers(state)
    if not isinstance(prefix, str):
        raise TypeError(f"prefix expects a str such as 'ema', got {type(prefix).__name__}")
    if prefix.strip(".") == "":
        raise ValueError(f"prefix expects a key prefix such as 'ema', got {prefix!r}")
    prefix = prefix if prefix.endswith(".") else f"{prefix}."
    if not any(key.startswith(prefix) and len(key) > len(prefix) for key in state):
        found = top_prefixes(state)
        found = f"its keys sit under {listed(found)}" if found else "none of its keys has a prefix"
        raise ValueError(f"{source} has no keys under the prefix {prefix!r}: {found}")
    return under_prefix(state, prefix)


def under_prefix(state: Mapping[str, Tensor], prefix: str) -> Stripped:
    """The keys of ``state`` under ``prefix`` (ending in ``.``), without it and without the wrappers below it
    (``strip_wrappers``): ``prefix`` first among ``removed``, ``dropped`` named as in ``state``."""
    inner = strip_wrappers(OrderedDict((key[len(prefix):], value) for key, value in state.items()
                                       if key.startswith(prefix) and len(key) > len(prefix)))
    dropped = {prefix + key: value for key, value in inner.dropped.items()}
    return Stripped(inner.state, (prefix, *inner.removed), dropped)


def describe_stripped(removed: Sequence[str]) -> str:
    """``removed`` (``Stripped.removed``, and an attribute prefix ``load_weights`` stripped) in words for a report:
    ``"stripped 'module.' and AveragedModel's 'n_averaged'"``; ``""`` where nothing was."""
    words = [f"AveragedModel's {name!r}" if name == AVERAGED_COUNT else repr(name) if name in WRAPPERS
             else f"{name!r} (a wrapper module's attribute, such as a LightningModule's)" for name in removed]
    return f"stripped {' and '.join(words)}" if words else ""
