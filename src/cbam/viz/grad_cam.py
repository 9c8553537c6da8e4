"""``grad_cam``: Grad-CAM (Selvaraju et al., ICCV 2017), the map the CBAM paper's Fig. 4 shows.

A few lines here rather than the ``grad-cam`` package: that package brings OpenCV, scikit-learn
and more for what is one forward hook and one ``autograd.grad`` call.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..validation import check_int


class GradCAM(NamedTuple):
    """``maps: (B, h, w)``, non-negative, at the layer's resolution; ``classes: (B,)`` the explained classes."""

    maps: Tensor
    classes: Tensor


def grad_cam(model: nn.Module, x: Tensor, layer: str, class_index: int | None = None) -> GradCAM:
    """Grad-CAM of ``model`` (``(B, 3, H, W) -> (B, classes)`` logits) at the output of submodule ``layer``.

    ``relu(sum_k mean_hw(d score / d A_k) * A_k)`` with ``A: (B, K, h, w)`` the layer's output and
    ``score`` the logit of ``class_index`` (default: each image's top class). Runs one forward, in eval
    mode (batch statistics would mix the images and update the running ones; each module's mode is
    put back), and one backward. Parameters, their gradients and ``requires_grad`` are left untouched.
    """
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"grad_cam: {type(model).__name__} has no submodule {layer!r}") from None
    outputs = []

    def keep(module: nn.Module, inputs: tuple, output):
        """Keep ``A`` and pass a copy on: an in-place layer after it (``ReLU(inplace=True)``, ``out +=``)
        would otherwise change ``A`` and the tensor its gradient is taken for."""
        outputs.append(output)
        return output.clone() if isinstance(output, Tensor) else None

    modes = [(submodule, submodule.training) for submodule in model.modules()]
    handle = module.register_forward_hook(keep)
    try:
        model.eval()
        with torch.enable_grad():
            logits = model(x.detach().requires_grad_())
    finally:
        handle.remove()
        for submodule, training in modes:
            submodule.training = training
    if len(outputs) != 1 or not isinstance(outputs[0], Tensor) or outputs[0].dim() != 4:
        raise ValueError(f"grad_cam: {layer!r} must run once and output one 4-D tensor (B, K, h, w)")
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError(f"grad_cam expects the model to return logits (B, classes), got {type(logits).__name__}"
                         + (f" of shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else ""))
    if class_index is None:
        classes = logits.argmax(1)
    else:
        index = check_int("class_index", class_index, minimum=0)
        if index >= logits.shape[1]:
            raise ValueError(f"class_index must be < {logits.shape[1]} (the model's classes), got {index}")
        classes = torch.full((len(logits),), index, device=logits.device)
    (activations,) = outputs
    score = logits.gather(1, classes[:, None]).sum()
    (gradients,) = torch.autograd.grad(score, activations)
    maps = torch.relu((gradients.mean((2, 3), keepdim=True) * activations).sum(1))
    return GradCAM(maps.detach().float().cpu(), classes.cpu())
