"""Unimodal encoders of MIM (SPEC §3): each maps a batch-first input sequence to a sequence-first
representation X (T, B, D) and the unpurified pooled representation u = mean_t φ(X[t]) (B, D).

* :class:`SequenceEncoder` — audio and vision, and text given as precomputed features (e.g. 768-d BERT
  features as in the MMSA pickles): Conv1d(d_in → D, k=3, no bias), then (audio/vision, as published) a
  Transformer encoder over time.
* :class:`WordEncoder` — text as token ids with a learned word embedding built from the dataset's
  vocabulary (for the MAG-BERT pickles when no BERT weights are at hand), then the same Conv1d.
* :class:`BertEncoder` — a Hugging Face BERT loaded from a local directory (never downloaded), then the
  Conv1d, as published.
"""
import math
from typing import NamedTuple, Optional

import torch
from torch import nn

from .._types import exportable
from .dropout import Dropout, assign_streams
from .transformer import TransformerEncoder, TransformerEncoderLayer

__all__ = ["EncoderOutput", "SequenceEncoder", "WordEncoder", "BertEncoder", "masked_mean", "activation_fn"]


@exportable
class EncoderOutput(NamedTuple):
    """sequence: (T, B, D) sequence-first, as MIM's mask learners take it; pooled: (B, D) = mean_t φ(X[t])."""

    sequence: torch.Tensor
    pooled: torch.Tensor


def activation_fn(name: str):
    return {"tanh": torch.tanh, "relu": torch.relu, "identity": lambda v: v}[name]


def masked_mean(x: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over time of x (T, B, D), over the first lengths[b] steps of each sample (0 for an empty one)."""
    if lengths is None:
        return x.mean(dim=0)
    T = x.shape[0]
    valid = (torch.arange(T, device=x.device)[:, None] < lengths.to(x.device)[None, :]).to(x.dtype)  # (T, B)
    return (x * valid[..., None]).sum(0) / lengths.to(device=x.device, dtype=x.dtype).clamp(min=1)[:, None]


class SinusoidalPositions(nn.Module):
    """The fixed sinusoidal position embedding of the Transformer (MulT, which MIM's encoders reuse)."""

    def __init__(self, dim: int, max_len: int = 4096):
        super().__init__()
        pos = torch.arange(max_len, dtype=torch.float32)[:, None]
        half = dim // 2
        freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / max(half - 1, 1))
        table = torch.zeros(max_len, dim)
        table[:, :half] = torch.sin(pos * freq)
        table[:, half:2 * half] = torch.cos(pos * freq)
        self.register_buffer("table", table, persistent=False)

    def forward(self, T: int) -> torch.Tensor:
        return self.table[:T]  # (T, dim)


class SequenceEncoder(nn.Module):
    """Conv1d(d_in → D, k=3, padding 1, no bias) over time, then optionally an L-layer Transformer encoder.

    As published: audio and vision use 3 layers, 5 heads, embedding scaled by √D plus sinusoidal positions,
    embedding dropout 0.2, residual/ReLU dropout 0.3, attention dropout 0.5 (this encoder, as torch's layer,
    has one rate for attention and residual; we use the residual one, 0.3), pre-norm layers and a final
    LayerNorm. Text features use the Conv1d only (layers=0). Every dropout is a counter-based
    :class:`~mim_fast.nn.Dropout` keyed by the forward's (seed, index): see :mod:`mim_fast.nn.transformer`.

    Input (B, T, d_in) batch-first; output X (T, B, D) and u (B, D). ``lengths`` (B,) mask the attention
    over padding and restrict the pooling to valid steps.
    """

    def __init__(self, d_in: int, d_model: int, *, layers: int = 3, heads: int = 5, activation: str = "tanh",
                 embed_dropout: float = 0.2, dropout: float = 0.3):
        super().__init__()
        if d_model % max(heads, 1) != 0 and layers > 0:
            raise ValueError("d_model must be divisible by heads; got d_model=%d, heads=%d" % (d_model, heads))
        self.proj = nn.Conv1d(d_in, d_model, kernel_size=3, padding=1, bias=False)
        self.activation = activation
        self.layers = layers
        if layers > 0:
            self.positions = SinusoidalPositions(d_model)
            self.embed_dropout = Dropout(embed_dropout, batch_dim=1)
            layer = TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model, dropout=dropout)
            self.transformer = TransformerEncoder(layer, layers, norm=nn.LayerNorm(d_model))
            assign_streams(self)  # (a model holding several encoders renumbers them all: MIM does)

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None, seed: Optional[int] = None,
                index: Optional[torch.Tensor] = None) -> EncoderOutput:
        """x (B, T, d_in); lengths (B,) or None; seed, index: the dropout keys of this forward (training
        mode only; see mim_fast.nn.Dropout: None draws a seed from torch's generator, index 0..B-1)."""
        h = self.proj(x.transpose(1, 2)).permute(2, 0, 1)  # (B, d_in, T) → (B, D, T) → (T, B, D)
        if self.layers > 0:
            T = h.shape[0]
            h = math.sqrt(h.shape[-1]) * h + self.positions(T)[:, None, :].to(h.dtype)
            h = self.embed_dropout(h, seed, index)
            pad = None
            if lengths is not None:
                pad = torch.arange(T, device=h.device)[None, :] >= lengths.to(h.device)[:, None]  # (B, T)
                pad = pad & ~pad.all(dim=1, keepdim=True)  # an empty sample attends to its padding, not to nothing
            h = self.transformer(h, pad, seed, index)
        return EncoderOutput(h, masked_mean(activation_fn(self.activation)(h), lengths))


class WordEncoder(nn.Module):
    """Token ids (B, T) → learned embedding (vocab_size, d_embed; id 0 = padding) → Conv1d → (T, B, D)."""

    def __init__(self, vocab_size: int, d_model: int, *, d_embed: int = 128, activation: str = "tanh"):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_embed, padding_idx=0)
        self.proj = SequenceEncoder(d_embed, d_model, layers=0, activation=activation)

    def forward(self, ids: torch.Tensor, lengths: Optional[torch.Tensor] = None, seed: Optional[int] = None,
                index: Optional[torch.Tensor] = None) -> EncoderOutput:
        return self.proj(self.embed(ids), lengths)


class BertEncoder(nn.Module):
    """A Hugging Face BERT from a local directory (``transformers`` required; nothing is downloaded), then
    Conv1d(hidden → D) as published. Input: token ids (B, T) with 0 as padding."""

    def __init__(self, path: str, d_model: int, *, activation: str = "tanh"):
        super().__init__()
        try:
            from transformers import AutoModel
        except ImportError as exc:  # an optional dependency
            raise ImportError("the BERT text encoder needs the `transformers` package") from exc
        self.bert = AutoModel.from_pretrained(path, local_files_only=True)
        self.proj = SequenceEncoder(self.bert.config.hidden_size, d_model, layers=0, activation=activation)

    def forward(self, ids: torch.Tensor, lengths: Optional[torch.Tensor] = None, seed: Optional[int] = None,
                index: Optional[torch.Tensor] = None) -> EncoderOutput:
        # BERT's own dropout draws from torch's generator (seed and index are not used): with BERT, training
        # is not independent of the number of processes.
        mask = (ids != 0).long()
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, hidden)
        return self.proj(hidden, lengths)
