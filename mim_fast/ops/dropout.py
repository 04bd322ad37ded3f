"""``mim_fast.dropout``: counter-based dropout keyed by (seed, stream, global sample index, element).

The mask is a pure function of its key, never of a generator's state or of which other samples share the
batch: a sample draws the same mask whichever batch, position, process or device it lands in. That makes
training independent of the number of processes (each rank drops exactly what a single process would
for its samples), and lets the backward regenerate the mask instead of storing it (as flash-attention
replays its dropout from a saved seed and offset).
"""
import functools
from typing import Optional

import torch

from .. import _ext, reference
from . import _backends, _checks

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

        u[e] = word (j mod 4) of Philox4x32-10(dropout_key(seed, stream), index[b]·⌈S/4⌉ + ⌊j/4⌋),
               made uniform as philox_uniform makes its word 0

    where b is e's coordinate along ``batch_dim``, S = x.numel() / B the elements per sample and j the
    row-major position of e within its sample (the other dims in order): each Philox block gives four
    consecutive elements their uniforms (a quarter of the work of one block per element). P(keep) =
    P(u ≥ p) = 1 − p to within 2^-31 (u is a multiple of 2^-31 in [0, 1)).

    Args:
        x: any shape with a batch dimension ``batch_dim``; float16, bfloat16, float32 or float64.
        p: drop probability in [0, 1]. p = 0 or ``training=False`` returns x itself; p = 1 zeroes x.
        seed: Python int in [0, 2^63); None draws one from torch's default CPU generator (so
            ``torch.manual_seed`` makes the call repeatable, as with torch's dropout).
        index: (B,) integer tensor of global sample indices on x's device (default ``arange(B)``), in
            [0, 2^63 / ⌈S/4⌉). Two calls that give a sample the same (seed, stream, index, S) drop the
            same elements.
        batch_dim: the dimension of x that indexes samples.
        stream: separates independent dropout sites that share a seed (mim_fast.nn.Dropout's ``stream``).
        backend: "auto" (the fused kernel of x's device), "cpu", "cuda", "triton" (fused kernels), or
            "torch" (the composed reference); every backend draws the same bits, so the mask is
            bit-identical on each.

    Returns a new tensor of x's shape and dtype (contiguous). Differentiable: the backward regenerates m
    from (seed, stream, index) and multiplies the incoming gradient by it — nothing x-sized is saved, only
    ``index``. Numerics: NaN/inf in a dropped element give NaN (x·0), as torch's dropout.

    Cost: one fused pass — x read once, y written once, the uniforms drawn where they are used (C++ on
    CPU, CUDA, Triton); the same in the backward. ``backend="torch"`` runs the composed reference instead
    (counters, uniforms and the mask materialized), which gives the same bits. Host cost of the common
    call (a plain CPU/CUDA tensor, an explicit seed, int64 indices; eager): ~10 µs, with a C++ graph node
    (``_common_call``); anything else takes the checked path through the Python op (~100 µs on a 2-core VM).
    """
    if not torch.compiler.is_compiling():
        y = _common_call(x, p, seed, index, batch_dim, stream, training, backend)
        if y is not None:
            return y
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
        blocks = _blocks_per_sample(x.numel() // B)
        if int(index.min()) < 0 or (int(index.max()) + 1) * blocks > 2**63:
            raise ValueError("index must lie in [0, 2^63 / ⌈S/4⌉) with S = %d elements per sample; got min %d, max %d"
                             % (x.numel() // B, int(index.min()), int(index.max())))
    if backend not in ("auto", "torch", "cpu", "cuda", "triton"):
        raise ValueError("backend must be 'auto', 'torch', 'cpu', 'cuda' or 'triton'; got %r" % (backend,))
    return torch.ops.mim_fast.dropout(x, index, seed, stream, p, batch_dim, backend)


def _scaled_mask(shape, dtype, device, index, seed, stream, p, batch_dim) -> torch.Tensor:
    """m (``shape``, ``dtype``): 1[u ≥ p]/(1 − p) with u keyed as :func:`dropout` documents, composed of torch
    operations (the reference the fused kernels are tested against)."""
    moved = list(shape)
    B = moved.pop(batch_dim)
    per_sample = 1
    for s in moved:
        per_sample *= s
    j = torch.arange(per_sample, dtype=torch.int64, device=device)
    blocks = index.to(torch.int64)[:, None] * _blocks_per_sample(per_sample) + j // 4
    words = reference.philox_uniform4(dropout_key(seed, stream), blocks)  # (4, B, S) float32
    u = words.gather(0, (j % 4).expand(1, B, per_sample)).squeeze(0)     # word j mod 4 of block ⌊j/4⌋
    scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    m = (u >= p).to(dtype) * scale
    return m.reshape([B] + moved).movedim(0, batch_dim)


_Tensor = torch.Tensor
_FLOATS = frozenset(_checks.FLOAT_DTYPES)
_MAX_KEY = 2**63


@functools.lru_cache(maxsize=4096)
def _key(seed: int, stream: int) -> int:
    return dropout_key(seed, stream)  # a training step asks for the same few (seed, stream) pairs all epoch


_function_mode_enabled = torch._C._is_torch_function_mode_enabled


def _common_call(x, p, seed, index, batch_dim, stream, training, backend) -> Optional[torch.Tensor]:
    """The call a training step makes (a plain CPU or CUDA tensor, 0 < p < 1, an explicit seed, int64
    sample indices on x's device, the fused kernel of x's device), in a few µs (eager only), or None: the
    full path then decides, and raises where it must.

    At MIM's size the full path cost ~100 µs of Python per call (argument checks, the index range read
    back with min/max, the Python custom op) against a kernel of a few µs, and a training step makes 26
    such calls forward and 26 backward. Here the kernel's op is called directly: its autograd is C++
    (csrc/autograd.cpp, the backward the same op on the gradient), and the index range is checked in one
    C++ pass. torch.compile and export take the full path (the Python op, whose int seed is a SymInt).
    tests/test_dropout.py::test_common_call_* checks that both paths agree."""
    if (type(x) is not _Tensor or type(index) is not _Tensor or type(p) is not float or type(seed) is not int
            or type(stream) is not int or type(batch_dim) is not int or training is not True
            or type(backend) is not str or _function_mode_enabled()):  # a TorchFunctionMode: the full path
        return None
    if not (0.0 < p < 1.0 and 0 <= seed < _MAX_KEY and 0 <= stream < _MAX_KEY):
        return None
    device = x.device
    dev = device.type
    if (dev not in ("cpu", "cuda") or (backend != "auto" and backend != dev) or x.dtype not in _FLOATS
            or (dev == "cuda" and x.dtype == torch.float64)):
        return None
    ndim = x.dim()
    if not -ndim <= batch_dim < ndim:
        return None
    batch_dim %= ndim
    B, n = x.shape[batch_dim], x.numel()
    if B < 1 or n == 0 or index.dtype != torch.int64 or index.shape != (B,) or index.device != device:
        return None
    if _backends.select_cached("philox_uniform", dev, dev, (torch.float32,)) is None:
        return None
    if dev == "cpu" and not _ext.C.int64_in_range(index, _MAX_KEY // _blocks_per_sample(n // B) - 1):
        return None
    return torch.ops.mim_fast.dropout_apply(x, index, _key(seed, stream), p, batch_dim)


# The op is a torch.library custom op so that autograd saves only ``index`` (the backward is the same op
# applied to the gradient: it regenerates the mask), and torch.compile / export see one opaque call. An
# ``int`` argument of a Python custom op is a SymInt: a seed that changes every epoch does not make
# torch.compile recompile (after the first change marks it dynamic).
@torch.library.custom_op("mim_fast::dropout", mutates_args=())
def _dropout_op(x: torch.Tensor, index: torch.Tensor, seed: int, stream: int, p: float, batch_dim: int,
                backend: str) -> torch.Tensor:
    fused = _fused_backend(backend, x)
    key = dropout_key(seed, stream)
    if fused in ("cpu", "cuda"):
        return torch.ops.mim_fast.dropout_apply(x, index.to(torch.int64), key, p, batch_dim)
    if fused == "triton":
        from ..triton import dropout as triton_dropout

        return triton_dropout.dropout_apply(x, index, key, p, batch_dim, _kept_factor(p, x.dtype))
    m = _scaled_mask(tuple(x.shape), x.dtype, x.device, index, seed, stream, p, batch_dim)
    return (x * m).contiguous()


def _blocks_per_sample(per_sample: int) -> int:
    """Philox blocks a sample's S elements take: ⌈S/4⌉ (each block gives four uniforms)."""
    return (per_sample + 3) // 4


def _fused_backend(backend: str, x: torch.Tensor) -> Optional[str]:
    """The fused kernel to run — one pass, the uniforms drawn where they are used (csrc/dropout.cpp,
    kernels/dropout.cu, mim_fast/triton/dropout.py) — or None for the composed reference (backend
    "torch", or "auto" where no kernel serves the device and dtype). Every path gives the same bits."""
    status = _backends.backend_status("philox_uniform", x.device, (torch.float32,))
    if backend == "torch":
        return None
    if backend == "auto":
        native = x.device.type if x.device.type in ("cpu", "cuda") else None
        if native is None or status[native] is not None or (native == "cuda" and x.dtype == torch.float64):
            return None
        return native
    if status[backend] is not None:
        raise _backends.BackendUnavailableError("dropout: backend %r cannot run here: %s" % (backend, status[backend]))
    if backend in ("cuda", "triton") and x.dtype == torch.float64:
        return None  # the GPU kernels take 16/32-bit floats: float64 composes, drawing on that backend's Philox
    return backend


def _kept_factor(p: float, dtype: torch.dtype) -> float:
    """1/(1 − p) rounded as ``mask.to(dtype) * scale`` rounds it (float16/bfloat16: through float32)."""
    scale = 0.0 if p >= 1.0 else 1.0 / (1.0 - p)
    return float(torch.tensor(scale, dtype=torch.float32 if dtype != torch.float64 else torch.float64).to(dtype))


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

if _ext.C is not None:  # the schema lives in the extension (autograd: csrc/autograd.cpp)

    @torch.library.register_fake("mim_fast::dropout_apply")
    def _dropout_apply_fake(x, index, key, p, batch_dim):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
