"""The one table of the ResNet family: builder name -> block kind and blocks per stage.

Read by ``cbam.models`` (the builders), ``cbam.convert`` (naming a checkpoint's network from its
keys) and the CLI (``--model`` choices). No torch import: the CLI's parsers read it cheaply.
"""

from __future__ import annotations

RESNET_BLOCKS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
RESNETS = tuple(RESNET_BLOCKS)  # the builder names, shallow to deep


def depth(name: str) -> int:
    """``"resnet50"`` -> ``50``."""
    return int(name.removeprefix("resnet"))
