"""CBAM modules: parameters, argument checks, and the seam (``impl=``) where implementations plug in."""

from .cbam import CBAM
from .channel_attention import ChannelAttention
from .cross_layer_cbam import CrossLayerCBAM
from .dynamic_cbam import DynamicCBAM
from .gate_pair import AttentionMaps
from .light_cbam import LightCBAM
from .parallel_cbam import ParallelCBAM
from .spatial_attention import SpatialAttention

__all__ = [
    "CBAM", "AttentionMaps", "ChannelAttention", "CrossLayerCBAM", "DynamicCBAM", "LightCBAM", "ParallelCBAM",
    "SpatialAttention",
]
