"""Benchmark setup: without a GPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1), which
must be set before triton compiles anything; the Triton cases then only run at toy sizes."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
