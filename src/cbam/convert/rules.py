"""Key rules between other CBAM implementations' state dicts and ``cbam.CBAM``'s, both ways.

Every direction works on a single module's dict or a whole model's: every CBAM found under any
prefix is renamed in place of its keys (``layer1.0.cbam.ChannelGate.mlp.1.weight`` <->
``layer1.0.cbam.channel_att.fc1.weight``), every other key passes through unchanged, order kept.
A CBAM is recognised by its first MLP weight; the input dict is never modified.

Timm's ResNet blocks hold their CBAM as ``se`` (the slot ``attn_layer`` fills), ``cbam.models`` and
the official code as ``cbam``. ``from_timm``/``to_timm`` rename that attribute where the keys say
they should: in a whole ResNet's dict (stem ``conv1``, stages ``layer1``–``layer4``, head ``fc``),
``layer1.0.se.`` <-> ``layer1.0.cbam.``; ``attention_name=`` overrides (``None`` keeps every prefix).

Load ``from_official``'s result into ``CBAM(C, preset="official")`` and ``from_timm``'s into
``CBAM(C, preset="timm")`` (timm's ``CbamModule``) or ``LightCBAM(C, preset="timm")`` (its
``LightCbamModule``: a spatial conv over one map); ``to_official``/``to_timm`` take such models' dicts.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Mapping

from torch import Tensor

_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
AUTO = "auto"

Transform = Callable[[str, Tensor], Tensor] | None
Rule = tuple[str, Transform]


def check_state_dict(state_dict, caller: str) -> None:
    """``TypeError`` unless ``state_dict`` maps str keys to tensors, naming the first key or value that does not."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{caller} expects a state dict (a mapping of str to Tensor), got {type(state_dict).__name__}")
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"{caller} expects a state dict with str keys, got the key {key!r} ({type(key).__name__})")
        if not isinstance(value, Tensor):
            raise TypeError(f"{caller} expects a state dict of tensors, got {type(value).__name__} under {key!r}")


def _as_matrix(key: str, weight: Tensor) -> Tensor:
    """A 1x1 conv weight ``(out, in, 1, 1)`` as the ``(out, in)`` weight of our ``nn.Linear``."""
    return weight.reshape(weight.shape[0], -1)


def _as_conv(key: str, weight: Tensor) -> Tensor:
    """Our ``nn.Linear`` weight ``(out, in)`` as timm's 1x1 conv weight ``(out, in, 1, 1)``."""
    return weight.reshape(*weight.shape, 1, 1)


def _two_maps(caller: str, key: str, weight: Tensor) -> None:
    """The official code's spatial conv: over two maps only (it has no light variant)."""
    if weight.dim() < 3 or weight.shape[1] != 2:
        light = "; a light CBAM's conv over one map has no equivalent there" if weight.dim() >= 3 else ""
        raise ValueError(f"{caller}: {key} should be a (1, 2, k, k) conv weight over two pooled maps, got shape "
                         f"{tuple(weight.shape)}{light}")


def _timm_maps(caller: str, key: str, weight: Tensor) -> Tensor:
    """timm's spatial conv: over two maps (``CbamModule``, [mean, max]) or one (``LightCbamModule``,
    ``(mean + max) / 2``, what ``LightCBAM`` computes); the same weight in our layout either way."""
    if weight.dim() < 3 or weight.shape[1] not in (1, 2):
        raise ValueError(f"{caller}: {key} should be a (1, 2, k, k) conv weight over two pooled maps (CbamModule) "
                         f"or (1, 1, k, k) over one (LightCbamModule), got shape {tuple(weight.shape)}")
    return weight


def _timm_spatial(key: str, weight: Tensor) -> Tensor:
    return _timm_maps("from_timm", key, weight)


def _to_timm_spatial(key: str, weight: Tensor) -> Tensor:
    return _timm_maps("to_timm", key, weight)


def _official_spatial(key: str, weight: Tensor) -> Tensor:
    """The official ChannelPool stacks [max, mean]; ours stacks [mean, max]: swap the input channels."""
    _two_maps("from_official", key, weight)
    return weight.flip(1)


def _to_official_spatial(key: str, weight: Tensor) -> Tensor:
    """Ours [mean, max] -> the official ChannelPool's [max, mean] (the same swap)."""
    _two_maps("to_official", key, weight)
    return weight.flip(1)


