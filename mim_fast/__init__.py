"""mim_fast: fused kernels for MIM (Multimodal Information Modulation, Zeng et al., IEEE TMM 2023).

    purify_gate(x, logits, ...)  -> (pooled, penalty, gate)       the UPN's hard-concrete gate + pooling
    kgs_loss(yk, yu, y, h, ...)  -> (loss, intra, inter, masked, unmasked, teacher, alpha)
    kgs_loss_with_heads(h_masked, h_unmasked, weight, bias, y, ...)   the same, predictions from the heads
    philox_uniform(seed, offset, shape, device)                  the counter-based gate noise

The math is shared/SPEC.md; ``mim_fast.reference`` is its eager implementation (the "torch" backend).
"""
from . import _ext, reference
from ._ext import build_info, cpu_cache_info, empty_cpu_cache
from ._types import KGSLossOutput, PurifyGateOutput
from .ops import (BACKENDS, BackendUnavailableError, available_backends, backend_status, gate_noise, kgs_loss,
                  kgs_loss_with_heads, philox_uniform, purify_gate)

from . import nn  # noqa: E402  (after the ops it builds on)

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
