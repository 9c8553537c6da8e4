"""The README's attention figure: a small CNN with CBAM learns to name a shape, then shows where it looks.

Generated data: 64x64 blotchy, grainy images holding one yellow 16x16 shape (disk, ring or cross; the label)
and two grey ones of random kinds (distractors), at random places; the yellow shape's box is known.
The script trains the network for four epochs on the CPU (seeded; well under a minute), scores each
CBAM's spatial attention and Grad-CAM with the pointing game on held-out images, and draws one
held-out image with ``cbam.viz``:

    python examples/attention_figure.py            # writes docs/figures/attention.png
    python examples/attention_figure.py out.svg    # any .png, .svg or .pdf path
"""

import sys
import time
from collections import OrderedDict

import torch
from torch import nn

import cbam
from cbam.viz import attention_figure, capture_attention, grad_cam, pointing_game, save_figure

SHAPES = ("disk", "ring", "cross")
SIDE, OBJECT, DISTRACTORS = 64, 16, 2
YELLOW, GREY = torch.tensor([0.95, 0.8, 0.2]), torch.tensor([0.8, 0.8, 0.8])


def stamps() -> torch.Tensor:
    """The three 16x16 shapes as 0/1 masks: ``(3, 16, 16)``."""
    coords = torch.arange(OBJECT) - (OBJECT - 1) / 2
    radius = (coords[:, None] ** 2 + coords[None, :] ** 2).sqrt()
    cross = (coords.abs()[:, None] < 2.5) | (coords.abs()[None, :] < 2.5)
    return torch.stack([radius < 7.5, (radius < 7.5) & (radius > 4.5), cross]).float()


def paint(image: torch.Tensor, mask: torch.Tensor, colour: torch.Tensor, corner: list[int]) -> None:
    top, left = corner
    patch = image[:, top:top + OBJECT, left:left + OBJECT]
    patch.lerp_(colour[:, None, None].expand_as(patch), 0.9 * mask)


def make_images(count: int, generator: torch.Generator):
    """``pixels (count, 3, 64, 64)`` in [0, 1], ``labels (count,)``, ``boxes (count, 4)`` (x0, y0, x1, y1)."""
    blotches = nn.functional.interpolate(torch.randn(count, 3, 8, 8, generator=generator), size=SIDE, mode="bilinear")
    grain = torch.randn(count, 3, SIDE, SIDE, generator=generator)
    pixels = (0.45 + 0.12 * blotches + 0.02 * grain).clamp(0, 1)
    labels = torch.randint(0, len(SHAPES), (count,), generator=generator)
    kinds = torch.randint(0, len(SHAPES), (count, DISTRACTORS), generator=generator)
    corners = torch.randint(0, SIDE - OBJECT + 1, (count, DISTRACTORS + 1, 2), generator=generator)
    masks = stamps()
    for image, label, image_kinds, image_corners in zip(pixels, labels, kinds, corners.tolist()):
        for kind, corner in zip(image_kinds, image_corners):
            paint(image, masks[kind], GREY, corner)
        paint(image, masks[label], YELLOW, image_corners[-1])  # the target, drawn last, on top
    top_left = corners[:, -1].flip(1)  # (row, col) -> (x0, y0)
    return pixels, labels, torch.cat([top_left, top_left + OBJECT], 1)


def stage(cin: int, cout: int) -> nn.Sequential:
    """conv (stride 2)-BN-ReLU, conv-BN-ReLU, then CBAM (timm's form: a BatchNorm before the spatial gate)."""
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(cin, cout, 3, 2, 1, bias=False), bn1=nn.BatchNorm2d(cout), relu1=nn.ReLU(),
        conv2=nn.Conv2d(cout, cout, 3, 1, 1, bias=False), bn2=nn.BatchNorm2d(cout), relu2=nn.ReLU(),
        cbam=cbam.CBAM(cout, reduction_ratio=4, preset="timm"),
    ))


def make_model() -> nn.Sequential:
    """Three stages (16, 32, 64 channels at 32, 16, 8 pixels), global average pooling, a linear head."""
    return nn.Sequential(OrderedDict(
        stage1=stage(3, 16), stage2=stage(16, 32), stage3=stage(32, 64),
        pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), head=nn.Linear(64, len(SHAPES)),
    ))


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - 0.45) / 0.25


def train(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, epochs: int = 4) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(pixels)).split(64):
            loss = nn.functional.cross_entropy(model(normalise(pixels[batch])), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


def main(out: str = "docs/figures/attention.png") -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(0)
    (train_pixels, train_labels, _), (pixels, labels, boxes) = make_images(3000, generator), make_images(500, generator)
    model = make_model()
    start = time.perf_counter()
    train(model, train_pixels, train_labels)
    print(f"trained in {time.perf_counter() - start:.0f} s")

    with capture_attention(model) as records:
        cam = grad_cam(model, normalise(pixels), "stage3")  # one forward (recorded) and one backward
    print(f"held-out accuracy {(cam.classes == labels).float().mean().item():.1%} on {len(labels)} images")
    print("pointing game: the map's peak inside the yellow shape's box (chance: the box's share of the image)")
    for name, maps in [*((f"{name} (spatial)", record.spatial) for name, record in records.items()),
                       ("Grad-CAM stage3", cam.maps)]:
        score = pointing_game(maps, boxes, SIDE)
        print(f"  {name:<24} {score.accuracy:6.1%}   chance {score.chance:.1%}")

    index = 0
    title = f"Grad-CAM stage3 ({SHAPES[int(cam.classes[index])]})"
    figure = attention_figure(pixels[index], records, index=index, heatmaps={title: cam.maps[index]})
    print(f"wrote {save_figure(figure, out, dpi=80)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
