"""``add_cbam``: put a CBAM into every residual block of an existing model, in place; ``remove_cbam``: take
them out again.

CBAM goes where the paper puts it (Fig. 3): on the residual branch, after its last BatchNorm and
before the addition with the shortcut. The model's own modules stay where they are, so their
state-dict keys and weights do not change and a checkpoint saved before the surgery still loads by
name (``strict=False`` reports exactly the new attention keys as missing).

Two ways in, chosen per block:

- **slot**: the block's forward already calls an optional attention module at that position:
  timm's ResNet blocks (``block.se``, the slot timm's own ``attn_layer`` fills) and the blocks of
  ``cbam.models`` (``block.cbam``). The CBAM is simply stored there.
- **hook**: otherwise (torchvision's ResNet, ResNeXt and Wide-ResNet blocks; any module picked by
  ``selector``) the CBAM is stored next to the module whose output it refines (``block.cbam``
  beside ``block.bn3``) and a forward hook on that module passes its output through the CBAM.
  Beside it, not inside it: code that treats every BatchNorm's parameters specially (no weight
  decay, frozen BN) must not catch the CBAM's. Not inside a ``Sequential``/``ModuleList`` either,
  where it would run as one more layer: selecting a container's item is an error.

Why a hook rather than replacing ``bn3`` by ``Sequential(bn3, cbam)`` or rewriting the block's
forward: a wrapper renames ``bn3.weight`` to ``bn3.0.weight``, and a rewritten forward copies
torchvision's code and only fits blocks we know. The hook leaves every key alone, works on any
module, and is a plain object of a module-level class holding the CBAM, so ``copy.deepcopy`` (its
memo maps the hook's CBAM to the copied child), pickling / ``torch.save(model)``, ``torch.jit.trace``
and ``torch.export`` all keep it (the hook runs inside the hooked module's call). Limits:
``torch.jit.script`` cannot compile a hook object (trace instead, or ``remove_cbam`` first to script
the plain model); a ``torch.fx`` GraphModule
(torchvision's ``create_feature_extractor``) still runs the hook but does not register the CBAM,
so its ``state_dict()`` and ``.to()`` miss it; and a pass that *replaces* the hooked module
afterwards (``nn.SyncBatchNorm.convert_sync_batchnorm``, BN freezing) drops the hook with it:
convert first, then call ``add_cbam``.

``remove_cbam`` is the inverse, in place: it drops every such hook with the CBAM stored beside it and
empties the slots (``None``, as the blocks hold without attention), so the model computes what it did
before ``add_cbam`` and has its old state-dict keys. A CBAM that ``cbam.models.resnet*(attention="cbam")``
built into its blocks sits in the same slot and goes too (an ablation of a trained CBAM-ResNet).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..nn import CBAM
from ..validation import check_choice, check_int

INITS = ("default", "identity")
IDENTITY_GATE = 0.999  # both gates' value at step 0 with init="identity": CBAM(x) = 0.998 x


class _KnownBlock(NamedTuple):
    """A residual block class ``add_cbam`` places CBAM in without a selector.

    ``slot``: the attribute the block's forward already applies after its last BN; ``norm``: that
    BN, hooked where there is no slot; ``conv``: the last conv of the branch, whose ``out_channels``
    is the CBAM's width (read from the conv, not the norm: torchvision's ``FrozenBatchNorm2d`` keeps
    no ``num_features``).
    """

    module: str
    cls: str
    slot: str | None
    norm: str | None
    conv: str


# Looked up in sys.modules only: a model cannot hold these blocks unless their library is imported,
# and cbam itself never imports torchvision or timm.
KNOWN_BLOCKS = (
    _KnownBlock("torchvision.models.resnet", "BasicBlock", None, "bn2", "conv2"),
    _KnownBlock("torchvision.models.resnet", "Bottleneck", None, "bn3", "conv3"),
    _KnownBlock("timm.models.resnet", "BasicBlock", "se", None, "conv2"),
    _KnownBlock("timm.models.resnet", "Bottleneck", "se", None, "conv3"),
    _KnownBlock("cbam.models.resnet", "BasicBlock", "cbam", None, "conv2"),
    _KnownBlock("cbam.models.resnet", "Bottleneck", "cbam", None, "conv3"),
)

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class _ApplyAttention:
    """Forward hook of ``hooked``: ``output -> attention(output)``, ``(B, C, *spatial) -> (B, C, *spatial)``.

    Copies that copy the hook with the module (``copy.deepcopy``, pickling) hold their own CBAM; a copy
    that shares the original's hooks (``nn.DataParallel``'s replicas) would run the original CBAM, on
    another device, and is refused. An output that is not ``(B, C, *spatial)`` with the CBAM's ``C`` (a
    wrong ``channels=``) raises ``ValueError`` naming the module, before the CBAM runs."""

    def __init__(self, attention: nn.Module, hooked: nn.Module) -> None:
        self.attention, self.hooked = attention, hooked

    def __call__(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        if module is not self.hooked:
            raise RuntimeError(f"add_cbam's CBAM hook ran on a copy of {type(module).__name__} that shares the "
                               "original's hooks (nn.DataParallel's replicas do), so it would run the original "
                               "CBAM: use DistributedDataParallel (torchrun), which keeps one model per process")
        channels = self.attention.channel_att.in_channels
        if not isinstance(output, Tensor) or output.dim() < 2 or output.shape[1] != channels:
            raise _width_error(module, channels, output)
        return self.attention(output)


def _width_error(module: nn.Module, channels: int, output) -> ValueError:
    """The error for a hooked module whose ``output`` is not ``(B, channels, *spatial)``."""
    if not isinstance(output, Tensor):
        got = f"is a {type(output).__name__}"
    else:
        got = f"has shape {tuple(output.shape)}" + (f" ({output.shape[1]} channels)" if output.dim() >= 2 else "")
    return ValueError(f"add_cbam: the CBAM on {type(module).__name__}'s output has {channels} channels but that "
                      f"output {got}, not (B, {channels}, *spatial); pass add_cbam's channels= the module's output "
                      "channels (or select a module whose output is a feature map)")


class _Site(NamedTuple):
    """Where one CBAM goes: ``owner.<attr>`` holds it; ``hooked`` (if not ``None``) feeds it its output."""

    owner: nn.Module
    attr: str
    hooked: nn.Module | None
    channels: int


def _known_block(module: nn.Module) -> _KnownBlock | None:
    for known in KNOWN_BLOCKS:
        cls = getattr(sys.modules.get(known.module), known.cls, None)
        if cls is not None and isinstance(module, cls):
            return known
    return None


def _has_our_hook(module: nn.Module) -> bool:
    return any(isinstance(hook, _ApplyAttention) for hook in module._forward_hooks.values())


def _norm_width(module: nn.Module) -> int | None:
    """``num_features`` (BatchNorm, InstanceNorm) or ``num_channels`` (GroupNorm) of the last norm in ``module``."""
    for sub in reversed(list(module.modules())):
        for attr in ("num_features", "num_channels"):
            width = getattr(sub, attr, None)
            if isinstance(width, int) and not isinstance(width, bool):
                return width
    return None


def _check_selector(selector) -> Callable[[str, nn.Module], bool] | None:
    """``selector`` as a ``(name, module) -> bool`` predicate (``None`` stays ``None``)."""
    expected = "None, an nn.Module subclass, a tuple of them, or a callable (name, module) -> bool"
    if selector is None:
        return None
    types = selector if isinstance(selector, tuple) else (selector,)
    if types and all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        return lambda name, module: isinstance(module, types)
    if callable(selector) and not isinstance(selector, (type, tuple)):
        return selector
    raise TypeError(f"selector must be {expected}; got {selector!r} ({type(selector).__name__})")


def _check_attribute_name(value) -> str:
    if not isinstance(value, str):
        raise TypeError(f"attention_name must be a str such as 'cbam', got {value!r} ({type(value).__name__})")
    if not value.isidentifier():
        raise ValueError(f"attention_name must be a valid attribute name such as 'cbam', got {value!r}")
    return value


_RENAME = "; if something else holds that name, pass another attention_name"


def _display(name: str) -> str:
    return name or "the model"


def _free(owner: nn.Module, attr: str, owner_name: str, hint: str = "") -> None:
    """Raise unless ``owner.<attr>`` is free to hold a new attention module (absent or ``None``)."""
    existing = getattr(owner, attr, None)
    if existing is not None:
        where = f"{owner_name}.{attr}" if owner_name else attr
        raise ValueError(f"add_cbam: {where} already holds {type(existing).__name__}; add_cbam only fills empty "
                         f"places (a second call is an error){hint}")


def _known_site(name: str, block: nn.Module, known: _KnownBlock, attention_name: str) -> _Site:
    channels = getattr(block, known.conv).out_channels
    if known.slot is not None:
        _free(block, known.slot, name)
        return _Site(block, known.slot, None, channels)
    norm = getattr(block, known.norm)
    if _has_our_hook(norm):
        raise ValueError(f"add_cbam: {_display(name)} already has CBAM after {known.norm} from an earlier call")
    _free(block, attention_name, name, _RENAME)
    return _Site(block, attention_name, norm, channels)


def _selected_site(model: nn.Module, name: str, module: nn.Module, channels, attention_name: str) -> _Site:
    if not name:
        raise ValueError("add_cbam: selector matched the model itself; select the submodules whose output CBAM refines")
    if _has_our_hook(module):
        raise ValueError(f"add_cbam: {name} already has CBAM applied to its output from an earlier call")
    parent_name = name.rpartition(".")[0]
    parent = model.get_submodule(parent_name)
    known = _known_block(parent)
    if known is not None and known.slot == attention_name:
        raise ValueError(
            f"add_cbam: {name} is inside a {type(parent).__name__} whose forward applies its own "
            f"{attention_name!r} slot, where a CBAM stored beside {name} would run twice; pass selector=None (the "
            "block's slot) or another attention_name")
    if isinstance(parent, _CONTAINERS):
        raise ValueError(
            f"add_cbam: {name} is an item of an nn.{type(parent).__name__}, where a CBAM stored beside it would run "
            f"as one more layer; select a module inside {name} (e.g. its residual branch) instead"
        )
    _free(parent, attention_name, parent_name, _RENAME)
    if channels is None:
        width = _norm_width(module)
        if width is None:
            raise ValueError(
                f"add_cbam: cannot infer the channel count of {name} ({type(module).__name__}): it holds no "
                "BatchNorm/GroupNorm; pass channels= (an int or a callable module -> int)"
            )
    elif callable(channels):
        width = check_int(f"channels({name!r})", channels(module))
    else:
        width = channels
    return _Site(parent, attention_name, module, width)


def _factory(module: nn.Module) -> dict:
    """``device``/``dtype`` of the first floating-point tensor in ``module`` (empty if it holds none)."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return {"device": tensor.device, "dtype": tensor.dtype}
    return {}


