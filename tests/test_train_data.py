"""Datasets: the synthetic generator, CIFAR-10 python batches (read without running code), ImageFolder."""

import pathlib
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from cbam.train import SHAPES, load_split, make_synthetic
from cbam.train.synthetic import SIDE, shape_mask

torch.set_num_threads(2)


def test_synthetic_is_deterministic_and_seeded():
    a, b, c = make_synthetic(6, 0), make_synthetic(6, 0), make_synthetic(6, 1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.pixels, c.pixels)
    assert a.pixels.shape == (6, 3, SIDE, SIDE) and a.pixels.dtype == torch.uint8
    assert torch.equal(make_synthetic(3, 0).labels, a.labels[:3])  # labels are drawn first: a prefix


def test_synthetic_labels_and_boxes():
    images = make_synthetic(200, 5)
    counts = torch.bincount(images.labels, minlength=len(SHAPES))
    assert len(SHAPES) == 10 and counts.min() >= 8  # every class, roughly uniform (expected 20 each)
    x0, y0, x1, y1 = images.boxes.unbind(1)
    assert ((0 <= x0) & (x0 < x1) & (x1 <= SIDE) & (0 <= y0) & (y0 < y1) & (y1 <= SIDE)).all()
    sides = torch.maximum(x1 - x0, y1 - y0)
    assert sides.min() >= 10 and sides.max() <= 34  # objects are drawn in 18..34-pixel squares


def test_boxes_are_the_objects_tight_boxes():
    """The object is drawn last, opaque, in one colour: the pixels of the box's most common colour are the
    object, and their bounding box (found here from the pixels alone) is the box."""
    images = make_synthetic(20, 3)
    for pixels, box in zip(images.pixels, images.boxes.tolist()):
        x0, y0, x1, y1 = box
        colours, counts = torch.unique(pixels[:, y0:y1, x0:x1].reshape(3, -1).T, dim=0, return_counts=True)
        colour = colours[counts.argmax()]
        assert counts.max() >= 0.15 * (x1 - x0) * (y1 - y0)
        mask = (pixels == colour[:, None, None]).all(0)
        rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
        assert [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1] == box


def test_shapes_are_distinct_and_fill_their_square():
    axis = (torch.arange(32) + 0.5) / 32 * 2 - 1
    u, v = axis[None, :].expand(32, 32), axis[:, None].expand(32, 32)
    masks = torch.stack([shape_mask(kind, u, v) for kind in range(len(SHAPES))]).flatten(1).float()
    assert (masks.sum(1) > 0.15 * 32 * 32).all()
    differences = torch.cdist(masks, masks, p=1)
    assert differences[~torch.eye(len(SHAPES), dtype=torch.bool)].min() > 60  # pixels that differ, per pair


def test_synthetic_split_serves_normalised_images():
    split = load_split("synthetic:12,5", True)
    assert len(split.dataset) == 12 and split.classes == SHAPES and split.boxes.shape == (12, 4)
    x, label = split.dataset[4]
    raw = make_synthetic(12, 0)
    assert torch.allclose(x, (raw.pixels[4].float() / 255 - 0.5) / 0.25) and label == int(raw.labels[4])
    assert len(load_split("synthetic:12,5", False).dataset) == 5


@pytest.mark.parametrize("spec", ["mnist", "cifar10", "synthetic:3", "synthetic:a,b", "synthetic:0,4"])
def test_bad_specs(spec):
    with pytest.raises(ValueError, match="--data|synthetic:TRAIN,TEST"):
        load_split(spec, True)


def write_cifar(folder: pathlib.Path, counts: dict, seed: int = 0) -> dict:
    """CIFAR-10 batches as the official files are laid out (bytes keys, uint8 rows of R, G, B planes)."""
    rng, written = np.random.default_rng(seed), {}
    folder.mkdir(parents=True)
    for name, count in counts.items():
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, count).tolist()
        with open(folder / name, "wb") as file:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, file, protocol=2)
        written[name] = (data, labels)
    return written


def test_cifar10_reads_batches(tmp_path):
    written = write_cifar(tmp_path / "cifar-10-batches-py", {"data_batch_1": 5, "data_batch_2": 3, "test_batch": 4})
    train, test = load_split(f"cifar10:{tmp_path}", True), load_split(f"cifar10:{tmp_path}", False)
    assert len(train.dataset) == 8 and len(test.dataset) == 4 and train.classes[0] == "airplane"
    data, labels = written["data_batch_2"]
    x, label = train.dataset[6]  # the second row of the second batch
    row, column, channel = 7, 20, 2
    expected = (data[1, channel * 1024 + row * 32 + column] / 255 - 0.4465) / 0.2616
    assert label == labels[1] and x.shape == (3, 32, 32)
    assert x[channel, row, column].item() == pytest.approx(expected, abs=1e-6)


def test_cifar10_refuses_code_in_a_batch(tmp_path):
    folder, marker = tmp_path / "c10", tmp_path / "pwned"
    folder.mkdir()

    class Payload:
        def __reduce__(self):
            return pathlib.Path.touch, (marker,)

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Payload(), b"labels": []}))
    with pytest.raises(ValueError, match="cannot read CIFAR-10 batch .*refused to load pathlib"):
        load_split(f"cifar10:{folder}", False)
    assert not marker.exists()


def test_cifar10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_split(f"cifar10:{tmp_path / 'none'}", True)
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 python batches"):
        load_split(f"cifar10:{tmp_path}", True)
    write_cifar(tmp_path / "only-test", {"test_batch": 2})
    with pytest.raises(FileNotFoundError, match="no training batches"):
        load_split(f"cifar10:{tmp_path / 'only-test'}", True)
    write_cifar(tmp_path / "empty-test", {"data_batch_1": 2})  # an empty test batch divided by 0 after an epoch
    with open(tmp_path / "empty-test" / "test_batch", "wb") as file:
        pickle.dump({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}, file, protocol=4)
    with pytest.raises(ValueError, match="the test batches hold no images"):
        load_split(f"cifar10:{tmp_path / 'empty-test'}", False)


def test_imagefolder(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 2)):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / name / f"{index}.png")
    train = load_split(f"imagefolder:{tmp_path}", True, image_size=32)
    test = load_split(f"imagefolder:{tmp_path}", False, image_size=32)
    assert train.classes == test.classes == ("cat", "dog") and len(train.dataset) == 6 and len(test.dataset) == 4
    x, label = test.dataset[3]
    assert x.shape == (3, 32, 32) and label == 1 and train.boxes is None
    with pytest.raises(FileNotFoundError, match="expected a val or test folder"):
        load_split(f"imagefolder:{tmp_path / 'train'}", False)
