"""Cost tools for any ``nn.Module``: parameters and FLOPs (``cost``), latency and memory (``benchmark``).

>>> import torch, cbam, cbam.profile
>>> report = cbam.profile.cost(cbam.CBAM(64), torch.randn(2, 64, 8, 8))
>>> report.params, report.attention_params
(610, 610)
"""

from .benchmark import BenchmarkReport, BenchmarkRow, benchmark, interleaved_medians, saved_bytes
from .cost import CostReport, ModuleCost, cost, is_attention

__all__ = [
    "BenchmarkReport", "BenchmarkRow", "CostReport", "ModuleCost", "benchmark", "cost", "interleaved_medians",
    "is_attention", "saved_bytes",
]
