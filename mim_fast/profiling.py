"""Named ranges for profiling the MIM model and its training step (what ``mim-fast profile`` reads).

The model and the step mark their parts with :func:`named_range`. The names, one scheme throughout
("mim/<part>" or "mim/<part>/<modality>"; the parts do not nest, so their times add up):

    mim/gate_noise             the gates' Philox noise for the batch (train.py)
    mim/encoder/<modality>     Conv1d (+ Transformer), and the unpurified pooling u_m
    mim/mask_learner/<m>       BiLSTM, pooler3 and imp_ratio: the gate logits g_m
    mim/gate/<m>               the purification gate op (mim_fast.purify_gate): k_m and P_m
    mim/heads                  C_m(u_m), C_m(k_m) and stacking the per-modality outputs (entered per modality)
    mim/fusion                 the fusion head
    mim/kgs_loss               the KGS loss op (mim_fast.kgs_loss)
    mim/task_loss              L_cls and the two loss sums of the two-phase update
    mim/backward               both gradient sets (torch.autograd.grad)
    mim/optimizer              the Adam steps (and the GradScaler)

A range is a ``torch.profiler.record_function`` (visible in torch.profiler / Chrome traces), plus an NVTX
range (visible in Nsight Systems) where NVTX is on. Ranges cost nothing unless asked for:
:func:`named_range` returns a shared null context unless profiling is on, i.e. inside
``with profiling.enabled():`` or while a torch profiler is running. (A record_function with no profiler
running still costs about 10 µs on the 2-core CPU VM, ~20 of them per step.) Under torch.compile they
are never emitted, so compiled regions keep their full graphs.

NVTX (CUDA only): ``profiling.enabled(nvtx=True)``, or ``MIM_FAST_NVTX=1`` in the environment, e.g.
``MIM_FAST_NVTX=1 nsys profile -t cuda,nvtx mim-fast train``. The switches are process-wide, not per thread.
"""
import contextlib
import os

import torch

__all__ = ["named_range", "enabled", "is_enabled", "RANGE_PREFIX"]

RANGE_PREFIX = "mim/"

_enabled = False
_nvtx = os.environ.get("MIM_FAST_NVTX", "0") not in ("", "0")
_NULL = contextlib.nullcontext()
_profiler_running = getattr(torch.autograd, "_profiler_enabled", lambda: False)


class _Range:
    __slots__ = ("name", "nvtx", "rf")

    def __init__(self, name: str, nvtx: bool):
        self.name = name
        self.nvtx = nvtx
        self.rf = torch.profiler.record_function(name)

    def __enter__(self):
        self.rf.__enter__()
        if self.nvtx:
            torch.cuda.nvtx.range_push(self.name)
        return self

    def __exit__(self, *exc):
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        return self.rf.__exit__(*exc)


def is_enabled() -> bool:
    """Whether :func:`named_range` emits ranges now (and not under torch.compile)."""
    return (_enabled or _nvtx or _profiler_running()) and not torch.compiler.is_compiling()


def named_range(name: str):
    """A context manager marking ``name`` in profiles; a no-op unless profiling is on (see the module)."""
    if torch.compiler.is_compiling() or not (_enabled or _nvtx or _profiler_running()):
        return _NULL
    return _Range(name, _nvtx and torch.cuda.is_available())


@contextlib.contextmanager
def enabled(on: bool = True, *, nvtx=None):
    """Turn the named ranges on inside the block (``on=False``: only while a torch profiler runs);
    ``nvtx``: also push NVTX ranges (CUDA only; None keeps the current setting). Restores the previous
    settings on exit."""
    global _enabled, _nvtx
    saved = _enabled, _nvtx
    _enabled = bool(on)
    if nvtx is not None:
        _nvtx = bool(nvtx) and bool(on)
    try:
        yield
    finally:
        _enabled, _nvtx = saved
