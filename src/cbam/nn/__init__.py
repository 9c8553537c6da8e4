"""CBAM modules: parameters, argument checks, and the seam (``impl=``) where implementations plug in."""

from .cbam import CBAM, AttentionMaps
from .channel_attention import ChannelAttention
from .spatial_attention import SpatialAttention

__all__ = ["CBAM", "AttentionMaps", "ChannelAttention", "SpatialAttention"]
