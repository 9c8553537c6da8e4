"""``cbam.profile.cuda_check`` — the GPU correctness check — run here on the CPU through the Triton
interpreter (``TRITON_INTERPRET=1``, ``CBAM_ENGINE=triton``) at tiny shapes: the fused CBAM's output,
every gradient and the running statistics against the float64 reference, on poisoned allocations.
On a machine with CUDA the same cases run on the GPU. (tests/conftest.py sets TRITON_INTERPRET=1
without CUDA; tests/ops/test_triton_cbam.py covers the engine itself more widely: these cases check the
harness that benchmarks/gpu_check.sh runs.)"""

import math

import pytest
import torch

from cbam.ops.engines import ENGINES
from cbam.profile import cuda_check
from cbam.profile.cuda_check import Case

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    ENGINES["triton"].load() is None, reason="the Triton engine does not load (no triton, or the engine incomplete)")
SHAPE, SAMPLE = (2, 37, 5, 7), (1, 37, 5, 5)  # odd sizes, C no power of two; B = 1


def _params():
    found = [Case(SHAPE, "fp32", layout, "timm", variant, mode) for layout in cuda_check.LAYOUTS
             for variant, mode in (("plain", "train"), ("fold+residual", "train"), ("fold+residual", "eval"))]
    found += [Case(SHAPE, dtype, "channels_last", "timm", "fold+residual", mode, autocast=True)
              for dtype in ("bf16", "fp16") for mode in cuda_check.MODES]
    found += [Case(SHAPE, "bf16", "contiguous", "timm", "residual", "train", weights="input"),
              Case(SHAPE, "fp32", "contiguous", "official", "residual", "eval"),
              Case(SHAPE, "fp16", "contiguous", "paper", "fold", "train", autocast=True),
              Case(SAMPLE, "bf16", "contiguous", "official", "plain", "eval", autocast=True)]
    return found


@needs_triton
@pytest.mark.parametrize("case", _params(), ids=lambda case: case.name)
def test_fused_triton_matches_float64_reference(case):
    result = cuda_check.run_case(case, DEVICE, "triton")
    assert result.engine == "triton"
    assert result.ok, (result.problems, [c for c in result.comparisons if not c.ok])
    names = {c.name for c in result.comparisons}
    assert {"output", "grad x", "grad channel_att.fc1.weight", "grad spatial_att.conv.weight"} <= names
    if "residual" in case.variant:
        assert "grad residual" in names
    if case.variant.startswith("fold"):
        assert result.folded and {"grad input_norm.weight", "input_norm.running_mean"} <= names


def test_a_wrong_engine_or_value_fails_the_case(monkeypatch):
    """The check can fail: asking for an engine that does not run is a problem, and so is a wrong value."""
    case = Case((2, 6, 3, 4), "bf16", "contiguous", "timm", "residual", "train", autocast=True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    result = cuda_check.run_case(case, "cpu", "triton")  # triton runs on the CPU only interpreted: torch runs it
    assert not result.ok and result.problems == ["ran on engine 'torch', not 'triton'"]
    case = Case((2, 6, 3, 4), "fp32", "contiguous", "timm", "residual", "train")
    real = cuda_check._error
    monkeypatch.setattr(cuda_check, "_error", lambda got, want: real(got * 1.01 if got is not None else got, want))
    result = cuda_check.run_case(case, "cpu", "torch")
    assert not result.ok and not result.problems
    assert {c.name for c in result.comparisons if not c.ok} >= {"output", "grad x"}


def test_relu_kinks_are_excused_only_within_rounding():
    want = torch.tensor([0.0, 0.001, 2.0, 0.0, 0.5], dtype=torch.float64)
    got = torch.tensor([0.002, 0.0, 2.0, 0.0, 0.0])  # two flips near zero, one far from it
    mask, outside = cuda_check.relu_kinks(got, want, band=0.01)
    assert mask.tolist() == [True, True, False, False, True] and outside == 1


def test_distinct_half_values_leave_no_ties():
    x = cuda_check._distinct((3, 40, 9, 9), torch.bfloat16, torch.Generator().manual_seed(0))
    assert x.dtype == torch.bfloat16 and x.shape == (3, 40, 9, 9)
    rows = x.flatten(2)
    for b in range(3):
        assert all(row.unique().numel() == 81 for row in rows[b])
        assert all(col.unique().numel() == 40 for col in rows[b].T)
    assert 0.5 < rows.float().std().item() < 3


def test_error_is_max_difference_over_max_reference():
    want = torch.tensor([1.0, -4.0], dtype=torch.float64)
    assert cuda_check._error(torch.tensor([1.0, -3.0]), want) == pytest.approx(0.25)
    assert cuda_check._error(torch.tensor([math.nan, -4.0]), want) == math.inf
    assert cuda_check._error(None, None) == 0.0 and cuda_check._error(None, want) == math.inf


def test_report_summary_and_strict_json(tmp_path):
    case = Case((2, 6, 3, 4), "fp32", "contiguous", "timm", "plain", "eval")
    report = cuda_check.check("cpu", "torch", shapes=[case.shape], dtypes=["fp32"], layouts=["contiguous"],
                              presets=["timm"], variants=["plain"], modes=["eval"])
    assert report.ok and len(report.results) == 1
    assert str(report).splitlines()[0].endswith("PASS, 1/1 cases passed in " + f"{report.seconds:.1f} s")
    data = report.as_dict()
    assert data["ok"] is True and data["results"][0]["comparisons"][0]["ok"] is True
    status = cuda_check.main(["--device", "cpu", "--engine", "cpp", "--dtypes", "fp32", "--presets", "timm",
                              "--budget", "0", "--json", str(tmp_path / "check.json")])
    assert status == 1  # the budget is spent before the first case: reported, not passed
    assert "time budget" in (tmp_path / "check.json").read_text()


def test_cuda_check_without_cuda_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        cuda_check.check("cuda")
