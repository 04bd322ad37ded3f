"""The Knowledge Guidance Scheme loss (SPEC §2) as a module: :func:`mim_fast.kgs_loss` with its options
fixed at construction, in the manner of torch's loss modules (``reduction=``, options as constructor
arguments, ``forward(input...)``)."""
from typing import Sequence

import torch
from torch import nn

from .._types import KGSLossOutput
from ..ops import _checks
from ..ops._backends import BACKENDS
from ..ops.kgs_loss import _options, kgs_loss

__all__ = ["KGSLoss"]


class KGSLoss(nn.Module):
    """MIM's KGS loss over M modalities: intra-modal transfer between each modality's masked and unmasked
    branch, inter-modal distillation from the per-sample best modality, and the two L1 task terms.

    Args (keyword-only, validated here so a bad value fails at construction, not at the first forward):
        per_sample: route every sample by its own errors (True, the paper's "sample variations") or by
            batch-mean errors (False, the released code).
        kd_scale: T_i = kd_scale·α[teacher, i] scales the KL (> 0).
        kd_divide_T: also divide the logits by T_i inside the softmaxes (Hinton-style); MIM: False.
        weights: (w_intra, w_inter, w_masked, w_unmasked) of ``loss``; the terms themselves are unweighted.
        reduction: "mean" (over samples), "sum", or "none" (every term per sample, (B,)).
        eps: ε in λ = r / (Σ r + ε) (> 0).
        backend: "auto" or one of ``mim_fast.BACKENDS``; availability is checked at each call.

    Shape: yk, yu (M, B), y (B,), h (M, B, D) → :class:`mim_fast.KGSLossOutput` (loss, intra, inter,
    masked, unmasked: () or (B,), each separately differentiable; teacher (B,) int64; alpha (M, B)).
    The module has no parameters. MIM's training step back-propagates ``masked`` (with the gate penalty)
    to the mask learners and ``unmasked + inter + intra`` to every parameter: use the separate terms.
    """

    def __init__(
        self,
        *,
        per_sample: bool = True,
        kd_scale: float = 10.0,
        kd_divide_T: bool = False,
        weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        reduction: str = "mean",
        eps: float = 1e-12,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("per_sample", per_sample), ("kd_divide_T", kd_divide_T)):
            if not isinstance(value, bool):
                raise TypeError("%s must be a bool; got %s" % (name, type(value).__name__))
        self.per_sample = per_sample
        self.kd_divide_T = kd_divide_T
        # the functional op's checks, so the module refuses at construction what a call would refuse
        self.kd_scale, self.eps, self.weights = _options(kd_scale, eps, reduction, weights)
        self.reduction = reduction
        self.backend = _checks.choice("backend", backend, ("auto",) + tuple(BACKENDS))

    def forward(self, yk: torch.Tensor, yu: torch.Tensor, y: torch.Tensor, h: torch.Tensor) -> KGSLossOutput:
        """The KGS loss of predictions yk (masked branch) and yu (unmasked branch), both (M, B), labels y
        (B,) and purified representations h (M, B, D). See :func:`mim_fast.kgs_loss` for numerics."""
        return kgs_loss(yk, yu, y, h, per_sample=self.per_sample, kd_scale=self.kd_scale,
                        kd_divide_T=self.kd_divide_T, weights=self.weights, reduction=self.reduction, eps=self.eps,
                        backend=self.backend)

    def extra_repr(self) -> str:
        return ("per_sample=%s, kd_scale=%g, kd_divide_T=%s, weights=%s, reduction=%r, eps=%g, backend=%r"
                % (self.per_sample, self.kd_scale, self.kd_divide_T, self.weights, self.reduction, self.eps,
                   self.backend))
