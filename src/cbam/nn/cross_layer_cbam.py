"""``CrossLayerCBAM``: one CBAM per feature level, for pyramids such as torchvision's FPN outputs."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from ..validation import check_input, check_int
from .cbam import CBAM
from .gate_pair import AttentionMaps


class CrossLayerCBAM(nn.Module):
    """``CBAM(in_channels_list[i], **cbam_kwargs)`` applied to level ``i`` of a list of features.

    ``forward(list)`` returns a list; a mapping (e.g. the ``OrderedDict`` of torchvision's
    ``FeaturePyramidNetwork``) returns an ``OrderedDict`` with the same keys, in order. Level ``i``
    is ``(B, C_i, *spatial_i)``; each level keeps its shape.
    """

    def __init__(self, in_channels_list: Sequence[int], **cbam_kwargs) -> None:
        super().__init__()
        if isinstance(in_channels_list, str) or not isinstance(in_channels_list, Sequence) or not in_channels_list:
            raise TypeError(f"in_channels_list must be a non-empty sequence of ints, got {in_channels_list!r}")
        channels = [check_int(f"in_channels_list[{i}]", c) for i, c in enumerate(in_channels_list)]
        self.cbams = nn.ModuleList(CBAM(c, **cbam_kwargs) for c in channels)

    def _levels(self, features) -> tuple[list, list[Tensor]]:
        """Level names and tensors, after checking their count and each level's channels."""
        if isinstance(features, Mapping):
            names, tensors = list(features), list(features.values())
        elif isinstance(features, Sequence) and not isinstance(features, str):
            names, tensors = list(range(len(features))), list(features)
        else:
            kind = type(features).__name__
            raise TypeError(f"CrossLayerCBAM expects a list or a dict of feature tensors, got {kind}")
        if len(tensors) != len(self.cbams):
            raise ValueError(f"CrossLayerCBAM expects {len(self.cbams)} feature levels, got {len(tensors)}")
        for name, tensor, cbam in zip(names, tensors, self.cbams):
            channels, dims = cbam.channel_att.in_channels, cbam.channel_att.dims
            check_input(tensor, f"CrossLayerCBAM level {name!r}", dims=dims, channels=channels)
        return names, tensors

    def _pack(self, features, names: list, values: list):
        return OrderedDict(zip(names, values)) if isinstance(features, Mapping) else values

    def attention(self, features) -> list[AttentionMaps] | OrderedDict:
        """Each level's ``AttentionMaps``, packed like the input."""
        names, tensors = self._levels(features)
        return self._pack(features, names, [cbam.attention(t) for cbam, t in zip(self.cbams, tensors)])

    def forward(self, features):
        names, tensors = self._levels(features)
        return self._pack(features, names, [cbam(t) for cbam, t in zip(self.cbams, tensors)])