def _gate_logit(gate: str, value: float) -> float:
    """The logit ``z`` at which ``gate(z) == value``: inverse sigmoid, or ``6 * value - 3`` for hard-sigmoid."""
    return math.log(value / (1 - value)) if gate == "sigmoid" else 6 * value - 3


def _check_init(init) -> float | None:
    """The gates' starting value: ``None`` (``"default"``), ``IDENTITY_GATE`` (``"identity"``) or a float in (0, 1)."""
    if isinstance(init, str):
        return None if check_choice("init", init, INITS) == "default" else IDENTITY_GATE
    if not isinstance(init, float):
        expected = "'default', 'identity' or a float in (0, 1)"
        raise TypeError(f"init must be {expected}, got {init!r} ({type(init).__name__})")
    if not 0 < init < 1:
        raise ValueError(f"init as a float is the gates' starting value and must lie in (0, 1), got {init}")
    return init


@torch.no_grad()
def _start_near_identity(attention: CBAM, value: float) -> None:
    """Initialise ``attention`` so that ``attention(x) = value**2 * x`` for every ``x: (B, C, *spatial)``.

    Let ``l`` be the logit with ``gate(l) = value``. Channel gate ``Mc = gate(sum_p (W2 relu(W1
    pool_p(x) + b1) + b2))`` over ``P`` pools: with ``W2 = 0`` and ``b2 = l / P`` it is ``value`` for
    every channel and input. Spatial gate ``Ms = gate(BN(conv(pooled)))`` with ``BN(s) = gamma *
    s_hat + beta``: with ``gamma = 0`` and ``beta = l`` it is ``value`` everywhere, in train mode (batch
    statistics) and eval mode alike. A residual branch ``F(x)`` thus becomes ``value**2 * F(x)``.

    It still learns: ``W1`` and the conv keep their He init, so ``h_p = relu(W1 pool_p + b1)`` and
    ``s_hat`` are non-zero, and the zeroed ``W2`` and ``gamma`` get the gradients ``sum_p delta_p h_p^T``
    and ``sum delta * s_hat`` at the first step (``delta``: the loss gradient at the gate times
    ``gate'(l)``); ``W1`` and the conv follow once those move, as with the zero-initialised last BN
    of a ResNet block. The price of starting near 1 is ``gate'(l) = value (1 - value)`` for sigmoid
    (1e-3 at 0.999, against 0.25 at ``l = 0``): SGD takes small first steps, Adam-style optimisers
    rescale them. Hard-sigmoid keeps ``gate' = 1/6`` up to 1.
    """
    channel, spatial = attention.channel_att, attention.spatial_att
    channel.fc2.weight.zero_()
    channel.fc2.bias.fill_(_gate_logit(channel.gate, value) / len(channel.pool_types))
    spatial.bn.weight.zero_()
    spatial.bn.bias.fill_(_gate_logit(spatial.gate, value))


