"""Models with CBAM: the ResNet family under torchvision's state-dict keys, and CBAM surgery on yours."""

from .resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50, resnet101, resnet152
from .surgery import add_cbam

__all__ = [
    "BasicBlock", "Bottleneck", "ResNet", "add_cbam", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
]
