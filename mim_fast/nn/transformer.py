"""The audio/vision Transformer encoder of MIM (SPEC §3) with counter-based dropout.

Computes what ``torch.nn.TransformerEncoder`` of pre-norm ``TransformerEncoderLayer``s (ReLU, one dropout
rate for attention weights, feed-forward and residual branches) plus a final LayerNorm computes, with the
same parameter names, shapes and initialisation (a state_dict of the torch modules loads strictly), but
every dropout is a :class:`~mim_fast.nn.Dropout`: its mask is keyed by (seed, site, global sample index,
element) instead of drawn from torch's generator, so a sample is dropped the same way whichever batch or
process it is in (multi-process training is then independent of the number of processes), and the
backward regenerates the masks instead of storing them.
"""
import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import Dropout

__all__ = ["TransformerEncoder", "TransformerEncoderLayer"]


class TransformerEncoderLayer(nn.Module):
    """Pre-norm encoder layer, sequence-first: x (T, B, D) →
    x + drop₁(SA(norm1(x))), then + drop₂(linear2(drop(relu(linear1(norm2(x)))))).

    SA is multi-head self-attention (``heads`` heads of D/heads) whose attention probabilities are also
    dropped (as torch's MultiheadAttention(dropout=p) does). ``self_attn`` is a torch MultiheadAttention
    used only as the holder of ``in_proj_weight``/``in_proj_bias``/``out_proj`` (its forward is not
    called), so names and initialisation are torch's.
    """

    def __init__(self, d_model: int, heads: int, dim_feedforward: int, dropout: float = 0.1) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError("d_model must be divisible by heads; got d_model=%d, heads=%d" % (d_model, heads))
        self.heads = heads
        # Created in torch's TransformerEncoderLayer order: the same RNG state gives the same weights.
        self.self_attn = nn.MultiheadAttention(d_model, heads, dropout=dropout)
        self.attn_dropout = Dropout(dropout, batch_dim=0)  # on the (B, H, T, T) attention probabilities
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = Dropout(dropout, batch_dim=1)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = Dropout(dropout, batch_dim=1)
        self.dropout2 = Dropout(dropout, batch_dim=1)

    def _attention(self, h: torch.Tensor, pad: Optional[torch.Tensor], seed, index) -> torch.Tensor:
        T, B, D = h.shape
        H = self.heads
        qkv = F.linear(h, self.self_attn.in_proj_weight, self.self_attn.in_proj_bias)  # (T, B, 3D)
        q, k, v = (t.reshape(T, B, H, D // H).permute(1, 2, 0, 3) for t in qkv.chunk(3, dim=-1))  # (B, H, T, d)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(D // H))  # (B, H, T, T)
        if pad is not None:
            scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
        probs = self.attn_dropout(torch.softmax(scores, dim=-1), seed, index)
        out = torch.matmul(probs, v).permute(2, 0, 1, 3).reshape(T, B, D)
        return self.self_attn.out_proj(out)

    def forward(self, x: torch.Tensor, pad: Optional[torch.Tensor] = None, seed: Optional[int] = None,
                index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (T, B, D); pad: optional (B, T) bool, True where a step is padding (never attended to; a
        sample must keep at least one step); seed, index: the dropout keys (see mim_fast.nn.Dropout)."""
        x = x + self.dropout1(self._attention(self.norm1(x), pad, seed, index), seed, index)
        ff = self.linear2(self.dropout(F.relu(self.linear1(self.norm2(x))), seed, index))
        return x + self.dropout2(ff, seed, index)


class TransformerEncoder(nn.Module):
    """``layers`` copies of one :class:`TransformerEncoderLayer` (deep copies of one initialised layer, as
    torch's TransformerEncoder makes them) and a final LayerNorm ``norm``. x (T, B, D) → (T, B, D)."""

    def __init__(self, layer: TransformerEncoderLayer, layers: int, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(layers))
        self.norm = norm

    def forward(self, x: torch.Tensor, pad: Optional[torch.Tensor] = None, seed: Optional[int] = None,
                index: Optional[torch.Tensor] = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, pad, seed, index)
        return self.norm(x)
