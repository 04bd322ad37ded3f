"""``mim_fast.kgs_loss``: SPEC §2, the per-sample Knowledge Guidance Scheme loss."""
from typing import Sequence

import torch

from .. import reference
from .._types import KGSLossOutput
from . import _backends, _checks

__all__ = ["kgs_loss"]

REDUCTIONS = ("mean", "sum", "none")


def kgs_loss(
    yk: torch.Tensor,
    yu: torch.Tensor,
    y: torch.Tensor,
    h: torch.Tensor,
    *,
    per_sample: bool = True,
    kd_scale: float = 10.0,
    kd_divide_T: bool = False,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    reduction: str = "mean",
    eps: float = 1e-12,
    backend: str = "auto",
) -> KGSLossOutput:
    """The KGS loss over M modalities (SPEC §2).

    Args:
        yk: (M, B) predictions from the purified (gated) representations, M ≥ 2.
        yu: (M, B) predictions from the unpurified representations.
        y:  (B,) labels.
        h:  (M, B, D) purified pooled representations (the gate's ``pooled``).
        per_sample: route every sample by its own errors (True) or by batch-mean errors (False, the
            released code).
        kd_scale: T_i = kd_scale·α[teacher, i] scales the KL (> 0).
        kd_divide_T: also divide the logits by T_i inside the softmaxes (Hinton-style); MIM: False.
        weights: (w_intra, w_inter, w_masked, w_unmasked) for ``loss``.
        reduction: "mean" (over samples), "sum", or "none" (every term per sample, (B,)).
        eps: ε in λ = r / (Σ r + ε) (> 0).
        backend: "auto", "torch", "cpu", "triton" or "cuda".

    Returns:
        ``KGSLossOutput(loss, intra, inter, masked, unmasked, teacher (B,) int64 with -1 for none,
        alpha (M, B))``; the five losses are separately differentiable.

    Numerics: float32 accumulation (float64 for float64 inputs); results in the promoted input dtype.
    Routing (which branch teaches which, α, the teacher) uses detached errors and is exact: ties give
    no transfer and no teacher. NaN in an input propagates to the terms it enters; a NaN error never
    wins a comparison, so a sample with a NaN error has no teacher.
    """
    _checks.float_tensor("yk", yk, ndim=2, layout="(M, B)")
    M, B = yk.shape
    if M < 2:
        raise ValueError("yk must have M >= 2 modalities (shape (M, B)); got M=%d" % M)
    _checks.nonempty("yk", {"B": B})
    _checks.float_tensor("yu", yu, ndim=2, layout="(M, B)")
    _checks.same_shape("yu", yu, (M, B), "(M, B) to match yk")
    _checks.float_tensor("y", y, ndim=1, layout="(B,)")
    _checks.same_shape("y", y, (B,), "(B,) to match yk (M, B)")
    _checks.float_tensor("h", h, ndim=3, layout="(M, B, D)")
    if tuple(h.shape[:2]) != (M, B):
        raise ValueError("h must have shape (M, B, D) = (%d, %d, D) to match yk; got %s"
                         % (M, B, _checks.shape_str(h.shape)))
    _checks.nonempty("h", {"D": h.shape[2]})
    _checks.same_device("yk", yk, yu=yu, y=y, h=h)
    kd_scale = _checks.real("kd_scale", kd_scale, gt=0.0)
    eps = _checks.real("eps", eps, gt=0.0)
    _checks.choice("reduction", reduction, REDUCTIONS)
    try:
        weights = tuple(weights)
    except TypeError:
        raise TypeError("weights must be a sequence of 4 numbers (intra, inter, masked, unmasked)") from None
    if len(weights) != 4:
        raise ValueError("weights must be 4 numbers (intra, inter, masked, unmasked); got %d" % len(weights))
    weights = tuple(_checks.real("weights[%d]" % i, w) for i, w in enumerate(weights))

    impl = _backends.select("kgs_loss", backend, yk.device, (yk.dtype, yu.dtype, y.dtype, h.dtype))
    return impl(yk, yu, y, h, per_sample=bool(per_sample), kd_scale=kd_scale, kd_divide_T=bool(kd_divide_T),
                weights=weights, reduction=reduction, eps=eps)


_backends.register("kgs_loss", "torch", reference.kgs_loss, _backends.always)
