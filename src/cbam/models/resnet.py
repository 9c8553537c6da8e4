"""ResNet-18/34/50/101/152 with CBAM in every residual block, under torchvision's state-dict keys.

Each block applies CBAM to its residual branch after the last BatchNorm and before the addition
(the paper's Fig. 3, as the official code and timm do), and holds it as ``block.cbam`` (the
official code's name). Every other key is torchvision's (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer2.0.downsample.0/.1``, ``fc``, ...), so with ``attention=None``
torchvision's ResNet weights load strictly and compute the same, and with ``attention="cbam"``
they load with only the ``*.cbam.*`` keys missing.

Stems: ``"imagenet"`` is the 7x7 stride-2 conv plus 3x3 stride-2 max-pool (input /4); ``"cifar"``
is a 3x3 stride-1 conv without max-pool, so 32x32 inputs end as 4x4 maps after ``layer4``. The
head is a global average pool, so any input size of at least 32x32 (``"imagenet"``) works.

Initialisation (``ResNet.reset_parameters``) follows the official code (Jongchan/attention-module,
``MODELS/model_resnet.py``): He-normal conv weights (fan_out), BatchNorm weight 1 and bias 0,
He-normal ``fc`` weight (fan_in) with zero bias, and the spatial gate's BatchNorm weight 0. That
last choice makes every spatial gate start as the constant ``sigmoid(0) = 0.5`` (BN bias 0), so
CBAM starts as "channel gate times one half" and the spatial gate grows from there (the BN weight
gets gradient at once). Presets without a spatial BatchNorm (``None``/``"paper"``) have nothing
to zero: their spatial conv starts He-normal like every conv. Two departures from the official
loop, which selects tensors by key-name substrings: it misses the ``downsample`` convs (left at
PyTorch's default there; He-normal here, as torchvision does) and the channel MLP's weights (left
at ``nn.Linear``'s default there; CBAM's own He-normal init here, biases zero in both).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

from torch import Tensor, nn

from ..hooks import watched
from ..nn import CBAM
from ..resnets import RESNET_BLOCKS, RESNETS
from ..validation import check_choice, check_int

Attention = Callable[..., nn.Module]

ATTENTIONS = ("cbam", None)
STEMS = ("imagenet", "cifar")


def _downsample(in_channels: int, out_channels: int, stride: int, factory: dict) -> nn.Sequential | None:
    """The projection shortcut (1x1 conv with ``stride`` + BN) when the block changes shape, else ``None``."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False, **factory),
        nn.BatchNorm2d(out_channels, **factory),
    )


def _block_sizes(in_channels: int, channels: int, stride: int) -> tuple[int, int, int]:
    """A block's sizes, checked."""
    return check_int("in_channels", in_channels), check_int("channels", channels), check_int("stride", stride)


class _ResidualBlock(nn.Module):
    """The tail both blocks share: ``relu(attention(norm(out)) + shortcut(x))``, ``norm`` the branch's last
    BatchNorm.

    Where the attention is a ``CBAM`` on its fused path and no hook watches it, it is one call,
    ``cbam(out, shortcut, input_norm=norm)``: CBAM's passes apply the BatchNorm as they read ``out``
    (training and inference), its output pass adds and rectifies, and in inference it writes over
    ``out`` (the last conv's output, which nothing else reads unless a hook on that conv kept it);
    hooks on ``block.cbam`` always see CBAM's own input and output.
    """

    def _residual(self, out: Tensor, conv: nn.Module, norm: nn.Module, x: Tensor) -> Tensor:
        shortcut = self._shortcut(x)
        if isinstance(self.cbam, CBAM) and not watched(self.cbam) and self.cbam.fuses(out, shortcut, norm):
            return self.cbam(out, shortcut, input_norm=norm, inplace=not watched(conv))
        out = norm(out)
        if self.cbam is not None:
            out = self.cbam(out)
        return self.relu(out + shortcut)

    def _shortcut(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(x)


class BasicBlock(_ResidualBlock):
    """Two 3x3 convs + attention + shortcut: ``(B, in_channels, H, W) -> (B, channels, H/stride, W/stride)``.

    ``attention(channels, device=, dtype=)`` (timm's ``attn_layer`` call, so ``cbam.CBAM`` itself fits)
    builds the module stored as ``self.cbam``; ``None`` gives a plain block.
    """

    expansion = 1

    def __init__(
        self, in_channels: int, channels: int, stride: int = 1, attention: Attention | None = None, *,
        device=None, dtype=None,
    ) -> None:
        super().__init__()
        in_channels, channels, stride = _block_sizes(in_channels, channels, stride)
        factory = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False, **factory)
        self.bn1 = nn.BatchNorm2d(channels, **factory)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False, **factory)
        self.bn2 = nn.BatchNorm2d(channels, **factory)
        self.cbam = attention(channels, **factory) if attention is not None else None
        self.downsample = _downsample(in_channels, channels, stride, factory)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self._residual(self.conv2(out), self.conv2, self.bn2, x)


class Bottleneck(_ResidualBlock):
    """1x1, 3x3 (stride here, as torchvision), 1x1 x4 convs + attention + shortcut.

    ``(B, in_channels, H, W) -> (B, 4 * channels, H/stride, W/stride)``; ``attention(4 * channels,
    device=, dtype=)`` builds ``self.cbam`` (``None``: a plain block).
    """

    expansion = 4

    def __init__(
        self, in_channels: int, channels: int, stride: int = 1, attention: Attention | None = None, *,
        device=None, dtype=None,
    ) -> None:
        super().__init__()
        in_channels, channels, stride = _block_sizes(in_channels, channels, stride)
        out_channels = channels * self.expansion
        factory = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False, **factory)
        self.bn1 = nn.BatchNorm2d(channels, **factory)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False, **factory)
        self.bn2 = nn.BatchNorm2d(channels, **factory)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False, **factory)
        self.bn3 = nn.BatchNorm2d(out_channels, **factory)
        self.relu = nn.ReLU(inplace=True)
        self.cbam = attention(out_channels, **factory) if attention is not None else None
        self.downsample = _downsample(in_channels, out_channels, stride, factory)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self._residual(self.conv3(out), self.conv3, self.bn3, x)


