"""``cbam visualize``: a figure from an image, checkpoints loaded safely, one-line errors with exit status 2."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

import cbam
from cbam.cli import main

torch.set_num_threads(2)


class NotWeights:
    """Pickled by reference to this module: weights-only loading must refuse it."""


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "photo.jpg"
    pixels = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def state_dict(**kwargs):
    torch.manual_seed(0)
    return cbam.models.resnet18(num_classes=10, **kwargs).state_dict()


def visualize(*args):
    return main(["visualize", "--size", "64", *map(str, args)])


def test_writes_a_png(image, tmp_path, capsys):
    out = tmp_path / "figure.png"
    assert visualize("--image", image, "--layers", "layer3", "layer4", "--grad-cam", "layer4", "--out", out) == 0
    assert capsys.readouterr().out == f"wrote {out} (4 CBAM layers)\n"
    with Image.open(out) as figure:
        assert figure.format == "PNG" and figure.width > 500 and figure.height > 300
        pixels = np.asarray(figure.convert("RGB"), dtype=np.float64)
    assert pixels.std() > 20


@pytest.mark.parametrize("wrap", [lambda sd: sd, lambda sd: {"model": sd, "epoch": 3}], ids=["bare", "model-key"])
def test_loads_a_checkpoint_as_svg(image, tmp_path, wrap):
    checkpoint, out = tmp_path / "weights.pt", tmp_path / "figure.svg"
    torch.save(wrap(state_dict()), checkpoint)
    args = ("--image", image, "--checkpoint", checkpoint, "--num-classes", "10", "--layers", "layer4.1.cbam")
    assert visualize(*args, "--out", out) == 0
    assert "<svg" in out.read_text()


def _copy(source, path):
    Image.open(source).save(path)
    return path


def write_checkpoint(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return path


ERRORS = {
    "missing image": (lambda d, image: ["--image", d / "none.png"], "image '.*none.png' does not exist"),
    "unreadable image": (lambda d, image: ["--image", write_checkpoint(d / "fake.png", b"\x89PNG no")],
                         "cannot read image '.*fake.png': cannot identify image file"),
    "tiny image": (lambda d, image: ["--image", d / "tiny.png"], "is 20x12 pixels; need at least 32 on each side"),
    "missing checkpoint": (lambda d, image: ["--image", image, "--checkpoint", d / "none.pt"],
                           "checkpoint '.*none.pt' does not exist"),
    "unreadable checkpoint": (lambda d, image: ["--image", image, "--checkpoint", write_checkpoint(d / "c.pt", b"ab")],
                              "cannot read checkpoint '.*c.pt': "),
    "pickled object": (lambda d, image: ["--image", image, "--checkpoint",
                                         write_checkpoint(d / "c.pt", {"model": NotWeights()})],
                       "weights-only loading .* refused it: Unsupported global: GLOBAL test_cli_visualize.NotWeights"),
    "not a state dict": (lambda d, image: ["--image", image, "--checkpoint", write_checkpoint(d / "c.pt", [1, 2])],
                         "holds no state dict: expected a dict of tensors, or a dict with one under 'model'; got list"),
    "wrong shapes": (lambda d, image: ["--image", image, "--checkpoint", write_checkpoint(d / "c.pt", state_dict())],
                     r"does not fit the model: size mismatch for fc.weight: .*torch.Size\(\[10, 512\]\)"),
    "missing keys": (lambda d, image: ["--image", image, "--num-classes", "10", "--checkpoint",
                                       write_checkpoint(d / "c.pt", state_dict(attention=None))],
                     "does not fit the model: 24 missing and 0 unexpected keys .first: missing 'layer1.0.cbam."),
    "no CBAM": (lambda d, image: ["--image", image, "--attention", "none"], "no CBAM-family module in ResNet"),
    "bad layers": (lambda d, image: ["--image", image, "--layers", "layer4", "head"],
                   "unknown layer 'head'; captured layers: 'layer1.0.cbam', "),
    "bad extension": (lambda d, image: ["--image", image, "--out", d / "figure.jpg"],
                      "must end in .png, .svg or .pdf, got '.*figure.jpg'"),
    "missing directory": (lambda d, image: ["--image", image, "--out", d / "no" / "figure.png"],
                          "cannot write '.*figure.png': directory '.*no' does not exist"),
    "output is the image": (lambda d, image: ["--image", _copy(image, d / "same.png"), "--out", d / "same.png"],
                            "cannot write '.*same.png': it is the input '.*same.png'; name another file"),
    "bad grad-cam layer": (lambda d, image: ["--image", image, "--grad-cam", "layer9"],
                           "ResNet has no submodule 'layer9'"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_errors_are_one_line_with_status_2(case, image, tmp_path, capsys, monkeypatch):
    Image.new("RGB", (20, 12)).save(tmp_path / "tiny.png")
    arguments, pattern = ERRORS[case]
    arguments = arguments(tmp_path, image)
    monkeypatch.chdir(tmp_path)  # the default --out would land here
    before = set(tmp_path.iterdir())
    assert visualize(*arguments) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith("cbam visualize: error: ")
    assert re.search(pattern, captured.err), captured.err
    assert set(tmp_path.iterdir()) == before  # no figure written


@pytest.mark.parametrize("size", ["16", "4097", "99999999999999999999"])
def test_size_out_of_range_is_a_usage_error(size, image, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the default --out would land here
    with pytest.raises(SystemExit) as exit_info:
        main(["visualize", "--image", str(image), "--size", size])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"cbam visualize: error: argument --size: expected an int from 32 to 4096, " \
                                      f"got '{size}'\n"


def test_a_train_checkpoint_brings_its_settings_and_stem_rebuilds_bare_weights(image, tmp_path, monkeypatch):
    """A run trained with --stem cifar (10 classes) is drawn as is; its bare weights need --stem cifar. The cifar
    stem does not downsample: layer1's spatial maps keep the 64x64 input's size (the imagenet stem's: 16x16)."""
    run = tmp_path / "run"
    assert main(["train", "--data", "synthetic:16,8", "--batch-size", "8", "--epochs", "1", "--stem", "cifar",
                 "--no-progress", "--out", str(run)]) == 0
    torch.save(torch.load(run / "checkpoint.pt", weights_only=True)["model"], tmp_path / "bare.pt")
    drawn, real = [], cbam.viz.attention_figure

    def spy(pixels, records, **options):
        drawn.append(tuple(records["layer1.0.cbam"].spatial.shape))
        return real(pixels, records, **options)

    monkeypatch.setattr(cbam.viz, "attention_figure", spy)
    assert visualize("--image", image, "--checkpoint", run / "checkpoint.pt", "--out", tmp_path / "a.png") == 0
    assert visualize("--image", image, "--checkpoint", tmp_path / "bare.pt", "--stem", "cifar", "--num-classes", "10",
                     "--out", tmp_path / "b.png") == 0
    assert drawn == [(1, 1, 64, 64)] * 2
