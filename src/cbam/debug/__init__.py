"""Debugging tools for any ``nn.Module``: shape traces, gradient checks, mixed-precision checks.

>>> import torch, cbam, cbam.debug
>>> trace = cbam.debug.trace_shapes(cbam.CBAM(16), torch.randn(2, 16, 8, 8))
>>> [row.outputs[0] for row in trace if row.path.endswith(":gate")]
[(2, 16, 1, 1), (2, 1, 8, 8)]
"""

from .amp import AmpReport, NonFinite, check_amp
from .gradients import CheckResult, GradientReport, TensorError, check_gradients
from .trace import ShapeTrace, TraceRow, trace_shapes

__all__ = [
    "AmpReport", "CheckResult", "GradientReport", "NonFinite", "ShapeTrace", "TensorError", "TraceRow", "check_amp",
    "check_gradients", "trace_shapes",
]
