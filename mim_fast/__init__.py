"""mim_fast: fused kernels for MIM (Multimodal Information Modulation, Zeng et al., IEEE TMM 2023).

    purify_gate(x, logits, ...)  -> (pooled, penalty, gate)       the UPN's hard-concrete gate + pooling
    kgs_loss(yk, yu, y, h, ...)  -> (loss, intra, inter, masked, unmasked, teacher, alpha)
    kgs_loss_with_heads(h_masked, h_unmasked, weight, bias, y, ...)   the same, predictions from the heads
    philox_uniform(seed, offset, shape, device)                  the counter-based gate noise

The math is docs/math.md; ``mim_fast.reference`` is its eager implementation (the "torch" backend).

``import mim_fast`` imports torch, loads the compiled extension (which registers the ``torch.ops.mim_fast``
kernels — what ``torch.export.load`` of a program using them needs; a warning says so when it is missing)
and the ops. Only the ``mim-fast`` command (and ``python -m mim_fast``) defers all that until a command
needs it (PEP 562: the names load on first use), so that ``mim-fast --help`` answers at once.
"""
import importlib
import os
import sys

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "KGSLossOutput",
    "PurifyGateOutput",
    "available_backends",
    "backend_status",
    "build_info",
    "cpu_cache_info",
    "empty_cpu_cache",
    "gate_noise",
    "kgs_loss",
    "kgs_loss_with_heads",
    "nn",
    "philox_uniform",
    "purify_gate",
    "reference",
    "__version__",
]

# public name -> the module that defines it (relative to this package)
_LAZY = {
    "build_info": "._ext", "cpu_cache_info": "._ext", "empty_cpu_cache": "._ext",
    "KGSLossOutput": "._types", "PurifyGateOutput": "._types",
    **{name: ".ops" for name in ("BACKENDS", "BackendUnavailableError", "available_backends", "backend_status",
                                 "gate_noise", "kgs_loss", "kgs_loss_with_heads", "philox_uniform", "purify_gate")},
}
_SUBMODULES = ("nn", "reference", "_ext")


def _load() -> None:
    """Import the whole public API at once (the extension first, as the eager package did)."""
    g = globals()
    for sub in ("._ext", ".reference", ".ops", ".nn"):
        importlib.import_module(sub, __name__)
    for name, module in _LAZY.items():
        g[name] = getattr(importlib.import_module(module, __name__), name)


def __getattr__(name):
    if name in _SUBMODULES:  # also what `from .. import _ext` in a submodule asks for: import just that one
        return importlib.import_module("." + name, __name__)
    if name in _LAZY:
        _load()
        return globals()[name]
    raise AttributeError("module 'mim_fast' has no attribute %r" % name)


def __dir__():
    return sorted(set(globals()) | set(__all__))


def _starting_the_command() -> bool:
    """True while the ``mim-fast`` script or ``python -m mim_fast`` is starting (sys.argv[0] is the
    script, or "-m" while Python locates the module it was asked to run)."""
    arg0 = sys.argv[0] if sys.argv else ""
    return os.path.basename(arg0) in ("mim-fast", "mim-fast.exe") or arg0 == "-m"


if not _starting_the_command():
    _load()
