"""Counter-based dropout as a module: :func:`mim_fast.dropout` with p, the batch dimension and a stream id
fixed, taking the step's (seed, global sample indices) in its forward."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import _checks
from ..ops.dropout import dropout

__all__ = ["Dropout", "assign_streams"]


class Dropout(nn.Module):
    """Dropout whose mask is a function of (seed, ``stream``, global sample index, element): see
    :func:`mim_fast.dropout`. In eval mode, or with p = 0, it returns its input.

    Args:
        p: drop probability in [0, 1].
        batch_dim: the dimension of the input that indexes samples (1 for sequence-first (T, B, D)).
        backend: where the Philox draws run ("auto", "torch", "cpu", "cuda", "triton"; same bits on each).

    ``stream`` (attribute, default 0) separates the dropout sites of a model that share one seed;
    :func:`assign_streams` numbers every Dropout of a model (mim_fast.nn.MIM does it at construction).

    ``keyed`` (attribute, default True): False makes it torch's own dropout (``F.dropout``: torch's
    generator, a mask stored for the backward, seed and index ignored) — the published code's, kept as the
    baseline a speed comparison runs against; not independent of the batch or the number of processes.
    """

    def __init__(self, p: float = 0.5, *, batch_dim: int = 0, backend: str = "auto") -> None:
        super().__init__()
        self.p = _checks.real("p", p, ge=0.0)
        if self.p > 1.0:
            raise ValueError("p must be a drop probability in [0, 1]; got %r" % p)
        if isinstance(batch_dim, bool) or not isinstance(batch_dim, int):
            raise TypeError("batch_dim must be an int; got %s" % type(batch_dim).__name__)
        self.batch_dim = batch_dim
        self.backend = backend
        self.stream = 0
        self.keyed = True

    def forward(self, x: torch.Tensor, seed: Optional[int] = None,
                index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: any shape, samples along ``batch_dim``; seed: Python int (None: drawn from torch's default
        generator); index: (B,) global sample indices (None: 0..B-1). Returns x's shape and dtype."""
        if not self.training or self.p == 0.0:
            return x
        if not self.keyed:
            return F.dropout(x, self.p, training=True)
        return dropout(x, self.p, seed=seed, index=index, batch_dim=self.batch_dim, stream=self.stream,
                       backend=self.backend)

    def extra_repr(self) -> str:
        return "p=%g, batch_dim=%d, stream=%d%s" % (self.p, self.batch_dim, self.stream,
                                                    "" if self.keyed else ", keyed=False")


def assign_streams(module: nn.Module) -> None:
    """Give every :class:`Dropout` inside ``module`` its own stream 0, 1, 2, ... in ``module.modules()``
    order, so that no two sites of one forward pass draw the same mask from one seed."""
    for stream, m in enumerate(m for m in module.modules() if isinstance(m, Dropout)):
        m.stream = stream
