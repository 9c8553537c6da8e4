"""``capture_attention``: record the gates of every CBAM-family module while a model runs."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..nn import CBAM, DynamicCBAM, ParallelCBAM

CBAM_MODULES = (CBAM, ParallelCBAM, DynamicCBAM)  # LightCBAM is a CBAM; CrossLayerCBAM's levels are CBAMs
TIMM_MODULES = ("CbamModule", "LightCbamModule")  # timm.layers.cbam, matched by name: cbam never imports timm


class AttentionRecord(NamedTuple):
    """One module's gates on its latest forward: ``channel (B, C)``, ``spatial (B, 1, *spatial)``; on the CPU."""

    channel: Tensor
    spatial: Tensor


def is_cbam_module(module: nn.Module) -> bool:
    """Whether ``capture_attention`` records ``module``: a cbam CBAM-family module or timm's (light) CBAM."""
    if isinstance(module, CBAM_MODULES):
        return True
    cls = type(module)
    return cls.__name__ in TIMM_MODULES and cls.__module__.split(".")[0] == "timm"


def _timm_gates(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """timm's gates from its submodules, as its forward computes them: ``(B, C, 1, 1)``, ``(B, 1, H, W)``.

    ``LightCbamModule`` pools ``(avg + max) / 2`` once per gate, and its channel gate is always a sigmoid.
    """
    channel_att, spatial_att = module.channel, module.spatial
    avg, top = x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)

    def mlp(pooled: Tensor) -> Tensor:
        return channel_att.fc2(channel_att.act(channel_att.fc1(pooled)))

    if type(module).__name__ == "LightCbamModule":
        channel = torch.sigmoid(mlp(0.5 * avg + 0.5 * top))
        y = x * channel
        pooled = 0.5 * y.mean(dim=1, keepdim=True) + 0.5 * y.amax(dim=1, keepdim=True)
    else:
        channel = channel_att.gate(mlp(avg) + mlp(top))
        y = x * channel
        pooled = torch.cat([y.mean(dim=1, keepdim=True), y.amax(dim=1, keepdim=True)], dim=1)
    return channel, spatial_att.gate(spatial_att.conv(pooled))


class _Recorder:
    """Hooks that store the gates of each call as ``records[name]``.

    ``before`` (a forward pre-hook) recomputes the gates from the call's input, with no grad, before
    the forward can overwrite it (``inplace=True``); a call with ``input_norm`` gets the gates of
    ``input_norm(x)``, the input CBAM gates. ``after`` (a forward hook) stores them once the forward
    has returned. Recomputed rather than intercepted because the fused CBAM and ParallelCBAM never
    call their gate submodules: ``attention(x)`` is the one contract every CBAM-family module keeps.
    The buffers the extra pass updates (BatchNorm running statistics and counts, in training) are
    put back, so capturing never changes training.
    """

    def __init__(self, name: str, records: dict[str, AttentionRecord]) -> None:
        self.name, self.records, self.pending = name, records, None

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["x"]
        norm = args[2] if len(args) > 2 else kwargs.get("input_norm")
        owners = [module, *([norm] if isinstance(norm, nn.Module) else [])]
        buffers = [buffer for owner in owners for buffer in owner.buffers()]
        with torch.no_grad():
            saved = [buffer.clone() for buffer in buffers]
            try:
                x = x if norm is None else norm(x)
                channel, spatial = module.attention(x) if isinstance(module, CBAM_MODULES) else _timm_gates(module, x)
            finally:
                for buffer, value in zip(buffers, saved):
                    buffer.copy_(value)
        self.pending = AttentionRecord(channel.flatten(1).cpu(), spatial.cpu())

    def after(self, module: nn.Module, args: tuple, output) -> None:
        self.records[self.name], self.pending = self.pending, None


@contextmanager
def capture_attention(model: nn.Module) -> Iterator[dict[str, AttentionRecord]]:
    """Record the gates of every CBAM-family module in ``model`` while the ``with`` block runs.

    Yields a dict, filled as the model runs, from module path (``model.named_modules()`` names:
    ``layer1.0.cbam`` in ``cbam.models`` and after ``add_cbam`` on torchvision, ``layer1.0.se`` in
    timm, ``""`` when ``model`` is itself a CBAM) to an ``AttentionRecord``: ``channel (B, C)`` and
    ``spatial (B, 1, *spatial)``, both as the module applied them, detached, on the CPU. Entries come
    in the order the modules ran. Each forward replaces the module's record (memory stays bounded
    over a data loader: read the records inside the loop to keep them). Recorded: ``CBAM`` (and
    ``LightCBAM``), ``ParallelCBAM``, ``DynamicCBAM``, each level of a ``CrossLayerCBAM``, and timm's
    ``CbamModule``/``LightCbamModule``. The hooks are removed on exit, also when the block raises.

    >>> with capture_attention(model) as maps:          # doctest: +SKIP
    ...     model(images)
    >>> maps["layer4.1.cbam"].spatial.shape             # doctest: +SKIP
    torch.Size([8, 1, 7, 7])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture_attention expects an nn.Module, got {type(model).__name__}")
    targets = [(name, module) for name, module in model.named_modules() if is_cbam_module(module)]
    if not targets:
        raise ValueError(f"capture_attention found no CBAM-family module in {type(model).__name__} (looked for cbam's "
                         f"CBAM, LightCBAM, ParallelCBAM, DynamicCBAM and timm's {' and '.join(TIMM_MODULES)})")
    records: dict[str, AttentionRecord] = {}
    handles = []
    for name, module in targets:
        recorder = _Recorder(name, records)
        handles += [module.register_forward_pre_hook(recorder.before, with_kwargs=True),
                    module.register_forward_hook(recorder.after)]
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def select_layers(records: Mapping[str, AttentionRecord], layers: Sequence[str] | None) -> dict[str, AttentionRecord]:
    """The records named by ``layers``, in capture order; ``None`` keeps all.

    A name picks the record of that name and every record below it: ``"layer4"`` picks
    ``layer4.0.cbam`` and ``layer4.1.cbam``.
    """
    if layers is None:
        return dict(records)
    if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
        raise TypeError(f"layers must be None or a non-empty sequence of layer names, got {layers!r}")
    chosen = set()
    for layer in layers:
        found = {name for name in records if name == layer or name.startswith(f"{layer}.")}
        if not found:
            raise ValueError(f"unknown layer {layer!r}; captured layers: {', '.join(map(repr, records)) or 'none'}")
        chosen |= found
    return {name: record for name, record in records.items() if name in chosen}