def _find_sites(model: nn.Module, predicate, channels, attention_name: str) -> list[_Site]:
    """Every place in ``model`` that gets a CBAM, checked: known blocks, or the modules ``predicate`` picks."""
    sites, places = [], {}
    for name, module in model.named_modules():
        if predicate is not None:
            if not predicate(name, module):
                continue
            site = _selected_site(model, name, module, channels, attention_name)
        elif (known := _known_block(module)) is not None:
            site = _known_site(name, module, known, attention_name)
        else:
            continue
        other = places.setdefault((id(site.owner), site.attr), name)
        if other != name:
            raise ValueError(f"add_cbam: {other} and {name} would both store their CBAM as {site.attr} on one parent; "
                             "select one module per parent (or call add_cbam again with another attention_name)")
        sites.append(site)
    if not sites:
        if predicate is not None:
            raise ValueError(f"add_cbam: selector matched no module of {type(model).__name__}")
        names = ", ".join(sorted({f"{k.module}.{k.cls}" for k in KNOWN_BLOCKS}))
        raise ValueError(
            f"add_cbam found no residual block it knows in {type(model).__name__} ({names}); pass selector= "
            "to pick the modules whose output CBAM refines"
        )
    return sites


def add_cbam(
    model: nn.Module,
    *,
    selector: type[nn.Module] | tuple[type[nn.Module], ...] | Callable[[str, nn.Module], bool] | None = None,
    channels: int | Callable[[nn.Module], int] | None = None,
    attention_name: str = "cbam",
    init: str | float = "default",
    **cbam_kwargs,
) -> nn.Module:
    """Insert ``CBAM(width, **cbam_kwargs)`` into ``model``'s residual blocks, in place; return ``model``.

    ``selector=None`` finds the residual blocks of torchvision's ResNet / ResNeXt / Wide-ResNet
    (``BasicBlock``, ``Bottleneck``; the CBAM refines ``bn2`` / ``bn3`` through a forward hook and is
    stored as ``block.<attention_name>``), timm's ResNets (stored in the block's ``se`` slot, which
    timm's forward applies at the same position) and ``cbam.models``' blocks (their ``cbam`` slot).
    Its width is the block's output channels. On torchvision models the new keys are
    ``layerX.Y.cbam.*``, the same as ``cbam.models.resnet*(attention="cbam")``.

    For any other model, ``selector`` picks the modules whose output CBAM refines (a residual
    branch, or its last norm layer): an ``nn.Module`` subclass or tuple of them (``isinstance``), or
    a predicate ``(name, module) -> bool`` over ``model.named_modules()``. Each CBAM is stored next
    to its module, as ``<parent>.<attention_name>``, and applied by a hook (see the module
    docstring). ``channels`` gives its width: an int, a callable ``module -> int``, or ``None`` for the
    ``num_features`` / ``num_channels`` of the last BatchNorm/GroupNorm in the selected module.

    ``init="default"``: the CBAM's own initialisation (gates near 0.5 at random: a pretrained model's
    outputs change a lot). ``init="identity"``: every CBAM starts as ``x -> 0.998 x`` (both gates
    0.999) and can still learn, so a pretrained model's outputs barely move at step 0; a float in
    (0, 1) sets the gates' starting value instead (closer to 1: a smaller jump at step 0 but smaller
    first gradients; see ``_start_near_identity`` for the math). Constant gates need offsets the
    paper's form lacks, so these turn on ``mlp_bias`` and ``spatial_norm`` unless they are given.
    New modules take the device, dtype and train/eval mode of the module they refine, unless
    ``device``/``dtype`` are given.

    Existing modules are never moved, replaced or re-initialised. A place that already holds
    attention (a second call, timm's SE-ResNets) raises ``ValueError`` and the model is left as it
    was: every check runs before the first change. ``remove_cbam`` undoes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"add_cbam expects an nn.Module, got {type(model).__name__}")
    predicate = _check_selector(selector)
    attention_name = _check_attribute_name(attention_name)
    start = _check_init(init)
    if channels is not None:
        if predicate is None:
            raise ValueError("add_cbam: channels= goes with selector=; known blocks give their own width")
        if not callable(channels):
            channels = check_int("channels", channels)
    if start is not None:
        for option in ("mlp_bias", "spatial_norm"):
            if cbam_kwargs.get(option) is False:
                raise ValueError(f"init={init!r} needs mlp_bias=True and spatial_norm=True (the gates' offsets); "
                                 f"got {option}=False")
            cbam_kwargs[option] = True

    sites = _find_sites(model, predicate, channels, attention_name)

    attentions = []
    for site in sites:
        anchor = site.hooked if site.hooked is not None else site.owner
        attention = CBAM(site.channels, **{**_factory(anchor), **cbam_kwargs})
        if start is not None:
            _start_near_identity(attention, start)
        attentions.append(attention.train(anchor.training))

    for site, attention in zip(sites, attentions):
        setattr(site.owner, site.attr, attention)
        if site.hooked is not None:
            site.hooked.register_forward_hook(_ApplyAttention(attention, site.hooked))
    return model


class _Removal(NamedTuple):
    """One CBAM to take out: ``owner.<attr>`` holds it (``slot``: set back to ``None``, else deleted);
    ``hooks``: the ``(module, key)`` of the forward hooks that apply it."""

    name: str
    owner: nn.Module
    attr: str
    slot: bool
    hooks: list


def _qualified(prefix: str, attr: str) -> str:
    return f"{prefix}.{attr}" if prefix else attr


def remove_cbam(model: nn.Module, *, attention_name: str = "cbam") -> list[str]:
    """Take out every CBAM that sits where ``add_cbam`` puts one, in place; return their qualified names.

    Removed: the forward hooks ``add_cbam`` registered, each with the CBAM stored beside its module as
    ``<parent>.<attention_name>`` (deleted), and a ``cbam.CBAM`` in a known block's slot (timm's ``se``,
    ``cbam.models``' ``cbam``; set back to ``None``). The latter includes the CBAMs that
    ``cbam.models.resnet*(attention="cbam")`` builds in: the result computes as ``attention=None`` with
    the same weights. Other modules in a slot (timm's ``SEModule``) stay. After ``remove_cbam(add_cbam(m))``,
    ``m`` computes what it did before, with its old state-dict keys; ``add_cbam`` works on it again.
    Nothing to remove raises ``ValueError``; every check runs before the first change.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"remove_cbam expects an nn.Module, got {type(model).__name__}")
    attention_name = _check_attribute_name(attention_name)
    found: dict[int, _Removal] = {}  # by id of the CBAM: a slot may also be hooked (a selector on its block)
    elsewhere = 0  # add_cbam hooks whose CBAM is stored under another attention_name
    for name, module in model.named_modules():
        known = _known_block(module)
        if known is not None and known.slot is not None and isinstance(getattr(module, known.slot, None), CBAM):
            found[id(getattr(module, known.slot))] = _Removal(_qualified(name, known.slot), module, known.slot,
                                                              True, [])
        for key, hook in module._forward_hooks.items():
            if not isinstance(hook, _ApplyAttention) or not name:
                continue
            parent_name = name.rpartition(".")[0]
            parent = model.get_submodule(parent_name)
            if getattr(parent, attention_name, None) is not hook.attention:
                elsewhere += 1
                continue
            removal = found.setdefault(id(hook.attention), _Removal(
                _qualified(parent_name, attention_name), parent, attention_name, False, []))
            removal.hooks.append((module, key))
    if not found:
        hint = f" ({elsewhere} add_cbam hooks keep theirs under another attention_name)" if elsewhere else ""
        raise ValueError(f"remove_cbam found no CBAM in {type(model).__name__} where add_cbam puts one: no "
                         f"add_cbam hook with its CBAM stored as <parent>.{attention_name}{hint}, and no CBAM in "
                         "the attention slot of a known residual block")

    for removal in found.values():
        for module, key in removal.hooks:
            for hooks in (module._forward_hooks, module._forward_hooks_with_kwargs,
                          module._forward_hooks_always_called):
                hooks.pop(key, None)
        if removal.slot:
            setattr(removal.owner, removal.attr, None)
        else:
            delattr(removal.owner, removal.attr)
    return [removal.name for removal in found.values()]
