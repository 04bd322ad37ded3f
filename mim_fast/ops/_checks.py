"""Argument checks shared by the public ops: clear ValueError/TypeError naming the argument.

Value checks that would need a device→host sync (noise in (0, 1), lengths ≤ T on a GPU tensor) run
only on CPU tensors and never while torch.compile traces; everything else is metadata only.
"""
import math
from typing import Optional, Sequence

import torch

from .. import _ext

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def shape_str(shape) -> str:
    return str(tuple(int(s) for s in shape))


def tensor(name: str, value, *, ndim: Optional[int] = None, layout: str = "") -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError("%s must be a torch.Tensor%s; got %s" % (name, " " + layout if layout else "",
                                                                 type(value).__name__))
    if ndim is not None and value.dim() != ndim:
        raise ValueError("%s must be %d-D %s; got shape %s" % (name, ndim, layout, shape_str(value.shape)))
    return value


def float_tensor(name: str, value, *, ndim: Optional[int] = None, layout: str = "") -> torch.Tensor:
    tensor(name, value, ndim=ndim, layout=layout)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError("%s must be a floating-point tensor (float16, bfloat16, float32 or float64); got %s"
                        % (name, value.dtype))
    return value


def same_shape(name: str, value: torch.Tensor, expected, layout: str, other_shape=None) -> None:
    """Raise unless value.shape == expected. ``other_shape`` (the shape value must match) is appended to
    the message. Messages are built only on failure: under torch.compile with dynamic shapes, formatting a
    symbolic size is a graph break."""
    if tuple(value.shape) != tuple(expected):
        if other_shape is not None:
            layout = "%s %s" % (layout, shape_str(other_shape))
        raise ValueError("%s must have shape %s %s; got %s" % (name, shape_str(expected), layout,
                                                              shape_str(value.shape)))


def same_device(ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError("%s is on %s but %s is on %s: all tensors must be on one device"
                             % (name, t.device, ref_name, ref.device))


def nonempty(name: str, sizes: dict) -> None:
    for dim, size in sizes.items():
        if size < 1:
            raise ValueError("%s: %s must be >= 1; got %d" % (name, dim, size))


def choice(name: str, value, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError("%s must be one of %s; got %r" % (name, ", ".join(repr(o) for o in options), value))
    return value


def real(name: str, value, *, gt: Optional[float] = None, ge: Optional[float] = None,
         lt: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError("%s must be a real number; got %s" % (name, type(value).__name__))
    v = float(value)
    ok = math.isfinite(v) and (gt is None or v > gt) and (ge is None or v >= ge) and (lt is None or v < lt)
    if not ok:
        bounds = [b for b in (gt is not None and "> %g" % gt, ge is not None and ">= %g" % ge,
                              lt is not None and "< %g" % lt) if b]
        raise ValueError("%s must be a finite number%s; got %r" % (name, (" " + " and ".join(bounds)) if bounds
                                                                   else "", value))
    return v


F32_MAX = float(torch.finfo(torch.float32).max)
F32_TINY = float(torch.finfo(torch.float32).tiny)


def float32_number(name: str, value: float) -> float:
    """``value`` (a checked finite float) when float32, the kernels' compute type (float64 only for float64
    inputs), can hold it; a larger one would turn into inf there, where the reference raises or gives NaN."""
    if not abs(value) <= F32_MAX:
        raise ValueError("%s must lie within float32's range (|value| <= %.4g), the kernels' compute type; got %r"
                         % (name, F32_MAX, value))
    return value


def nonneg_int(name: str, value, *, bits: int = 63) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("%s must be a Python int; got %s" % (name, type(value).__name__))
    if not 0 <= value < 2**bits:
        raise ValueError("%s must be in [0, 2^%d); got %d" % (name, bits, value))
    return value


def can_inspect_values(t: torch.Tensor) -> bool:
    """True when reading t's values costs no device sync and no graph break."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def in_open_unit_interval(t: torch.Tensor) -> bool:
    """True when every value of the CPU float tensor t lies in (0, 1); NaN does not. ~1 µs through the
    extension (torch.aminmax and two comparisons of its results: ~20 µs)."""
    if _ext.C is not None:
        return _ext.C.in_open_unit_interval(t)
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)  # one pass; NaN: both NaN, and NaN fails the comparisons
    return lo.item() > 0 and hi.item() < 1


def no_create_graph(op: str) -> None:
    """Raise when a fused op's backward runs under backward(create_graph=True) (grad mode on inside a
    backward): the fused backward has no derivative of its own, and the gradients it returns would pass for
    constants, so a second derivative through them would be silently missing. Mirrors
    csrc/autograd.cpp's check for the C++ ops; torch.compile's traced backwards run with grad mode off."""
    if torch.is_grad_enabled():
        raise RuntimeError("mim_fast.%s: backward with create_graph=True is not supported: the fused backward has no "
                           "derivative of its own, so a second derivative through it would be missing. Use "
                           "backend='torch' (the reference) for higher-order gradients" % op)
