"""``load_split``: a ``--data`` spec's training or test split as a dataset of normalised images.

Specs: ``synthetic`` or ``synthetic:TRAIN,TEST`` (image counts; ``cbam.train.synthetic``, 64x64, boxes
known), ``cifar10:PATH`` (the python batches in a local folder, ``cbam.train.cifar``, 32x32),
``imagefolder:PATH`` (``PATH/train/CLASS/*`` and ``PATH/val/CLASS/*`` (or ``test``) read by torchvision's
``ImageFolder``, shorter side resized to ``image_size`` and centre-cropped). No augmentation: every
epoch sees the same pixels, which keeps runs exactly reproducible.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..validation import check_int
from .cifar import CLASSES as CIFAR_CLASSES
from .cifar import read_cifar10
from .synthetic import SHAPES, make_synthetic

KINDS = ("synthetic", "cifar10", "imagefolder")
SYNTHETIC_SIZES = (4000, 1000)  # training and test images of a bare ``synthetic``
SYNTHETIC_SEEDS = (0, 1)  # the data is fixed; --seed varies the model and the order only
SYNTHETIC_MEAN, SYNTHETIC_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Split(NamedTuple):
    """A dataset of ``(x: (3, H, W) float32 normalised, label: int)``, its class names, and the
    object boxes ``(N, 4)`` ``(x0, y0, x1, y1)`` in pixels where known (``synthetic``), else ``None``."""

    dataset: Dataset
    classes: tuple[str, ...]
    boxes: Tensor | None
    image_size: int


class TensorImages(Dataset):
    """``pixels: (N, 3, H, W)`` uint8 and ``labels: (N,)``, served as ``((pixels / 255 - mean) / std, label)``."""

    def __init__(self, pixels: Tensor, labels: Tensor, mean, std) -> None:
        self.pixels, self.labels = pixels, labels
        self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return (self.pixels[index].float() / 255 - self.mean) / self.std, int(self.labels[index])


@lru_cache(maxsize=4)
def _synthetic(count: int, seed: int):
    """``make_synthetic``, remembered: a demo trains two models on the same images."""
    return make_synthetic(count, seed)


def parse_spec(spec: str) -> tuple[str, str]:
    """``"cifar10:/data/c10"`` -> ``("cifar10", "/data/c10")``; ``ValueError`` naming the accepted forms."""
    kind, _, argument = str(spec).partition(":")
    if kind not in KINDS or (kind != "synthetic" and not argument):
        raise ValueError(f"--data must be synthetic, synthetic:TRAIN,TEST, cifar10:PATH or imagefolder:PATH; "
                         f"got {spec!r}")
    return kind, argument


def _synthetic_sizes(argument: str) -> tuple[int, int]:
    if not argument:
        return SYNTHETIC_SIZES
    try:
        sizes = tuple(check_int("size", int(part)) for part in argument.split(","))
    except (ValueError, TypeError):
        sizes = ()
    if len(sizes) != 2:
        raise ValueError(f"--data synthetic:TRAIN,TEST expects two positive image counts, got {argument!r}")
    return sizes


def _image_folder(root: Path, train: bool, image_size: int) -> tuple[Dataset, tuple[str, ...]]:
    try:
        from torchvision import datasets, transforms
    except ImportError:
        raise ImportError("imagefolder data needs torchvision: pip install torchvision") from None
    names = ("train",) if train else ("val", "test")
    folder = next((root / name for name in names if (root / name).is_dir()), None)
    if folder is None:
        raise FileNotFoundError(f"imagefolder:{root}: expected a {' or '.join(names)} folder of class folders in it")
    transform = transforms.Compose([
        transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    dataset = datasets.ImageFolder(folder, transform=transform)
    return dataset, tuple(dataset.classes)


def load_split(spec: str, train: bool, *, image_size: int = 64) -> Split:
    """The training (``train=True``) or test split of ``spec`` (see the module docstring).

    ``image_size`` applies to ``imagefolder`` only; the others have their fixed size.
    """
    kind, argument = parse_spec(spec)
    if kind == "synthetic":
        count = _synthetic_sizes(argument)[0 if train else 1]
        images = _synthetic(count, SYNTHETIC_SEEDS[0 if train else 1])
        dataset = TensorImages(images.pixels, images.labels, SYNTHETIC_MEAN, SYNTHETIC_STD)
        return Split(dataset, SHAPES, images.boxes, images.pixels.shape[-1])
    root = Path(argument)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {spec}: {argument!r} is not a folder")
    if kind == "cifar10":
        pixels, labels = read_cifar10(root, train)
        return Split(TensorImages(pixels, labels, CIFAR_MEAN, CIFAR_STD), CIFAR_CLASSES, None, 32)
    image_size = check_int("image_size", image_size, minimum=32)
    dataset, classes = _image_folder(root, train, image_size)
    return Split(dataset, classes, None, image_size)
