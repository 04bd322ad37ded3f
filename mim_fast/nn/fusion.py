"""Multimodal fusion heads of MIM (SPEC §3): the purified representations k_m (B, D) of the M
modalities → one prediction (B,).

* "multiplication" (MIM's default): C_f(tanh(W(k_1 ⊙ … ⊙ k_M)))
* "add":                            C_f(k_1 + … + k_M)
* "concat":                         C_f(tanh(W[k_1; …; k_M]))
* "tensor" (tensor fusion, Zadeh et al. 2017): C_f(tanh(W vec(⊗_m [k_m; 1]))) — the outer product of the
  1-augmented vectors keeps unimodal, bimodal and trimodal interactions; its width is Π(D + 1), so it is
  meant for small D (80 → 531 441 for three modalities).
"""
import math
from typing import Sequence

import torch
from torch import nn

__all__ = ["Fusion", "FUSIONS"]

FUSIONS = ("multiplication", "add", "concat", "tensor")


class Fusion(nn.Module):
    def __init__(self, d_model: int, n_modalities: int = 3, kind: str = "multiplication"):
        super().__init__()
        if kind not in FUSIONS:
            raise ValueError("fusion must be one of %s; got %r" % (", ".join(map(repr, FUSIONS)), kind))
        self.kind = kind
        if kind == "multiplication":
            self.linear = nn.Linear(d_model, d_model)
        elif kind == "concat":
            self.linear = nn.Linear(d_model * n_modalities, d_model)
        elif kind == "tensor":
            self.linear = nn.Linear(int(math.prod([d_model + 1] * n_modalities)), d_model)
        self.classifier = nn.Linear(d_model, 1)

    def forward(self, ks: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.kind == "multiplication":
            prod = ks[0]
            for k in ks[1:]:
                prod = prod * k
            h = torch.tanh(self.linear(prod))
        elif self.kind == "add":
            h = torch.stack(list(ks)).sum(0)
        elif self.kind == "concat":
            h = torch.tanh(self.linear(torch.cat(list(ks), dim=-1)))
        else:
            ones = ks[0].new_ones(ks[0].shape[0], 1)
            outer = torch.cat([ks[0], ones], dim=-1)
            for k in ks[1:]:
                outer = (outer[:, :, None] * torch.cat([k, ones], dim=-1)[:, None, :]).flatten(1)
            h = torch.tanh(self.linear(outer))
        return self.classifier(h).squeeze(-1)

    def extra_repr(self) -> str:
        return "kind=%r" % self.kind
