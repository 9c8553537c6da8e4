"""``load_image``: an image file as a normalised model input and as pixels to draw on."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..validation import check_int
from .extras import require

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_SIDE = 32  # pixels; below this an image holds too little to resize into a meaningful input


class LoadedImage(NamedTuple):
    """``batch: (1, 3, S, S)`` normalised model input; ``pixels: (3, S, S)`` in [0, 1], for figures."""

    batch: Tensor
    pixels: Tensor


def load_image(path, size: int = 224, *, mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD) -> LoadedImage:
    """Read ``path`` with Pillow as RGB, scale its shorter side to ``size`` and centre-crop ``size x size``.

    The image is turned as its EXIF orientation says (as viewers show it; phone photos are stored
    sideways); 16-bit grey (``I;16``, ``I``) is scaled to 8 bits (``convert`` would clip it at 255).
    ``batch = (pixels - mean) / std`` per channel (ImageNet statistics by default). Raises
    ``FileNotFoundError`` for a missing file, ``ValueError`` for a file Pillow cannot read or an
    image smaller than ``MIN_SIDE`` pixels on a side.
    """
    image_module = require("PIL.Image")
    image_ops = require("PIL.ImageOps")
    size = check_int("size", size, minimum=MIN_SIDE)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist or is not a file")
    try:
        with image_module.open(path) as opened:
            image = image_ops.exif_transpose(opened)
            if image.mode.startswith("I"):  # 16-bit values: 65535 -> 255
                image = image_module.fromarray((np.asarray(image, dtype=np.float64) / 257).clip(0, 255).round()
                                               .astype(np.uint8))
            image = image.convert("RGB")
    except (OSError, ValueError, image_module.DecompressionBombError) as error:
        raise ValueError(f"cannot read image {str(path)!r}: {error}") from None
    if min(image.size) < MIN_SIDE:
        width, height = image.size
        raise ValueError(f"image {str(path)!r} is {width}x{height} pixels; need at least {MIN_SIDE} on each side")
    image = image_ops.fit(image, (size, size), method=image_module.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.array(image, dtype=np.float32) / 255).permute(2, 0, 1).contiguous()
    batch = (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return LoadedImage(batch[None], pixels)
