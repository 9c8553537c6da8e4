"""State-dict converters from other CBAM implementations to ``cbam.CBAM``'s keys.

Both work on a single module's dict or a whole model's: every CBAM found under any prefix is
renamed in place of its keys (``layer1.0.cbam.ChannelGate.mlp.1.weight`` ->
``layer1.0.cbam.channel_att.fc1.weight``), every other key passes through unchanged, order kept.
A CBAM is recognised by its first MLP weight; the input dict is never modified.
``from_timm(sd, attention_name="cbam")`` also renames the attribute holding each CBAM (timm's
ResNet blocks call it ``se``, ``cbam.models`` calls it ``cbam``): ``layer1.0.se.`` -> ``layer1.0.cbam.``.

Load the result into ``CBAM(C, preset="official")`` or ``CBAM(C, preset="timm")`` respectively.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping

from torch import Tensor

_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

Rule = tuple[str, Callable[[str, Tensor], Tensor] | None]


def _as_matrix(key: str, weight: Tensor) -> Tensor:
    """A 1x1 conv weight ``(out, in, 1, 1)`` as the ``(out, in)`` weight of our ``nn.Linear``."""
    return weight.reshape(weight.shape[0], -1)


def _timm_spatial(key: str, weight: Tensor) -> Tensor:
    if weight.dim() < 3 or weight.shape[1] != 2:
        raise ValueError(
            f"from_timm: {key} should be a (1, 2, k, k) conv weight over [mean, max] maps, got shape "
            f"{tuple(weight.shape)}; timm's LightCbamModule (one summed map) has no CBAM equivalent"
        )
    return weight


def _official_spatial(key: str, weight: Tensor) -> Tensor:
    """The official ChannelPool stacks [max, mean]; ours stacks [mean, max]: swap the input channels."""
    if weight.dim() < 3 or weight.shape[1] != 2:
        raise ValueError(f"from_official: {key} should be a (1, 2, k, k) conv weight, got shape {tuple(weight.shape)}")
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


def _split(key: str, suffix: str) -> str | None:
    """The prefix (``""`` or ending in ``"."``) if ``key`` is ``prefix + suffix``, else ``None``."""
    if key == suffix:
        return ""
    if key.endswith("." + suffix):
        return key[: -len(suffix)]
    return None


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
    if value is None:
        return
    if not isinstance(value, str):
        raise TypeError(f"{caller}: attention_name must be None or a str, got {value!r} ({type(value).__name__})")
    if not value.isidentifier():
        raise ValueError(f"{caller}: attention_name must be an attribute name such as 'cbam', got {value!r}")


def _convert(
    state_dict: Mapping[str, Tensor], rules: dict[str, Rule], anchor: str, caller: str,
    attention_name: str | None = None,
) -> OrderedDict:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{caller} expects a state dict (a mapping of str to Tensor), got {type(state_dict).__name__}")
    _check_attention_name(attention_name, caller)
    prefixes = {p: _renamed(p, attention_name, caller) for key in state_dict if (p := _split(key, anchor)) is not None}
    converted = OrderedDict()
    for key, value in state_dict.items():
        for suffix, (new_suffix, transform) in rules.items():
            prefix = _split(key, suffix)
            if prefix is not None and prefix in prefixes:
                key, value = prefixes[prefix] + new_suffix, transform(key, value) if transform else value
                break
        converted[key] = value
    return converted


def from_timm(state_dict: Mapping[str, Tensor], *, attention_name: str | None = None) -> OrderedDict:
    """timm ``CbamModule`` keys (``channel.fc1/fc2`` 1x1 convs, ``spatial.conv.conv``/``.bn``) -> ours.

    ``attention_name``: if given, the attribute holding each CBAM is renamed to it (``"cbam"`` turns a
    timm ResNet's ``layer1.0.se.*`` into ``layer1.0.cbam.*`` for ``cbam.models``); ``None`` keeps prefixes.
    """
    return _convert(state_dict, _TIMM_RULES, "channel.fc1.weight", "from_timm", attention_name)


def from_official(state_dict: Mapping[str, Tensor]) -> OrderedDict:
    """Official-code keys (``ChannelGate.mlp.1/.3`` Linears, ``SpatialGate.spatial.conv``/``.bn``) -> ours."""
    return _convert(state_dict, _OFFICIAL_RULES, "ChannelGate.mlp.1.weight", "from_official")
