"""Result types of the public ops (shared by every backend)."""
from typing import NamedTuple

import torch


class PurifyGateOutput(NamedTuple):
    """What :func:`mim_fast.purify_gate` returns.

    pooled:  (B, D), dtype of x. Gated mean pooling (1/T)·Σ_t φ(x[t]·z[t]) (1/lengths[b] with lengths).
    penalty: scalar, dtype of logits. Mean expected-L0 penalty over the (valid) steps.
    gate:    (B, T), dtype of logits, values exactly 0 or 1 (NaN where the logit or noise is NaN): the
             forward value of the gate (no gradient).
    """

    pooled: torch.Tensor
    penalty: torch.Tensor
    gate: torch.Tensor


class KGSLossOutput(NamedTuple):
    """What :func:`mim_fast.kgs_loss` returns.

    loss, intra, inter, masked, unmasked: scalars (reduction "mean"/"sum") or (B,) (reduction "none"),
        each separately differentiable; loss = w_intra·intra + w_inter·inter + w_masked·masked
        + w_unmasked·unmasked.
    teacher: (B,) int64, the teacher modality of each sample, -1 where the lowest error is tied.
    alpha:   (M, B), the Adjuster weights (Σ_m alpha[m, i] = M), no gradient.
    """

    loss: torch.Tensor
    intra: torch.Tensor
    inter: torch.Tensor
    masked: torch.Tensor
    unmasked: torch.Tensor
    teacher: torch.Tensor
    alpha: torch.Tensor