_TIMM_RULES: dict[str, Rule] = {
    "channel.fc1.weight": ("channel_att.fc1.weight", _as_matrix),
    "channel.fc1.bias": ("channel_att.fc1.bias", None),
    "channel.fc2.weight": ("channel_att.fc2.weight", _as_matrix),
    "channel.fc2.bias": ("channel_att.fc2.bias", None),
    "spatial.conv.conv.weight": ("spatial_att.conv.weight", _timm_spatial),
    **{f"spatial.conv.bn.{name}": (f"spatial_att.bn.{name}", None) for name in _BN_KEYS},
}

_OFFICIAL_RULES: dict[str, Rule] = {
    "ChannelGate.mlp.1.weight": ("channel_att.fc1.weight", None),
    "ChannelGate.mlp.1.bias": ("channel_att.fc1.bias", None),
    "ChannelGate.mlp.3.weight": ("channel_att.fc2.weight", None),
    "ChannelGate.mlp.3.bias": ("channel_att.fc2.bias", None),
    "SpatialGate.spatial.conv.weight": ("spatial_att.conv.weight", _official_spatial),
    **{f"SpatialGate.spatial.bn.{name}": (f"spatial_att.bn.{name}", None) for name in _BN_KEYS},
}

_INVERSE = {_as_matrix: _as_conv, _timm_spatial: _to_timm_spatial, _official_spatial: _to_official_spatial}


def _inverted(rules: dict[str, Rule]) -> dict[str, Rule]:
    return {ours: (theirs, _INVERSE.get(transform)) for theirs, (ours, transform) in rules.items()}


_TO_TIMM_RULES, _TO_OFFICIAL_RULES = _inverted(_TIMM_RULES), _inverted(_OFFICIAL_RULES)
# What the target's CBAM always has (ours may lack it with other presets): key suffix -> what it is.
_TIMM_NEEDS = {"spatial_att.bn.weight": "a spatial BatchNorm (only a CBAM built with preset='timm' converts to it)"}
_OFFICIAL_NEEDS = {
    "channel_att.fc1.bias": "MLP biases (only a CBAM built with preset='official' converts to it)",
    "spatial_att.bn.weight": "a spatial BatchNorm (only a CBAM built with preset='official' converts to it)",
}

OURS_ANCHOR, TIMM_ANCHOR, OFFICIAL_ANCHOR = "channel_att.fc1.weight", "channel.fc1.weight", "ChannelGate.mlp.1.weight"


def split(key: str, suffix: str) -> str | None:
    """The prefix (``""`` or ending in ``"."``) if ``key`` is ``prefix + suffix``, else ``None``."""
    if key == suffix:
        return ""
    if key.endswith("." + suffix):
        return key[: -len(suffix)]
    return None


def attention_prefixes(keys, anchor: str) -> list[str]:
    """The prefix of every CBAM in ``keys`` whose first MLP weight is ``prefix + anchor``, in key order."""
    return [prefix for key in keys if (prefix := split(key, anchor)) is not None]


_STAGE_BLOCK = re.compile(r"layer[1-4]\.\d+\.$")


def is_resnet(keys) -> bool:
    """Whether ``keys`` are a whole ResNet's in torchvision's naming (timm's and ours share it)."""
    keys = set(keys)
    return "conv1.weight" in keys and "fc.weight" in keys and any(key.startswith("layer4.") for key in keys)


def _renamed(prefix: str, attention_name: str | None, caller: str) -> str:
    """``prefix`` (``"layer1.0.se."``) with its last name replaced by ``attention_name`` (``"layer1.0.cbam."``)."""
    if attention_name is None:
        return prefix
    if not prefix:
        raise ValueError(
            f"{caller}(attention_name={attention_name!r}) renames the attribute holding each CBAM, but this dict "
            "has a CBAM at its top level (keys without a prefix); leave attention_name=None for a single module"
        )
    parent, _, _ = prefix[:-1].rpartition(".")
    return f"{parent}.{attention_name}." if parent else f"{attention_name}."


def _check_attention_name(value, caller: str) -> None:
    if value is None or value == AUTO:
        return
    if not isinstance(value, str):
        raise TypeError(f"{caller}: attention_name must be None, 'auto' or a str, got {value!r} "
                        f"({type(value).__name__})")
    if not value.isidentifier():
        raise ValueError(f"{caller}: attention_name must be an attribute name such as 'cbam', got {value!r}")


def _resolve_name(state_dict: Mapping, prefixes: list[str], attention_name, theirs: str, ours: str) -> str | None:
    """``"auto"``: ``ours`` where a whole ResNet holds its CBAMs in its blocks as ``theirs``, else keep (``None``)."""
    if attention_name != AUTO:
        return attention_name
    in_blocks = prefixes and all(p.endswith(f".{theirs}.") and _STAGE_BLOCK.match(p[: -len(theirs) - 1])
                                 for p in prefixes)
    return ours if in_blocks and is_resnet(state_dict) else None