class ResNet(nn.Module):
    """A ResNet of ``block``s, ``layers[i]`` of them in stage ``i``: ``(B, 3, H, W) -> (B, num_classes)``.

    ``attention="cbam"`` puts ``CBAM(block_channels, preset=preset, **cbam_kwargs)`` in every block;
    ``None`` gives torchvision's plain ResNet (and then takes no CBAM options). ``stem`` is
    ``"imagenet"`` or ``"cifar"`` (see the module docstring); ``device``/``dtype`` reach every layer.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
        attention: str | None = "cbam",
        preset: str | None = None,
        stem: str = "imagenet",
        *,
        device=None,
        dtype=None,
        **cbam_kwargs,
    ) -> None:
        super().__init__()
        check_choice("block", block, (BasicBlock, Bottleneck))
        if isinstance(layers, str) or not isinstance(layers, Sequence) or len(layers) != 4:
            raise TypeError(f"layers must be a sequence of 4 block counts, got {layers!r}")
        layers = [check_int(f"layers[{i}]", n) for i, n in enumerate(layers)]
        num_classes = check_int("num_classes", num_classes)
        check_choice("attention", attention, ATTENTIONS)
        check_choice("stem", stem, STEMS)
        factory = {"device": device, "dtype": dtype}
        if attention is None and (preset is not None or cbam_kwargs):
            given = ["preset"] * (preset is not None) + sorted(cbam_kwargs)
            raise ValueError(f"attention=None builds a plain ResNet and takes no CBAM options; got {given}")
        make_attention = partial(CBAM, preset=preset, **cbam_kwargs) if attention else None

        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False, **factory)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False, **factory)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(64, **factory)
        self.relu = nn.ReLU(inplace=True)
        in_channels = 64
        for stage, (count, channels) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
            blocks = []
            for index in range(count):
                stride = 2 if stage > 1 and index == 0 else 1
                blocks.append(block(in_channels, channels, stride, make_attention, **factory))
                in_channels = channels * block.expansion
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official code's initialisation (see the module docstring)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()
        nn.init.kaiming_normal_(self.fc.weight, nonlinearity="relu")
        nn.init.zeros_(self.fc.bias)
        for module in self.modules():
            if isinstance(module, CBAM):
                module.reset_parameters()
                if module.spatial_att.bn is not None:
                    nn.init.zeros_(module.spatial_att.bn.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def _resnet(name: str, num_classes, attention, preset, stem, cbam_kwargs: dict) -> ResNet:
    kind, layers = RESNET_BLOCKS[name]
    block = BasicBlock if kind == "basic" else Bottleneck
    return ResNet(block, layers, num_classes, attention, preset, stem, **cbam_kwargs)


def build_model(name: str, num_classes: int = 1000, *, attention: str | None = "cbam", preset: str | None = None,
                stem: str = "imagenet") -> ResNet:
    """The ResNet that builder ``name`` (one of ``cbam.resnets.RESNETS``) makes; ``attention`` also takes
    ``"none"`` for ``None``, as the CLI and ``cbam train`` checkpoints spell it."""
    check_choice("model", name, RESNETS)
    return _resnet(name, num_classes, None if attention == "none" else attention, preset, stem, {})


def resnet18(num_classes=1000, attention="cbam", preset=None, stem="imagenet", **cbam_kwargs) -> ResNet:
    """ResNet-18: BasicBlocks 2-2-2-2, 8 CBAMs. Arguments as ``ResNet`` (``attention=None``: torchvision's)."""
    return _resnet("resnet18", num_classes, attention, preset, stem, cbam_kwargs)


def resnet34(num_classes=1000, attention="cbam", preset=None, stem="imagenet", **cbam_kwargs) -> ResNet:
    """ResNet-34: BasicBlocks 3-4-6-3, 16 CBAMs. Arguments as ``ResNet`` (``attention=None``: torchvision's)."""
    return _resnet("resnet34", num_classes, attention, preset, stem, cbam_kwargs)


def resnet50(num_classes=1000, attention="cbam", preset=None, stem="imagenet", **cbam_kwargs) -> ResNet:
    """ResNet-50: Bottlenecks 3-4-6-3, 16 CBAMs. Arguments as ``ResNet`` (``attention=None``: torchvision's)."""
    return _resnet("resnet50", num_classes, attention, preset, stem, cbam_kwargs)


def resnet101(num_classes=1000, attention="cbam", preset=None, stem="imagenet", **cbam_kwargs) -> ResNet:
    """ResNet-101: Bottlenecks 3-4-23-3, 33 CBAMs. Arguments as ``ResNet`` (``attention=None``: torchvision's)."""
    return _resnet("resnet101", num_classes, attention, preset, stem, cbam_kwargs)


def resnet152(num_classes=1000, attention="cbam", preset=None, stem="imagenet", **cbam_kwargs) -> ResNet:
    """ResNet-152: Bottlenecks 3-8-36-3, 50 CBAMs. Arguments as ``ResNet`` (``attention=None``: torchvision's)."""
    return _resnet("resnet152", num_classes, attention, preset, stem, cbam_kwargs)
