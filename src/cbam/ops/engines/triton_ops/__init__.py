"""The Triton engine: the fused CBAM's large-tensor passes as Triton kernels, for CUDA tensors (and
CPU tensors under ``TRITON_INTERPRET=1``, set before this package is imported).

The same functions, arguments and results as ``engines.torch_ops`` (the definition they are tested
against), over ``x: (B, C, S)`` views that are contiguous or channels-last-derived (strides
``(S*C, 1, C)``), read through their strides, never copied. float32, bfloat16, float16 and float64:
sums in float32 (float64 for float64 input), big outputs in ``x``'s dtype and layout, small ones
(``(B, C)``, ``(B, S)``, ``(B, 2, C)``, ``(2, C)``, ``(C)``) contiguous in float32 (float64 for float64
input), indices int64 (the first maximal one, a NaN being the maximum, as ``torch.argmax``). ``pool``
and ``gated_stats`` also take the folded BatchNorm's ``input_affine`` as the other passes do.
Launches: one per pass, but ``gate_grads`` two (a zeroed allocation for its atomic sums, then the
pass), ``batch_norm_pool`` two (rows, then channels), ``batch_norm_input_grad`` three (zeroed sums,
their per-sample shares, the element-wise pass). The channel MLP on the pooled ``(B, C)`` vectors
(``channel_gate``, ``channel_backward``: ``channel_mlp.py``) takes two launches forward and two
backward; the spatial conv on the ``(B, S)`` statistics (``spatial_logits``) one, the spatial BatchNorm
on batch statistics and the gate (``spatial_norm_gate``) one, and from the spatial
gate back to the statistics through the spatial BatchNorm and the conv (``spatial_backward``) two or
three (``spatial.py``). ``conv_backward`` (a conv chain's) is torch_ops' own.
"""

from ..torch_ops import conv_backward
from .batch_norm import batch_norm_affine, batch_norm_input_grad, batch_norm_pool
from .channel_mlp import channel_backward, channel_gate
from .gradients import gate_grads, input_grad, stats_grad
from .output import apply
from .pooling import gated_stats, pool
from .spatial import spatial_backward, spatial_logits, spatial_norm_gate

__all__ = [
    "apply", "batch_norm_affine", "batch_norm_input_grad", "batch_norm_pool", "channel_backward", "channel_gate",
    "conv_backward",
    "gate_grads", "gated_stats", "input_grad", "pool", "spatial_backward", "spatial_logits", "spatial_norm_gate",
    "stats_grad",
]
