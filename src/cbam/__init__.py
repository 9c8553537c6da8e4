"""cbam: the Convolutional Block Attention Module (Woo et al., ECCV 2018) for PyTorch.

>>> import torch, cbam
>>> cbam.CBAM(64)(torch.randn(2, 64, 32, 32)).shape
torch.Size([2, 64, 32, 32])
"""

from . import convert, functional, models, presets
from .models import add_cbam, remove_cbam
from .nn import (
    CBAM,
    AttentionMaps,
    ChannelAttention,
    CrossLayerCBAM,
    DynamicCBAM,
    LightCBAM,
    ParallelCBAM,
    SpatialAttention,
)

__version__ = "0.1.0"

_TOOLS = ("debug", "profile", "viz")  # imported on first use: `import cbam` stays light


def __getattr__(name: str):
    if name in _TOOLS:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'cbam' has no attribute {name!r}")

__all__ = [
    "CBAM", "AttentionMaps", "ChannelAttention", "CrossLayerCBAM", "DynamicCBAM", "LightCBAM", "ParallelCBAM",
    "SpatialAttention", "add_cbam", "convert", "functional", "models", "presets", "remove_cbam",
]
