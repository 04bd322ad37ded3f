"""What every Triton launcher of mim_fast shares."""
import contextlib

import torch

from ..ops import _backends


def check_tensors(where: str, *tensors) -> torch.device:
    """The one device every tensor handed to a Triton launcher is on (None entries are skipped).

    Compiled Triton kernels dereference their pointers on the GPU: a CPU tensor (or one on another GPU)
    would be an illegal address that aborts the process, so it is refused here with a message instead.
    CPU tensors are accepted only under the interpreter (TRITON_INTERPRET=1).
    """
    present = [t for t in tensors if t is not None]
    device = present[0].device
    for t in present:
        if t.device != device:
            raise ValueError("%s: every tensor must be on one device; got %s and %s" % (where, device, t.device))
    if device.type == "cpu" and not _backends.triton_interpreting():
        raise ValueError("%s: compiled Triton kernels take CUDA tensors, got CPU tensors (CPU tensors run only "
                         "under TRITON_INTERPRET=1)" % where)
    if device.type not in ("cpu", "cuda"):
        raise ValueError("%s: Triton kernels do not run on %s tensors" % (where, device.type))
    return device


def device_guard(device: torch.device):
    """Make ``device`` current while a kernel is launched on its tensors.

    Triton launches on the *current* CUDA device and stream: tensors on cuda:1 while cuda:0 is current
    would be read through cuda:0's context (an illegal address). The C++ ops guard with
    c10::cuda::CUDAGuard; this is the same for the Triton ones. CPU tensors (the interpreter): no-op.
    """
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
