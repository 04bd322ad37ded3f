"""``mim_fast.philox_uniform``: the counter-based noise every backend draws gate noise from."""
import math
from typing import Sequence

import torch

from .. import _ext, reference
from . import _backends, _checks

__all__ = ["philox_uniform"]


def philox_uniform(seed: int, offset: int, shape: Sequence[int], device=None, *, backend: str = "auto") -> torch.Tensor:
    """Counter-based uniform noise: float32 tensor of ``shape`` on ``device`` with
    ``u[idx] = tl.rand(seed, offset + linear_index(idx))`` (row-major linear index).

    Philox4x32 with 10 rounds, key = (lo32(seed), hi32(seed)), counter = (lo32(n), hi32(n), 0, 0) for
    the 64-bit counter n; the first word w becomes ``float32(v)·float32(4.6566127342e-10)`` with
    ``v = int32(w)``, ``~v`` if negative. Values lie in [0, 1) (0 is possible, 1 is not) and are
    bit-identical on every backend and to Triton's ``tl.rand(seed, n)``.

    seed, offset: Python ints in [0, 2^63); offset + numel must stay below 2^63.
    backend: "auto" | "torch" | "cpu" | "cuda" | "triton".
    """
    _checks.nonneg_int("seed", seed)
    _checks.nonneg_int("offset", offset)
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(shape)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError("shape must be a sequence of non-negative ints; got %r" % (shape,))
    if offset + math.prod(shape) > 2**63:
        raise ValueError("offset + numel(shape) must be <= 2^63; got offset=%d, numel=%d" % (offset, math.prod(shape)))
    device = torch.device("cpu") if device is None else torch.device(device)
    return _backends.select("philox_uniform", backend, device, (torch.float32,))(seed, offset, shape, device)


def _extension_impl(seed, offset, shape, device):
    counters = torch.arange(math.prod(shape), dtype=torch.int64, device=device) + offset
    return torch.ops.mim_fast.philox_uniform(counters, seed).reshape(shape)


def _triton_impl(seed, offset, shape, device):
    from ..triton import philox as triton_philox

    return triton_philox.philox_uniform(seed, offset, shape, device)


if _ext.C is not None:  # the schema lives in the extension

    @torch.library.register_fake("mim_fast::philox_uniform")
    def _philox_uniform_fake(counters, seed):
        return torch.empty_like(counters, dtype=torch.float32)


_backends.register("philox_uniform", "torch", reference.philox_uniform, _backends.always)
_backends.register("philox_uniform", "cpu", _extension_impl, _backends.needs_cpu_extension)
_backends.register("philox_uniform", "cuda", _extension_impl, _backends.needs_cuda_extension)
_backends.register("philox_uniform", "triton", _triton_impl, _backends.needs_triton)
