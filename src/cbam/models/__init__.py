"""Models with CBAM: the ResNet family under torchvision's state-dict keys, and CBAM surgery on yours."""

from ..resnets import RESNETS
from .resnet import BasicBlock, Bottleneck, ResNet, build_model, resnet18, resnet34, resnet50, resnet101, resnet152
from .surgery import add_cbam, remove_cbam

__all__ = [
    "RESNETS", "BasicBlock", "Bottleneck", "ResNet", "add_cbam", "build_model", "remove_cbam", "resnet18", "resnet34",
    "resnet50", "resnet101", "resnet152",
]
