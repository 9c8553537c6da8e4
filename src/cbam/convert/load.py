"""``load_weights``: any CBAM or ResNet checkpoint people have, into a model, with a report of what was done.

The source (a file or a dict) is read (``read``), its state dict found and unwrapped, its layout
detected (``layout``) and converted to ours; the model's own dict is detected the same way and the
weights are converted on to its layout (ours, timm's or the official code's: so a timm or official
model loads our checkpoints too), with the attribute holding each CBAM renamed to the model's
(timm's ``se`` slot vs ``cbam``, where a module holds one CBAM on each side); a model wrapped in
``DataParallel``, ``torch.compile`` or ``AveragedModel`` matches by its inner names. A source whose keys all
start with one attribute name the model's do not (``net.``: a LightningModule's ``self.net``) loads without it
(and without wrappers below it); ``prefix=`` picks one where there are several (``self.net`` and
``self.ema``). Then every key must fit, strictly, with three exceptions the report lists: the attention
of a CBAM model when the source has none (ImageNet backbones), the classifier when ``new_head=True`` and
its shape differs, and BatchNorm batch counters that old checkpoints lack (and an ``AveragedModel``'s
``n_averaged`` where the source has none: an AveragedModel's loads with its weights).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .computes import check_computes_as
from .layout import PLAIN, Layout, detect
from .read import (
    Stripped,
    describe_stripped,
    find_state_dict,
    listed,
    other_entries,
    read_file,
    strip_wrappers,
    top_prefixes,
    under_prefix,
    unwrap,
)
from .rules import OURS_ANCHOR, attention_prefixes, from_official, from_timm, to_official, to_timm

# timm's ResNet "se" slot <-> "cbam" both ways ("auto"): so a dict in ours matches cbam.models directly
_FROM = {"official": from_official, "timm": from_timm}
_TO = {"official": to_official, "timm": to_timm}
_COUNTER = "num_batches_tracked"


@dataclass(frozen=True)
class LoadReport:
    """What ``load_weights`` found and did. ``str(report)`` is a short paragraph for people."""

    source: str                    # "checkpoint 'PATH'" or "the state dict"
    entry: str | None              # where the state dict was ("state_dict", ...), None for the top level
    other_entries: tuple[str, ...]  # other state dicts in the file, e.g. ("state_dict_ema",)
    stripped: tuple[str, ...]      # removed: "module.", "_orig_mod.", AveragedModel's "n_averaged", "net." (Lightning)
    layout: Layout                 # the checkpoint's
    target: Layout                 # the model's
    loaded: int                    # tensors loaded
    left_at_init: tuple[str, ...]  # the model's keys not loaded: attention absent from the source
    new_head: tuple[str, ...]      # classifier keys left at initialisation (new_head=True, other shape)
    counters: tuple[str, ...]      # BatchNorm num_batches_tracked the source lacks (kept as they were)
    n_averaged: int | None = None  # the model is an AveragedModel: its n_averaged after the load
    n_averaged_loaded: bool = False  # ... taken from the source's (an AveragedModel's too), else kept

    @property
    def converted(self) -> str | None:
        """``"official -> cbam"`` style, or ``None`` where the keys were already the model's."""
        source, target = self.layout.name, self.target.name
        if PLAIN in (source, target) or source == target:
            return None
        return f"{source} -> {target}"

    def __str__(self) -> str:
        where = f" under {self.entry!r}" if self.entry else ""
        if self.other_entries:
            where += f" (the checkpoint also holds {', '.join(map(repr, self.other_entries))}: pass entry= to use it)"
        lines = [f"{self.source}: {self.layout}{where}"]
        done = []
        if self.stripped:
            done.append(describe_stripped(self.stripped))
        if self.converted:
            swap = {"official": " (spatial conv [max, mean] -> [mean, max])"}.get(self.layout.name, "")
            swap = {"official": " (spatial conv [mean, max] -> [max, mean])"}.get(self.target.name, swap)
            done.append(f"converted {self.converted}{swap}")
        kept = self.left_at_init or self.new_head or self.counters or (
            self.n_averaged is not None and not self.n_averaged_loaded)
        loaded = "loaded" if kept else "loaded strictly"
        done.append(f"{loaded} {self.loaded} tensors into {self.target}")
        lines.append("; ".join(done))
        if self.left_at_init:
            modules = _modules(self.left_at_init)
            shown = ", ".join(modules[:4]) + (f", ... ({len(modules)} modules)" if len(modules) > 4 else "")
            lines.append(f"left at initialisation: {len(self.left_at_init)} attention keys the checkpoint lacks, "
                         f"in {shown}")
        if self.new_head:
            lines.append(f"new head: {', '.join(self.new_head)} left at initialisation (another shape)")
        if self.counters:
            lines.append(f"{len(self.counters)} BatchNorm batch counters absent from the checkpoint, kept")
        if self.n_averaged_loaded:
            lines.append(f"AveragedModel's 'n_averaged' ({self.n_averaged}) loaded too: averaging goes on from there")
        elif self.n_averaged is not None:
            after = "; its next update_parameters copies the model over these weights" if self.n_averaged == 0 else ""
            lines.append(f"the model's AveragedModel 'n_averaged' ({self.n_averaged}) kept: the source has none"
                         f"{after}")
        return "\n".join(lines)


