"""Checkpoints as other people's code writes them, built here for the loader's tests.

- ``official_resnet``: the official code's ``ResidualNet('ImageNet', 50, 10, 'CBAM')`` key layout
  (Jongchan/attention-module, ``MODELS/model_resnet.py``: torchvision's block and stem names, a
  ``cbam`` attribute per block holding ``ChannelGate.mlp`` (Flatten, Linear, ReLU, Linear) and
  ``SpatialGate.spatial.conv``/``.bn``), computed with the official math (``test_convert.official_cbam``:
  [max, mean] spatial pooling, BN momentum 0.01) in a forward hook on the block's last BatchNorm,
  where the official block calls ``self.cbam(out)``; saved as ``train_imagenet.py`` saves it.
- ``timm_resnet``: ``timm.create_model("resnet50", block_args={"attn_layer": "cbam"})`` (timm's
  ``attn_layer="cbam"``), saved as timm's ``train.py`` saves it, with an EMA copy and a
  ``torch.compile`` prefix.
- ``torchvision_resnet``: a plain torchvision ResNet.

ResNet-50 by default, as the issue's users have them; ResNet-18 (the official code builds it too)
where a test runs whole commands, to keep the suite fast.

Every model is in eval mode with random attention weights and BatchNorm statistics, so that a
wrong key, transpose or channel order changes the logits.
"""

from __future__ import annotations

import argparse
import copy

import timm
import torch
import torchvision
from torch import nn

from test_convert import _OfficialCBAM, official_cbam

NUM_CLASSES = 10
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def perturb(model: nn.Module, seed: int, *, attention_only_params: str | None = None) -> nn.Module:
    """Random BatchNorm statistics and affine terms everywhere; random parameters in modules whose
    name contains ``attention_only_params`` (the attention), with moderate scales so logits stay finite."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                module.num_batches_tracked.fill_(seed + 3)
            elif attention_only_params and attention_only_params in name and isinstance(module, (nn.Linear,
                                                                                                   nn.Conv2d)):
                for param in module.parameters(recurse=False):
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return model.eval()


class OfficialCBAM(_OfficialCBAM):
    """The official CBAM's parameters, computing the official forward (eval mode, avg + max pools)."""

    def forward(self, x):
        return official_cbam(self.state_dict(), x, ("avg", "max"), training=False)[0]


def official_resnet(depth: int = 50, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = getattr(torchvision.models, f"resnet{depth}")(num_classes=NUM_CLASSES)
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            last_norm = block.bn3 if hasattr(block, "bn3") else block.bn2
            block.cbam = OfficialCBAM(last_norm.num_features, 16)
            last_norm.register_forward_hook(lambda module, inputs, out, cbam=block.cbam: cbam(out))
    return perturb(model, seed, attention_only_params="cbam")


def official_checkpoint(model: nn.Module) -> dict:
    """What ``train_imagenet.py``'s ``save_checkpoint`` writes (``.pth.tar``)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return {"epoch": 90, "arch": "resnet", "state_dict": nn.DataParallel(model).state_dict(), "best_prec1": 77.3,
            "optimizer": optimizer.state_dict()}


def timm_resnet(depth: int = 50, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(f"resnet{depth}", block_args={"attn_layer": "cbam"}, num_classes=NUM_CLASSES)
    return perturb(model, seed, attention_only_params=".se.")


def timm_checkpoint(model: nn.Module, ema: nn.Module) -> dict:
    """timm ``train.py``'s checkpoint, the model compiled (``_orig_mod.`` keys), with an EMA entry and the run's
    arguments (an ``argparse.Namespace``, as timm's ``CheckpointSaver`` stores them)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    args = argparse.Namespace(model="resnet50", lr=0.1, epochs=3, amp=True, mean=(0.485, 0.456, 0.406))
    return {"epoch": 3, "arch": "resnet50", "state_dict": torch.compile(model).state_dict(),
            "state_dict_ema": ema.state_dict(), "optimizer": optimizer.state_dict(), "version": 2, "metric": 0.5,
            "args": args}


def timm_ema(model: nn.Module) -> nn.Module:
    """A copy with other weights, standing in for timm's ModelEmaV3."""
    ema = copy.deepcopy(model)
    return perturb(ema, 99, attention_only_params=".se.")


def torchvision_resnet(depth: int = 50, num_classes: int = NUM_CLASSES, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return perturb(getattr(torchvision.models, f"resnet{depth}")(num_classes=num_classes), seed)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


_EXPECTED: dict[int, tuple[nn.Module, torch.Tensor]] = {}


def source_logits(model: nn.Module) -> torch.Tensor:
    """``logits(model)``, computed once per source model (sources are not modified)."""
    if id(model) not in _EXPECTED or _EXPECTED[id(model)][0] is not model:
        _EXPECTED[id(model)] = (model, logits(model))
    return _EXPECTED[id(model)][1]


def assert_same_logits(ours: nn.Module, theirs: nn.Module) -> None:
    expected = source_logits(theirs)
    torch.testing.assert_close(logits(ours), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


_SHARED: dict = {}


class Sources:
    """The source models and their files in ``folder``: official .pth.tar, timm .pth.tar, torchvision .pth.

    ``Sources.shared(tmp_path_factory)``: one set for the whole session (building and saving three
    ResNet-50s is most of these tests' time); tests must not modify the models or files.
    """

    @classmethod
    def shared(cls, tmp_path_factory, depth: int = 50) -> Sources:
        if depth not in _SHARED:
            _SHARED[depth] = cls(tmp_path_factory.mktemp(f"sources{depth}"), depth)
        return _SHARED[depth]

    def __init__(self, folder, depth: int = 50) -> None:
        self.depth = depth
        self.official = official_resnet(depth)
        self.timm, self.torchvision = timm_resnet(depth), torchvision_resnet(depth)
        self.timm_ema = timm_ema(self.timm)
        self.official_path = folder / f"official_cbam_resnet{depth}.pth.tar"
        self.timm_path = folder / f"timm_resnet{depth}_cbam.pth.tar"
        self.torchvision_path = folder / f"torchvision_resnet{depth}.pth"
        torch.save(official_checkpoint(self.official), self.official_path)
        torch.save(timm_checkpoint(self.timm, self.timm_ema), self.timm_path)
        torch.save(self.torchvision.state_dict(), self.torchvision_path)
