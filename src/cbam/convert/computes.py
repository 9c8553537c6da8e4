"""Whether a model's CBAMs compute what the CBAMs of timm's or the official checkpoint computed.

A state dict holds weights, not options: timm's and the official weights load into a ``CBAM`` with
hard-sigmoid gates, the spatial gate first or lp pooling as strictly as into the matching one, and
that model then computes something else. Those two code bases have one form each, so what their
weights were trained in is known:

- the official ``CBAM`` and timm's ``CbamModule``: the channel gate first, one MLP over avg- and
  max-pooled descriptors summed, a full k x k conv over two maps (channel mean and max) with a
  BatchNorm, sigmoid gates;
- timm's ``LightCbamModule``: the same, with one descriptor ``(avg + max) / 2`` for each gate
  (``pool_types=("mix",)``, ``spatial_pool="mix"``; one map, so its conv weight says which it is).

Checkpoints in our layout and plain ResNets carry no such promise and are not checked.
"""

from __future__ import annotations

from torch import nn

SOURCES = {"official": "the official CBAM code", "timm": "timm's CbamModule/LightCbamModule"}
_POOLS = {"concat": {"avg", "max"}, "mix": {"mix"}}  # the spatial pooling -> the channel pooling it comes with
_POOLING = {"official": "avg+max pooling", "timm": "avg+max pooling (or, in LightCbamModule, their mix)"}
_ADVICE = {"official": "preset='official' and no other option",
           "timm": "preset='timm' and no other option (for LightCbamModule: pool_types=('mix',) and "
                   "spatial_pool='mix', as LightCBAM has)"}


def _differences(module, source: str) -> list[str]:
    """How ``module`` (a ``GatePair``: a CBAM or a variant) computes otherwise than ``source``'s with its weights."""
    from ..nn import CBAM

    if not isinstance(module, CBAM):
        return [f"gates in a {type(module).__name__}, not a CBAM"]
    channel, spatial = module.channel_att, module.spatial_att
    found = []
    if module.order != "channel-spatial":
        found.append(f"order={module.order!r}")
    for name, gate in (("channel", channel.gate), ("spatial", spatial.gate)):
        if gate != "sigmoid":
            found.append(f"a {gate} {name} gate")
    allowed_pools = {"concat"} if source == "official" else set(_POOLS)
    if spatial.pool not in allowed_pools:
        found.append(f"spatial_pool={spatial.pool!r}")
    elif set(channel.pool_types) != _POOLS[spatial.pool] or len(channel.pool_types) != len(_POOLS[spatial.pool]):
        found.append(f"pool_types={tuple(channel.pool_types)!r} with spatial_pool={spatial.pool!r}")
    if spatial.conv_kind != "full":
        found.append(f"spatial_conv={spatial.conv_kind!r}")
    return found


def check_computes_as(model: nn.Module, source: str, source_name: str) -> None:
    """``ValueError`` where a CBAM in ``model`` computes otherwise than the CBAMs of ``source`` (``"official"``
    or ``"timm"``; other layouts pass) with the same weights: the first such module and how it differs."""
    if source not in SOURCES:
        return
    from ..nn.gate_pair import GatePair

    for name, module in model.named_modules():
        if isinstance(module, GatePair) and (found := _differences(module, source)):
            raise ValueError(
                f"{source_name} holds weights of {SOURCES[source]}, which computes with sigmoid gates, the channel "
                f"gate first, {_POOLING[source]} and a full conv; {name or 'the model'} computes with "
                f"{', '.join(found)}: build it with {_ADVICE[source]}, or convert with cbam.convert.from_{source} "
                "and load_state_dict to take the weights anyway")
