"""Loads the compiled extension ``mim_fast._C`` if it is there; the package works without it.

Importing ``_C`` registers the C++ kernels of the ``torch.ops.mim_fast`` namespace. When it is missing
(not built, or built against another torch) only the pure-PyTorch and Triton backends are available,
and a single warning says why and how to build it.
"""
import warnings

import torch  # noqa: F401  (loads libtorch/libc10, which _C links against, before _C is imported)

__all__ = ["C", "load_error", "build_info", "cpu_cache_info", "empty_cpu_cache"]


class MimFastExtensionWarning(UserWarning):
    """The compiled extension mim_fast._C could not be loaded."""


def _load():
    try:
        from . import _C  # noqa: F401  (registers the torch.ops.mim_fast kernels)
    except (ImportError, OSError) as exc:
        return None, "%s: %s" % (type(exc).__name__, exc)
    return _C, None


C, load_error = _load()
if C is None:
    warnings.warn(
        "mim_fast: the compiled extension mim_fast._C is not available (%s); only the 'torch' and "
        "'triton' backends can run. Build it with `pip install -e . --no-build-isolation`." % load_error,
        MimFastExtensionWarning,
        stacklevel=2,
    )
elif C.build_info()["torch_version"] != torch.__version__:
    warnings.warn(
        "mim_fast._C was built against torch %s but torch %s is running; rebuild it with "
        "`pip install -e . --no-build-isolation` if its ops misbehave" % (C.build_info()["torch_version"], torch.__version__),
        MimFastExtensionWarning,
        stacklevel=2,
    )


def build_info():
    """How mim_fast._C was built (dict), or None when it is not loaded."""
    return None if C is None else dict(C.build_info())


def cpu_cache_info():
    """The CPU kernels' pool of recycled large output buffers (∂L/∂x, ∂L/∂h, saved h; ≥ 8 MiB each):
    dict of idle_bytes / idle_blocks kept for reuse, cap_bytes (MIM_FAST_CPU_CACHE_MB, default 512 MiB;
    0 = no pool), and hits / misses so far. None when the extension is not loaded."""
    return None if C is None else dict(C.cpu_cache_info())


def empty_cpu_cache() -> int:
    """Free the idle buffers of the CPU pool (like torch.cuda.empty_cache); returns the bytes freed.
    Buffers still held by live tensors return to the pool when those tensors die."""
    return 0 if C is None else int(C.cpu_cache_empty())
