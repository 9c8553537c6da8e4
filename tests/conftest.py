"""Test-session set-up: without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The
variable must be set before ``triton.jit`` decorates the kernels, whichever test imports them first.
``impl="auto"`` is not calibrated by timing (``CBAM_CALIBRATE=0``) unless a test turns it on, so that
which path a test runs never depends on the machine's load (``tests/ops/test_calibration.py``)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("CBAM_CALIBRATE", "0")
