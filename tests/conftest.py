"""Test-session set-up: without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. The
variable must be set before ``triton.jit`` decorates the kernels, whichever test imports them first."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