def _modules(keys) -> list[str]:
    """``layer1.0.cbam.channel_att.fc1.weight`` ... -> ``["layer1.0.cbam", ...]`` (each attention module once)."""
    names = []
    for key in keys:
        for marker in (".channel_att.", ".spatial_att.", ".channel.", ".spatial.", ".ChannelGate.", ".SpatialGate."):
            if marker in key:
                key = key.split(marker)[0]
                break
        names.append(key)
    return list(dict.fromkeys(names))


def as_ours(state: Mapping[str, Tensor], layout: Layout | None = None) -> OrderedDict:
    """``state`` (in ``layout``, detected if ``None``) with every CBAM in our keys; prefixes kept."""
    layout = detect(state) if layout is None else layout
    return _FROM[layout.name](state) if layout.name in _FROM else OrderedDict(state)


def _by_parent(prefixes) -> dict[str, list[str]]:
    """``{parent module's name: the CBAM prefixes under it}`` (``layer1.0.se.`` under ``layer1.0``)."""
    found: dict[str, list[str]] = {}
    for prefix in prefixes:
        found.setdefault(prefix[:-1].rpartition(".")[0], []).append(prefix)
    return found


def _match_attention_names(state: OrderedDict, target_prefixes: list[str]) -> OrderedDict:
    """Rename the attribute holding each CBAM to the model's (``se`` vs ``cbam``) where a parent module holds
    exactly one CBAM in the checkpoint and one in the model, under names the checkpoint does not use."""
    source_prefixes = attention_prefixes(state, OURS_ANCHOR)
    wanted = _by_parent(target_prefixes)
    renames = {}
    for parent, (prefix, *others) in _by_parent(source_prefixes).items():
        targets = wanted.get(parent, [])
        if not others and len(targets) == 1 and targets[0] not in source_prefixes:
            renames[prefix] = targets[0]
    if not renames:
        return state
    renamed = OrderedDict()
    for key, value in state.items():
        prefix = next((p for p in renames if key.startswith(p)), None)
        renamed[renames[prefix] + key[len(prefix):] if prefix else key] = value
    return renamed


def _head_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the model's last ``nn.Linear`` outside a CBAM's channel MLP (its classifier: a CBAM
    ``add_cbam`` put on the model's root comes after it)."""
    from ..nn import ChannelAttention, DynamicCBAM

    mlps = [name for name, module in model.named_modules() if isinstance(module, (ChannelAttention, DynamicCBAM))]
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)
               and not any(name.startswith(f"{mlp}.") or not mlp for mlp in mlps)]
    if not linears:
        return set()
    prefix = f"{linears[-1]}." if linears[-1] else ""
    return {prefix + name for name, _ in model.get_submodule(linears[-1]).named_parameters()}