def _convert(
    state_dict: Mapping[str, Tensor], rules: dict[str, Rule], anchor: str, caller: str,
    attention_name: str | None = None, needs: Mapping[str, str] | None = None,
) -> OrderedDict:
    check_state_dict(state_dict, caller)
    _check_attention_name(attention_name, caller)
    prefixes = attention_prefixes(state_dict, anchor)
    for prefix in prefixes:
        for suffix, what in (needs or {}).items():
            if prefix + suffix not in state_dict:
                raise ValueError(f"{caller}: the target layout's CBAM has {what}; the CBAM at "
                                 f"{prefix[:-1] or 'the top'!r} has none (no {prefix + suffix!r})")
    renamed = {p: _renamed(p, attention_name, caller) for p in prefixes}
    converted = OrderedDict()
    for key, value in state_dict.items():
        for suffix, (new_suffix, transform) in rules.items():
            prefix = split(key, suffix)
            if prefix is not None and prefix in renamed:
                key, value = renamed[prefix] + new_suffix, transform(key, value) if transform else value
                break
        else:
            if needs is not None and any(key.startswith(p) for p in prefixes):
                raise ValueError(f"{caller}: {key!r} has no equivalent in the target's CBAM (it has the paper's "
                                 "MLP and one full spatial conv; build the model with default spatial_conv)")
        converted[key] = value
    return converted


def from_timm(state_dict: Mapping[str, Tensor], *, attention_name: str | None = AUTO) -> OrderedDict:
    """timm ``CbamModule``/``LightCbamModule`` keys (``channel.fc1/fc2`` 1x1 convs, ``spatial.conv.conv``/``.bn``)
    -> ours (for ``CBAM``/``LightCBAM`` with ``preset="timm"``).

    ``attention_name``: ``"auto"`` (default) renames timm's ``se`` slot to ``cbam`` in a whole timm
    ResNet's dict (``layer1.0.se.*`` -> ``layer1.0.cbam.*``, what ``cbam.models`` loads) and keeps
    other prefixes; a name renames the attribute holding each CBAM to it; ``None`` keeps every prefix.
    """
    check_state_dict(state_dict, "from_timm")
    prefixes = attention_prefixes(state_dict, TIMM_ANCHOR)
    name = _resolve_name(state_dict, prefixes, attention_name, "se", "cbam")
    return _convert(state_dict, _TIMM_RULES, TIMM_ANCHOR, "from_timm", name)


def from_official(state_dict: Mapping[str, Tensor]) -> OrderedDict:
    """Official-code keys (``ChannelGate.mlp.1/.3`` Linears, ``SpatialGate.spatial.conv``/``.bn``) -> ours."""
    return _convert(state_dict, _OFFICIAL_RULES, OFFICIAL_ANCHOR, "from_official")


def to_timm(state_dict: Mapping[str, Tensor], *, attention_name: str | None = AUTO) -> OrderedDict:
    """Our CBAM keys -> timm ``CbamModule``'s (``timm.create_model("resnet50", block_args={"attn_layer": "cbam"})``).

    The inverse of ``from_timm``: MLP weights ``(out, in)`` become 1x1 convs ``(out, in, 1, 1)``;
    ``"auto"`` renames ``cbam`` to timm's ``se`` slot in a whole ResNet's dict. Every CBAM needs the
    spatial BatchNorm timm has (``preset="timm"``); other spatial convs than the full one are refused.
    A ``LightCBAM``'s dict (a conv over one map) becomes ``LightCbamModule``'s (``attn_layer="lcbam"``); MLP
    biases (``mlp_bias=True``) become those of timm's ``CbamModule(mlp_bias=True)``, which timm's
    ``attn_layer="cbam"`` ResNets do not have.
    """
    check_state_dict(state_dict, "to_timm")
    prefixes = attention_prefixes(state_dict, OURS_ANCHOR)
    name = _resolve_name(state_dict, prefixes, attention_name, "cbam", "se")
    return _convert(state_dict, _TO_TIMM_RULES, OURS_ANCHOR, "to_timm", name, _TIMM_NEEDS)


def to_official(state_dict: Mapping[str, Tensor]) -> OrderedDict:
    """Our CBAM keys -> the official code's (``MODELS/cbam.py``), for its ``ResidualNet(..., 'CBAM')``.

    The inverse of ``from_official``: the spatial conv's input channels go back to [max, mean].
    Every CBAM needs MLP biases and the spatial BatchNorm (``preset="official"``).
    """
    return _convert(state_dict, _TO_OFFICIAL_RULES, OURS_ANCHOR, "to_official", None, _OFFICIAL_NEEDS)
