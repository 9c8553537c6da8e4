"""A tour of cbam: CBAM on 1-D, 2-D and 3-D data, its two gates, and a tiny CNN trained with and without it.

The data is generated: noisy 32x32 images holding one of three small shapes (filled square, hollow
square, plus) at a random place; the label is the shape. Everything runs on the CPU in well under a
minute and is seeded, so the numbers repeat.

    python examples/tour.py
"""

import time

import torch
from torch import nn

import cbam

SHAPES = ("filled square", "hollow square", "plus")


def tour_the_modules() -> None:
    print("CBAM on 1-D, 2-D and 3-D inputs (B, C, *spatial):")
    for dims, shape in ((1, (4, 32, 100)), (2, (4, 64, 28, 28)), (3, (2, 16, 8, 16, 16))):
        module = cbam.CBAM(shape[1], reduction_ratio=8, dims=dims)
        x = torch.randn(shape)
        gates = module.attention(x)
        params = sum(p.numel() for p in module.parameters())
        print(f"  {dims}-D x {tuple(x.shape)} -> {tuple(module(x).shape)}; channel gate {tuple(gates.channel.shape)}, "
              f"spatial gate {tuple(gates.spatial.shape)}, {params} parameters")


def make_images(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` images ``(count, 3, 32, 32)``, their labels, and the top-left corner of each 7x7 object."""
    images = torch.randn(count, 3, 32, 32, generator=generator)
    labels = torch.randint(0, len(SHAPES), (count,), generator=generator)
    corners = torch.randint(0, 32 - 7, (count, 2), generator=generator)
    stamp = torch.zeros(len(SHAPES), 7, 7)
    stamp[0] = 1
    stamp[1] = 1
    stamp[1, 2:5, 2:5] = 0
    stamp[2, 3, :] = stamp[2, :, 3] = 1
    for image, label, (top, left) in zip(images, labels, corners.tolist()):
        image[:, top:top + 7, left:left + 7] += 1.2 * stamp[label]
    return images, labels, corners


class TinyNet(nn.Module):
    """Two conv stages, each optionally followed by CBAM, then global pooling and a linear classifier."""

    def __init__(self, attention: bool) -> None:
        super().__init__()

        def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
            layers = [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            return nn.Sequential(*layers, *([cbam.CBAM(cout, reduction_ratio=4)] if attention else []))

        self.features = nn.Sequential(stage(3, 32, 1), stage(32, 64, 2))
        self.head = nn.Linear(64, len(SHAPES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def train_and_test(attention: bool, train, test, epochs: int = 4) -> tuple[TinyNet, float, float]:
    torch.manual_seed(0)
    model = TinyNet(attention)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    images, labels, _ = train
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in torch.randperm(len(images)).split(64):
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        accuracy = (model(test[0]).argmax(1) == test[1]).float().mean().item()
    return model, accuracy, seconds


def spatial_hits(model: TinyNet, images: torch.Tensor, corners: torch.Tensor) -> float:
    """Share of images whose last CBAM's spatial-gate peak (on its 16x16 grid) lies on the 7x7 object."""
    last = model.features[1][-1]
    with torch.no_grad():
        x = model.features[1][:-1](model.features[0](images))
        peak = last.attention(x).spatial.flatten(1).argmax(1)
    rows, cols = 2 * (peak // 16) + 0.5, 2 * (peak % 16) + 0.5  # centre of the 2x2 input patch
    inside = (rows >= corners[:, 0]) & (rows < corners[:, 0] + 7) & (cols >= corners[:, 1]) & (cols < corners[:, 1] + 7)
    return inside.float().mean().item()


def main() -> None:
    torch.set_num_threads(2)
    tour_the_modules()
    generator = torch.Generator().manual_seed(0)
    train, test = make_images(3000, generator), make_images(600, generator)
    print(f"\nTraining a tiny CNN on {len(train[0])} generated images ({', '.join(SHAPES)}), 4 epochs:")
    plain, plain_accuracy, plain_seconds = train_and_test(False, train, test)
    with_cbam, cbam_accuracy, cbam_seconds = train_and_test(True, train, test)
    for name, model, accuracy, seconds in (("without CBAM", plain, plain_accuracy, plain_seconds),
                                           ("with CBAM", with_cbam, cbam_accuracy, cbam_seconds)):
        params = sum(p.numel() for p in model.parameters())
        print(f"  {name:<13} {params:>6} parameters, test accuracy {accuracy:6.1%}, training {seconds:5.1f} s")
    hits = spatial_hits(with_cbam, test[0], test[2])
    print(f"  the last CBAM's spatial gate peaks on the object in {hits:.1%} of test images "
          f"(chance: {49 / 32 ** 2:.1%}, the object's share of the image)")


if __name__ == "__main__":
    main()
