"""``read_cifar10``: the CIFAR-10 python batches from a local folder, unpickled without running code.

The official ``cifar-10-python.tar.gz`` unpacks to ``cifar-10-batches-py/`` holding ``data_batch_1``
to ``data_batch_5``, ``test_batch`` and ``batches.meta``: pickles of dicts with ``data`` (N, 3072)
uint8 rows (R, G, B planes of 32x32) and ``labels``. torchvision's reader unpickles them with
``pickle.load`` (a crafted file runs code) and insists on the official checksums; this one lets the
unpickler build only dicts, lists, strings, numbers and numpy arrays, and accepts any number of rows.
Nothing is ever downloaded.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_ALLOWED = {  # what numpy arrays pickle to (numpy 1 and 2 module names)
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 hold bytes; no side effects
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: only plain data and numpy arrays")
        return super().find_class(module, name)


def _batch_folder(root: Path) -> Path:
    """``root`` itself or its ``cifar-10-batches-py`` child, whichever holds ``test_batch``."""
    for folder in (root, root / "cifar-10-batches-py"):
        if (folder / "test_batch").is_file():
            return folder
    raise FileNotFoundError(f"cifar10:{root}: no CIFAR-10 python batches there (expected test_batch and "
                            f"data_batch_1..5 in it or in its cifar-10-batches-py folder)")


def _read_batch(path: Path) -> tuple[np.ndarray, list]:
    try:
        with open(path, "rb") as file:
            batch = _ArrayUnpickler(file, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"cannot read CIFAR-10 batch {str(path)!r}: {error}") from None
    batch = {key.decode() if isinstance(key, bytes) else key: value for key, value in dict(batch).items()} \
        if isinstance(batch, dict) else {}
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
            or not isinstance(labels, list) or len(labels) != len(data):
        raise ValueError(f"CIFAR-10 batch {str(path)!r} must hold 'data', uint8 rows of 3072 values, and one "
                         f"label per row under 'labels'")
    return data, labels


def read_cifar10(root, train: bool) -> tuple[Tensor, Tensor]:
    """The training (``data_batch_*``) or test split under ``root``: ``pixels (N, 3, 32, 32)`` uint8, ``labels (N,)``.

    Missing training batches are skipped (at least one must exist, and one image); labels must lie in 0..9.
    """
    folder = _batch_folder(Path(root))
    paths = [folder / name for name in (TRAIN_FILES if train else TEST_FILES) if (folder / name).is_file()]
    if not paths:
        raise FileNotFoundError(f"cifar10:{root}: no training batches (data_batch_1..5) in {str(folder)!r}")
    batches = [_read_batch(path) for path in paths]
    pixels = torch.from_numpy(np.concatenate([data for data, _ in batches])).reshape(-1, 3, 32, 32)
    labels = torch.tensor([label for _, batch_labels in batches for label in batch_labels], dtype=torch.int64)
    if not len(labels):
        raise ValueError(f"cifar10:{root}: the {'training' if train else 'test'} batches hold no images")
    if labels.min() < 0 or labels.max() >= len(CLASSES):
        raise ValueError(f"cifar10:{root}: labels must lie in 0..9, got {labels.min()}..{labels.max()}")
    return pixels, labels
