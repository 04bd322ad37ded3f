"""``mim_fast.philox_uniform``: the counter-based noise every backend draws gate noise from."""
import math
from typing import Sequence

import torch

from .. import _ext, reference
from . import _backends, _checks

__all__ = ["philox_uniform", "gate_noise"]


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


def gate_noise(seed: int, index: torch.Tensor, T: int, *, backend: str = "auto") -> torch.Tensor:
    """Per-sample gate noise keyed by a global sample index: u[b, t] = philox_uniform(seed, index[b]·T + t).

    A sample draws the same noise whichever batch, position or device it lands in (the batch order of
    a step does not matter); pass it to ``purify_gate(noise=...)``. With ``index = offset/T + arange(B)``
    this equals the op's own seeded noise. index: (B,) integer tensor of non-negative sample indices;
    returns float32 (B, T) on index's device. backend: "auto", "torch", "cpu" or "cuda".
    """
    _checks.nonneg_int("seed", seed)
    _checks.tensor("index", index, ndim=1, layout="(B,)")
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise TypeError("index must be an integer tensor; got %s" % index.dtype)
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError("T must be an int >= 1; got %r" % (T,))
    if _checks.can_inspect_values(index) and index.numel() and (int(index.min()) < 0 or
                                                                (int(index.max()) + 1) * T > 2**63):
        raise ValueError("index must lie in [0, 2^63 / T); got min %d, max %d" % (int(index.min()), int(index.max())))
    counters = index.to(torch.int64)[:, None] * T + torch.arange(T, dtype=torch.int64, device=index.device)
    if backend not in ("auto", "torch", "cpu", "cuda"):
        raise ValueError("backend must be 'auto', 'torch', 'cpu' or 'cuda'; got %r" % (backend,))
    status = _backends.backend_status("philox_uniform", index.device, (torch.float32,))
    if backend in ("cpu", "cuda") and status[backend]:
        raise _backends.BackendUnavailableError("gate_noise: backend %r cannot run here: %s" % (backend, status[backend]))
    native = index.device.type if index.device.type in ("cpu", "cuda") else None
    if backend != "torch" and native and status[native] is None:
        return torch.ops.mim_fast.philox_uniform(counters, seed)
    return reference.philox_uniform_counters(seed, counters)


def _extension_impl(seed, offset, shape, device):
    counters = torch.arange(math.prod(shape), dtype=torch.int64, device=device) + offset
    return torch.ops.mim_fast.philox_uniform(counters, seed).reshape(shape)


@torch.library.custom_op("mim_fast::philox_uniform_triton", mutates_args=())
def _philox_uniform_triton(counters: torch.Tensor, seed: int) -> torch.Tensor:
    """Triton's u[i] = tl.rand(seed, counters[i]) for int64 counters of any shape (a custom op, as the
    other backends', so torch.compile traces it with no graph break on any device)."""
    from ..triton import philox as triton_philox

    return triton_philox.philox_uniform_counters(counters, seed)


@_philox_uniform_triton.register_fake
def _philox_uniform_triton_fake(counters, seed):
    return torch.empty_like(counters, dtype=torch.float32)


def _triton_impl(seed, offset, shape, device):
    counters = torch.arange(math.prod(shape), dtype=torch.int64, device=device) + offset
    return torch.ops.mim_fast.philox_uniform_triton(counters, seed).reshape(shape)


if _ext.C is not None:  # the schema lives in the extension

    @torch.library.register_fake("mim_fast::philox_uniform")
    def _philox_uniform_fake(counters, seed):
        return torch.empty_like(counters, dtype=torch.float32)


_backends.register("philox_uniform", "torch", reference.philox_uniform, _backends.always)
_backends.register("philox_uniform", "cpu", _extension_impl, _backends.needs_cpu_extension)
_backends.register("philox_uniform", "cuda", _extension_impl, _backends.needs_cuda_extension)
_backends.register("philox_uniform", "triton", _triton_impl, _backends.needs_triton)
