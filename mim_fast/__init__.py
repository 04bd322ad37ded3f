"""mim_fast: fused kernels for MIM (Multimodal Information Modulation, Zeng et al., IEEE TMM 2023).

    purify_gate(x, logits, ...)  -> (pooled, penalty, gate)       the UPN's hard-concrete gate + pooling
    kgs_loss(yk, yu, y, h, ...)  -> (loss, intra, inter, masked, unmasked, teacher, alpha)
    kgs_loss_with_heads(h_masked, h_unmasked, weight, bias, y, ...)   the same, predictions from the heads
    philox_uniform(seed, offset, shape, device)                  the counter-based gate noise
    load_exported(path)                                          torch.export.load with mim_fast's ops and types
    dropout(x, p, seed=, index=, batch_dim=)                     dropout keyed by (seed, global sample index)

The math is docs/math.md; ``mim_fast.reference`` is its eager implementation (the "torch" backend).

The public names load on first use (PEP 562): ``import mim_fast`` alone imports neither torch nor the
extension, so ``mim-fast --help`` answers at once. The first access to any of them imports torch, loads
the compiled extension (which registers the ``torch.ops.mim_fast`` kernels; a warning says so when it is
missing) and the ops. Code that calls ``torch.ops.mim_fast.*`` directly imports ``mim_fast.ops`` first.
"""
import importlib

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
    "dropout",
    "dropout_key",
    "empty_cpu_cache",
    "gate_noise",
    "kgs_loss",
    "kgs_loss_with_heads",
    "load_exported",
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
                                 "dropout", "dropout_key", "gate_noise", "kgs_loss", "kgs_loss_with_heads",
                                 "philox_uniform", "purify_gate")},
}
_SUBMODULES = ("nn", "reference", "_ext")


def _load() -> None:
    """Import the whole public API at once (the extension first, as the eager package did)."""
    g = globals()
    for sub in ("._ext", ".reference", ".ops", ".nn"):
        importlib.import_module(sub, __name__)
    for name, module in _LAZY.items():
        g[name] = getattr(importlib.import_module(module, __name__), name)


def load_exported(path, **kwargs):
    """``torch.export.load(path, **kwargs)`` of a program that uses mim_fast (its ops or modules), after
    importing what the program needs: mim_fast's ops (the compiled extension and the Python custom ops) and
    its output types (registered for serialization in mim_fast.nn and mim_fast._types). Without mim_fast,
    ``import mim_fast.nn`` before ``torch.export.load`` does the same."""
    _load()
    import torch

    return torch.export.load(path, **kwargs)


def __getattr__(name):
    if name in _SUBMODULES:  # also what `from .. import _ext` in a submodule asks for: import just that one
        return importlib.import_module("." + name, __name__)
    if name in _LAZY:
        _load()
        return globals()[name]
    raise AttributeError("module 'mim_fast' has no attribute %r" % name)


def __dir__():
    return sorted(set(globals()) | set(__all__))
