"""What every Triton launcher of mim_fast shares."""
import contextlib

import torch


def device_guard(device: torch.device):
    """Make ``device`` current while a kernel is launched on its tensors.

    Triton launches on the *current* CUDA device and stream: tensors on cuda:1 while cuda:0 is current
    would be read through cuda:0's context (an illegal address). The C++ ops guard with
    c10::cuda::CUDAGuard; this is the same for the Triton ones. CPU tensors (the interpreter): no-op.
    """
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
