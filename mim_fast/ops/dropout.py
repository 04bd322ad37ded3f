"""``mim_fast.dropout``: counter-based dropout keyed by (seed, stream, global sample index, element).

The mask is a pure function of its key, never of a generator's state or of which other samples share the
batch: a sample draws the same mask whichever batch, position, process or device it lands in. That makes
training independent of the number of processes (each rank drops exactly what a single process would
for its samples), and lets the backward regenerate the mask instead of storing it (as flash-attention
replays its dropout from a saved seed and offset).
"""
from typing import Optional

import torch

from .. import reference
from . import _checks
from .philox import philox_counters

__all__ = ["dropout", "dropout_key"]

_M64 = 2**64 - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def dropout_key(seed: int, stream: int) -> int:
    """The Philox key of dropout stream ``stream`` under ``seed``: splitmix64(splitmix64(seed) ^ stream) >> 1,
    in [0, 2^63). Hashed, not added, so that nearby seeds or streams (seed + 1, stream + 1) never share a
    key, and no key equals a gate-noise key seed + i (mim_fast.nn.MIM keys modality i's gate noise by
    seed + i) except by a 2^-63 coincidence."""
    return _splitmix64(_splitmix64(seed) ^ stream) >> 1


def dropout(x: torch.Tensor, p: float = 0.5, *, seed: Optional[int] = None, index: Optional[torch.Tensor] = None,
            batch_dim: int = 0, stream: int = 0, training: bool = True, backend: str = "auto") -> torch.Tensor:
    """Counter-based dropout: ``y = x · m`` with ``m[e] = 1[u[e] ≥ p] / (1 − p)`` (rounded to x's dtype, as
    torch's dropout scales its mask) and

        u[e] = philox_uniform(dropout_key(seed, stream), index[b]·S + j)

    where b is e's coordinate along ``batch_dim``, S = x.numel() / B the elements per sample and j the
    row-major position of e within its sample (the other dims in order). P(keep) = P(u ≥ p) = 1 − p to
    within 2^-31 (u is a multiple of 2^-31 in [0, 1)).

    Args:
        x: any shape with a batch dimension ``batch_dim``; float16, bfloat16, float32 or float64.
        p: drop probability in [0, 1]. p = 0 or ``training=False`` returns x itself; p = 1 zeroes x.
        seed: Python int in [0, 2^63); None draws one from torch's default CPU generator (so
            ``torch.manual_seed`` makes the call repeatable, as with torch's dropout).
        index: (B,) integer tensor of global sample indices on x's device (default ``arange(B)``). Two
            calls that give a sample the same (seed, stream, index, S) drop the same elements.
        batch_dim: the dimension of x that indexes samples.
        stream: separates independent dropout sites that share a seed (mim_fast.nn.Dropout's ``stream``).
        backend: where the Philox draws run: "auto", "torch", "cpu", "cuda" or "triton"; every backend
            draws the same bits, so the mask is bit-identical on each.

    Returns a new tensor of x's shape and dtype (contiguous). Differentiable: the backward regenerates m
    from (seed, stream, index) and multiplies the incoming gradient by it — nothing x-sized is saved, only
    ``index``. Numerics: NaN/inf in a dropped element give NaN (x·0), as torch's dropout.

    Cost (not yet fused; issue 13): one int64 counter, one float32 uniform and one mask value per element
    are materialized, i.e. ~3 passes over x-sized temporaries besides reading x and writing y; the same
    again in the backward.
    """
    _checks.float_tensor("x", x)
    p = _checks.real("p", p, ge=0.0)
    if p > 1.0:
        raise ValueError("p must be a drop probability in [0, 1]; got %r" % p)
    if not isinstance(training, bool):
        raise TypeError("training must be a bool; got %s" % type(training).__name__)
    if not training or p == 0.0:
        return x
    if isinstance(batch_dim, bool) or not isinstance(batch_dim, int) or not -x.dim() <= batch_dim < x.dim():
        raise ValueError("batch_dim must be an int in [-%d, %d) for x of shape %s; got %r"
                         % (x.dim(), x.dim(), _checks.shape_str(x.shape), batch_dim))
    batch_dim %= x.dim()
    B = x.shape[batch_dim]
    _checks.nonneg_int("stream", stream)
    if seed is None:
        seed = reference.draw_seed()
    _checks.nonneg_int("seed", seed)
    if index is None:
        index = torch.arange(B, device=x.device)
    else:
        _checks.tensor("index", index, ndim=1, layout="(B,)")
        if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            raise TypeError("index must be an integer tensor; got %s" % index.dtype)
        _checks.same_shape("index", index, (B,), "(B,) to match x's batch_dim %d of" % batch_dim, x.shape)
        _checks.same_device("x", x, index=index)
    if B and _checks.can_inspect_values(index):
        per_sample = x.numel() // B
        if int(index.min()) < 0 or (int(index.max()) + 1) * per_sample > 2**63:
            raise ValueError("index must lie in [0, 2^63 / S) with S = %d elements per sample; got min %d, max %d"
                             % (per_sample, int(index.min()), int(index.max())))
    if backend not in ("auto", "torch", "cpu", "cuda", "triton"):
        raise ValueError("backend must be 'auto', 'torch', 'cpu', 'cuda' or 'triton'; got %r" % (backend,))
    return torch.ops.mim_fast.dropout(x, index, seed, stream, p, batch_dim, backend)


def _scaled_mask(shape, dtype, device, index, seed, stream, p, batch_dim, backend) -> torch.Tensor:
    """m (``shape``, ``dtype``): 1[u ≥ p]/(1 − p) with u keyed as :func:`dropout` documents."""
    moved = list(shape)
    B = moved.pop(batch_dim)
    per_sample = 1
    for s in moved:
        per_sample *= s
    counters = index.to(torch.int64)[:, None] * per_sample + torch.arange(per_sample, dtype=torch.int64,
                                                                            device=device)
    u = philox_counters(dropout_key(seed, stream), counters, backend=backend)  # (B, S) float32
    scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    m = (u >= p).to(dtype) * scale
    return m.reshape([B] + moved).movedim(0, batch_dim)


# The op is a torch.library custom op so that autograd saves only ``index`` (the backward is the same op
# applied to the gradient: it regenerates the mask), and torch.compile / export see one opaque call. An
# ``int`` argument of a Python custom op is a SymInt: a seed that changes every epoch does not make
# torch.compile recompile (after the first change marks it dynamic).
@torch.library.custom_op("mim_fast::dropout", mutates_args=())
def _dropout_op(x: torch.Tensor, index: torch.Tensor, seed: int, stream: int, p: float, batch_dim: int,
                backend: str) -> torch.Tensor:
    m = _scaled_mask(tuple(x.shape), x.dtype, x.device, index, seed, stream, p, batch_dim, backend)
    return (x * m).contiguous()


@_dropout_op.register_fake
def _dropout_fake(x, index, seed, stream, p, batch_dim, backend):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _setup_context(ctx, inputs, output):
    x, index, seed, stream, p, batch_dim, backend = inputs
    ctx.save_for_backward(index)
    ctx.key = (seed, stream, p, batch_dim, backend)


def _backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return (torch.ops.mim_fast.dropout(grad, index, *ctx.key),) + (None,) * 6


_dropout_op.register_autograd(_backward, setup_context=_setup_context)