def _maps_hint(key: str, found: Tensor, expected: Tensor) -> str:
    """Where a spatial conv over one pooled map meets one over two: which module each belongs to."""
    if not key.endswith("conv.weight") or found.dim() != expected.dim() or found.dim() < 3:
        return ""
    if {found.shape[1], expected.shape[1]} != {1, 2} or found.shape[2:] != expected.shape[2:]:
        return ""
    return (" (a conv over one pooled map is a light CBAM's: LightCBAM, or pool_types=('mix',) and "
            "spatial_pool='mix'; over two maps, CBAM's)")


def _fits_under(state: Mapping[str, Tensor], prefix: str, expected: Mapping[str, Tensor], target: Layout,
                target_prefixes: list[str]) -> bool:
    """Whether the keys of ``state`` under ``prefix``, in the model's layout, are the model's keys (``expected``;
    BatchNorm counters optional) with their shapes: a strict load with ``prefix=`` would take them."""
    try:
        weights, _ = _in_model_layout(under_prefix(state, f"{prefix}.").state, target, target_prefixes, "")
    except ValueError:
        return False
    missing, unexpected, wrong = _fit(weights, expected)
    return not (unexpected or wrong) and all(key.rpartition(".")[2] == _COUNTER for key in missing)


def _fit(weights: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> tuple[list, list, list]:
    """How ``weights`` (in the model's layout) fit the model's ``expected``: its keys missing from them, their keys
    the model lacks, and ``(key, found, expected)`` for each shape that differs (in the model's order)."""
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    wrong = [(key, weights[key], value) for key, value in expected.items()
             if key in weights and weights[key].shape != value.shape]
    return missing, unexpected, wrong


def _prefix_hint(state: Mapping[str, Tensor], expected: Mapping[str, Tensor], target: Layout,
                 target_prefixes: list[str]) -> str:
    """Where every key of ``state`` sits under one of several top-level prefixes the model's keys (``expected``)
    lack, and the keys under some of them fit the model (``_fits_under``: a LightningModule's ``self.net`` and
    ``self.ema``): which, and the ``prefix=`` that picks each; else ``""``."""
    prefixes = top_prefixes(state)
    if len(prefixes) < 2 or any("." not in key for key in state) or set(prefixes) & set(top_prefixes(expected)):
        return ""
    fitting = [prefix for prefix in prefixes if _fits_under(state, prefix, expected, target, target_prefixes)]
    if not fitting:
        return ""
    picks = " or ".join(f"prefix={prefix!r}" for prefix in fitting)
    return (f"its keys sit under the prefixes {listed(prefixes)}, which the model's keys lack: pick one with "
            f"{picks} (on the command line --prefix, or --init-prefix for cbam train --init-from)")


def _mismatch(source: str, missing, unexpected, wrong_shapes, layout: Layout, target: Layout, hint: str) -> str:
    """One line: the ``hint`` where there is one (``_prefix_hint``), else the first wrong-shape key and the
    missing/unexpected counts with the first of each; the layouts."""
    parts = [hint] if hint else []
    if wrong_shapes:
        key, found, expected = wrong_shapes[0]
        more = f" (and {len(wrong_shapes) - 1} more)" if len(wrong_shapes) > 1 else ""
        parts.append(f"size mismatch for {key}: found {found.shape} in the checkpoint, expected {expected.shape}{more}"
                     f"{_maps_hint(key, found, expected)}")
    if (missing or unexpected) and not hint:
        first = ", ".join(f"{kind} {keys[0]!r}" for kind, keys in (("missing", missing), ("unexpected", unexpected))
                          if keys)
        parts.append(f"{len(missing)} missing and {len(unexpected)} unexpected keys (first: {first})")
    return f"{source} does not fit the model: {'; '.join(parts)}; checkpoint: {layout}, model: {target}"


def _in_model_layout(state: Mapping[str, Tensor], target: Layout, target_prefixes: list[str],
                     name: str) -> tuple[OrderedDict, Layout]:
    """``state`` converted to the model's layout (``target``), and the layout ``state`` was in."""
    layout = detect(state)
    try:
        weights = _match_attention_names(as_ours(state, layout), target_prefixes)
        return (_TO[target.name](weights) if target.name in _TO else weights), layout
    except ValueError as error:  # a CBAM the model's layout cannot express
        raise ValueError(f"{name} does not fit the model: {error}; checkpoint: {layout}, model: {target}") from None


def _without_wrapper_attribute(state: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> Stripped | None:
    """A module that holds the model as an attribute saves its keys under that name: a LightningModule with
    ``self.net = model`` writes ``net.conv1.weight``. Where every key of ``state`` starts with one first
    component (``"net."``) that no key the model ``expected`` starts with (so none of them can fit as they
    are): ``state`` without it, and without the wrappers under it (``self.net = AveragedModel(model)``),
    ``"net."`` first among ``removed`` (``dropped`` named as in ``state``); else ``None``."""
    prefix = next(iter(state)).partition(".")[0] + "."
    if not all(key.startswith(prefix) and len(key) > len(prefix) for key in state):
        return None
    if any(key.startswith(prefix) for key in expected):
        return None
    return under_prefix(state, prefix)


class _Count(NamedTuple):
    """An ``AveragedModel``'s ``n_averaged`` across a load: the model's after it (``None``: no AveragedModel),
    whether it comes from the source, and then the source's tensor in the model's shape and dtype."""

    value: int | None
    loaded: bool
    tensor: Tensor | None


def _averaged_count(stripped: Stripped, own_inner: Stripped) -> _Count:
    """The ``_Count`` of loading a source ``stripped`` to its inner keys into a model whose dict, so stripped,
    is ``own_inner`` (each one's ``n_averaged``, where it has one, among its ``dropped``)."""
    if not own_inner.dropped:
        return _Count(None, False, None)
    mine = next(iter(own_inner.dropped.values()))
    if not stripped.dropped:
        return _Count(int(mine), False, None)
    theirs = next(iter(stripped.dropped.values()))
    return _Count(int(theirs), True, theirs.reshape(mine.shape).to(mine.dtype))


def load_weights(source, model: nn.Module, *, entry: str | None = None, prefix: str | None = None,
                 allow_missing_attention: bool = True, new_head: bool = False,
                 source_name: str | None = None) -> LoadReport:
    """Load ``source`` (a path or a checkpoint dict) into ``model`` in place; returns a ``LoadReport``.

    ``source``: ``.pt/.pth/.pth.tar/.bin`` (``torch.load(weights_only=True)``) or ``.safetensors``, or
    what such a file holds; the state dict is taken from ``entry`` if given, else the first of
    ``state_dict``, ``model``, ``state_dict_ema``, ``model_ema``, ``module``, else the top level.
    Layouts: ours, the official code's ``ResidualNet``, timm's ResNet with ``attn_layer="cbam"``,
    a plain ResNet (torchvision's or timm's); converted to the model's layout.

    ``prefix``: load only the keys under it (a trailing ``.`` added where missing), without it; for a
    LightningModule holding ``self.net = model`` and ``self.ema = AveragedModel(model)``, ``"ema"`` loads
    the EMA weights (and its ``n_averaged`` into an ``AveragedModel``), ``"net"`` the raw ones. A prefix
    no key has raises ``ValueError`` naming the prefixes the state dict has.

    ``allow_missing_attention``: a source without any CBAM loads into a CBAM model with every
    attention key left at its initialisation (listed in ``report.left_at_init``); ``False`` refuses.
    ``new_head``: the classifier (the model's last ``nn.Linear``) stays at initialisation where the
    source's has another shape (fine-tuning on other classes). Anything else that does not fit raises
    ``ValueError`` naming the first wrong-shape, missing and unexpected keys and both layouts; the
    model is then left unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_weights expects an nn.Module to load into, got {type(model).__name__}")
    if isinstance(source, (str, PathLike)):
        name = source_name or f"checkpoint {str(Path(source))!r}"
        content = read_file(source)
    elif isinstance(source, Mapping):
        name, content = source_name or "the state dict", source
    else:
        raise TypeError(f"load_weights expects a path or a checkpoint dict, got {type(source).__name__}")
    state, found_entry = find_state_dict(content, name, entry)
    stripped = unwrap(state, name, prefix)

    own = model.state_dict()
    # a wrapped model (DataParallel, torch.compile, AveragedModel) matches by its inner names. Into an
    # AveragedModel the weights go to its .module, which is what it computes with; its n_averaged (how many
    # models it has averaged) comes from a source AveragedModel's (resuming SWA: the average goes on), and is
    # kept and reported where the source has none, as the BatchNorm counters are.
    own_inner = strip_wrappers(own)
    expected = own_inner.state
    own_name = dict(zip(expected, (key for key in own if key not in own_inner.dropped)))
    target = detect(expected)
    target_prefixes = attention_prefixes(as_ours(expected, target), OURS_ANCHOR)
    weights, layout = _in_model_layout(stripped.state, target, target_prefixes, name)
    stripped_note = "" if prefix is None else f" (its keys under {stripped.removed[0]!r})"
    if any(key not in expected for key in weights):  # never where the keys fit as they are
        if (unwrapped := _without_wrapper_attribute(stripped.state, expected)) is not None:
            stripped = Stripped(unwrapped.state, stripped.removed + unwrapped.removed,
                                {**stripped.dropped, **unwrapped.dropped})
            weights, layout = _in_model_layout(stripped.state, target, target_prefixes, name)
            stripped_note += f" (its {unwrapped.removed[0]!r} prefix stripped)"
    count = _averaged_count(stripped, own_inner)

    missing, unexpected, wrong = _fit(weights, expected)
    left_at_init: tuple[str, ...] = ()
    if layout.name == PLAIN and target.name != PLAIN and allow_missing_attention:
        left_at_init = tuple(key for key in missing if key.startswith(target.prefixes))
    counters = tuple(key for key in missing if key.rpartition(".")[2] == _COUNTER and key not in left_at_init)
    head: tuple[str, ...] = ()
    if new_head:
        inner_name = {model_key: key for key, model_key in own_name.items()}
        head_keys = {inner_name[key] for key in _head_keys(model)}
        head = tuple(key for key, _, _ in wrong if key in head_keys)
        if len(head) != len(head_keys & set(weights)):  # the whole head is new, or none of it
            head = ()
    missing = [key for key in missing if key not in counters and key not in left_at_init]
    wrong = [item for item in wrong if item[0] not in head]
    if missing or unexpected or wrong:
        raise ValueError(_mismatch(name + stripped_note, missing, unexpected, wrong, layout, target,
                                   "" if prefix is not None else _prefix_hint(state, expected, target,
                                                                               target_prefixes)))
    check_computes_as(model, layout.name, name)  # every key fits; the options must too (computes.py)
    weights = OrderedDict((key, value) for key, value in weights.items() if key not in head)
    for key, value in weights.items():  # what the copy would refuse half-way, refused before any copy
        if value.layout != torch.strided or value.is_quantized or value.is_meta:
            kind = "quantized" if value.is_quantized else "meta" if value.is_meta else str(value.layout)
            raise ValueError(f"{name} does not fit the model: {key!r} is a {kind} tensor; expected a dense one")
    loaded = OrderedDict((own_name[key], value) for key, value in weights.items())
    if count.loaded:
        loaded[next(iter(own_inner.dropped))] = count.tensor
    try:
        model.load_state_dict(loaded, strict=False)
    except RuntimeError as error:  # other copy failures: one line
        raise ValueError(f"{name} does not fit the model: {str(error).strip().splitlines()[-1].strip()}") from None
    return LoadReport(name, found_entry, tuple(other_entries(content, found_entry)), stripped.removed, layout,
                      target, len(weights), left_at_init, head, counters, count.value, count.loaded)
