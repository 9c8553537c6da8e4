"""Which layout a state dict is in: ours, the official code's, timm's, or a plain network; and which ResNet.

The CBAMs say it by their first MLP weight (``channel_att.fc1.weight``, ``ChannelGate.mlp.1.weight``,
timm's ``channel.fc1.weight``); a dict with none of them is ``plain`` (torchvision's ResNet and timm's
without ``attn_layer`` share one naming with ``cbam.models``). The depth comes from the blocks per
stage and whether they are bottlenecks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

from ..resnets import RESNET_BLOCKS, depth
from .rules import OFFICIAL_ANCHOR, OURS_ANCHOR, TIMM_ANCHOR, attention_prefixes, is_resnet

LAYOUTS = {  # name -> (anchor, how a report names it)
    "cbam": (OURS_ANCHOR, "cbam's layout (channel_att/spatial_att)"),
    "official": (OFFICIAL_ANCHOR, "the official CBAM code's layout (ChannelGate/SpatialGate)"),
    "timm": (TIMM_ANCHOR, "timm's layout (CbamModule/LightCbamModule)"),
}
PLAIN = "plain"
_DEPTHS = {(kind == "bottleneck", blocks): depth(name) for name, (kind, blocks) in RESNET_BLOCKS.items()}
_BLOCK = re.compile(r"layer([1-4])\.(\d+)\.")


class Layout(NamedTuple):
    """``name``: ``"cbam"``, ``"official"``, ``"timm"`` or ``"plain"``; ``prefixes``: where its CBAMs are
    (``"layer1.0.cbam."``); ``network``: ``"ResNet-50"``, ``"ResNet (blocks 1, 1, 1, 1)"`` or ``None``."""

    name: str
    prefixes: tuple[str, ...]
    network: str | None

    def __str__(self) -> str:
        network = f"a {self.network}" if self.network else "a network"
        if self.name == PLAIN:
            return f"{network} without attention" + (" (torchvision/timm keys)" if self.network else "")
        count = len(self.prefixes)
        return f"{network} in {LAYOUTS[self.name][1]} with {count} CBAM{'s' * (count != 1)}"


def resnet_name(keys: Iterable[str]) -> str | None:
    """``"ResNet-50"`` for a standard ResNet's keys, ``"ResNet (blocks 2, 1, 1, 1)"`` for another, else ``None``."""
    keys = list(keys)
    if not is_resnet(keys):
        return None
    blocks = [0, 0, 0, 0]
    for key in keys:
        if match := _BLOCK.match(key):
            stage, index = int(match[1]) - 1, int(match[2])
            blocks[stage] = max(blocks[stage], index + 1)
    depth = _DEPTHS.get(("layer1.0.conv3.weight" in keys, tuple(blocks)))
    return f"ResNet-{depth}" if depth else f"ResNet (blocks {', '.join(map(str, blocks))})"


def detect(keys: Iterable[str]) -> Layout:
    """The layout of a state dict's keys; ``ValueError`` where CBAMs of two layouts are mixed."""
    keys = list(keys)
    for key in keys:
        if not isinstance(key, str):
            raise TypeError(f"detect expects a state dict's str keys, got the key {key!r} ({type(key).__name__})")
    found = {name: tuple(attention_prefixes(keys, anchor)) for name, (anchor, _) in LAYOUTS.items()}
    found = {name: prefixes for name, prefixes in found.items() if prefixes}
    if len(found) > 1:
        names = " and ".join(f"{name} (at {prefixes[0][:-1] or 'the top'!r})" for name, prefixes in found.items())
        raise ValueError(f"the state dict mixes CBAM layouts: {names}; expected one")
    name, prefixes = next(iter(found.items()), (PLAIN, ()))
    return Layout(name, prefixes, resnet_name(keys))
