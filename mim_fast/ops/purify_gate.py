"""``mim_fast.purify_gate``: SPEC §1, the Unimodal Purification Network's gate and gated pooling."""
import functools
from typing import Optional, Tuple

import torch

from .. import _ext, reference
from .._types import PurifyGateOutput
from . import _backends, _checks

__all__ = ["purify_gate"]

MODES = ("sample", "expected")
ACTIVATIONS = ("tanh", "relu", "identity")
PENALTIES = ("mim", "threshold")


def purify_gate(
    x: torch.Tensor,
    logits: torch.Tensor,
    *,
    noise: Optional[torch.Tensor] = None,
    seed: Optional[int] = None,
    offset: int = 0,
    mode: str = "sample",
    activation: str = "tanh",
    penalty: str = "mim",
    lengths: Optional[torch.Tensor] = None,
    batch_first: bool = False,
    beta: float = 1 / 3,
    gamma: float = -0.2,
    zeta: float = 1.0,
    loc_bias: float = 3.0,
    threshold: float = 0.6,
    backend: str = "auto",
) -> PurifyGateOutput:
    """Hard-concrete purification gate with gated mean pooling (SPEC §1).

    Args:
        x: features (T, B, D), or (B, T, D) with ``batch_first=True`` (read through strides, no copy).
            float16, bfloat16, float32 or float64.
        logits: gate logits g (B, T), any float dtype, same device as x.
        noise: optional uniform noise u (B, T) in (0, 1) (clamped to [1e-6, 1 − 1e-6]); mode "sample" only.
        seed, offset: draw the noise in-op as ``u[b, t] = philox_uniform(seed, offset + b·T + t)``
            (pass either noise or seed). With neither in mode "sample", a seed is drawn from torch's
            default CPU generator, so ``torch.manual_seed`` makes the call repeatable.
        mode: "sample" (stochastic gate, training; what MIM also uses in evaluation) or "expected"
            (deterministic s = σ(a); noise and seed are ignored).
        activation: φ, "tanh" (MIM), "relu" or "identity".
        penalty: "mim" (q = P(c > 0), the published expected-L0) or "threshold" (q = P(c > τ), the
            probability that the hard gate opens).
        lengths: optional (B,) integer steps per sample (0 ≤ lengths ≤ T), on x's device or the CPU.
            B = 0 (an empty batch) gives empty results on every backend: pooled (0, D), penalty 0,
            gate (0, T).
            Steps t ≥ lengths[b] are padding: closed, never read, no gradient; pooling divides by
            lengths[b] (0 for an empty sample) and the penalty averages over valid steps only.
        beta, gamma, zeta, loc_bias, threshold: β > 0, γ < 0 < ζ, 0 ≤ τ < 1 with γ < τ < ζ.
        backend: "auto", "torch", "cpu", "triton" or "cuda".

    Returns:
        ``PurifyGateOutput(pooled (B, D) in x.dtype, penalty () in logits.dtype, gate (B, T) in
        logits.dtype with values exactly 0/1)``.

    Numerics: computed in float32 (float64 when x, logits or noise is float64). Gradients flow to x
    (closed gates pass none) and to logits through the straight-through estimator and the penalty.
    The gate is deterministic given (logits, noise) or (logits, seed, offset). NaN policy, the same on
    every backend: a NaN logit (or noise) at a valid step makes that step's gate NaN and the sample's
    pooled NaN; a NaN/±inf feature reaches pooled through x·z even at a closed step; the clamp passes no
    gradient where it is active, outside 0 ≤ s̄ ≤ 1 (so no NaN·0); padding is never read. See
    mim_fast.reference.purify_gate. A backward of the penalty alone gives x no gradient and never reads it;
    the penalty needs a gradient only when the logits do; noise is a constant. The fused backends have no
    second derivative: a backward with create_graph=True through them raises (use backend="torch").
    """
    if not torch.compiler.is_compiling():
        out = _common_call(x, logits, noise, seed, offset, mode, activation, penalty, lengths, batch_first, beta,
                           gamma, zeta, loc_bias, threshold, backend)
        if out is not None:
            return out
    if not isinstance(batch_first, bool):
        raise TypeError("batch_first must be a bool; got %s" % type(batch_first).__name__)
    layout = "(B, T, D) (batch_first=True)" if batch_first else "(T, B, D) (batch_first=False)"
    _checks.float_tensor("x", x, ndim=3, layout=layout)
    B, T = (x.shape[0], x.shape[1]) if batch_first else (x.shape[1], x.shape[0])
    D = x.shape[2]
    _checks.nonempty("x", {"T": T, "D": D})  # B = 0 is an empty batch: empty results (below)
    _checks.float_tensor("logits", logits, ndim=2, layout="(B, T)")
    _checks.same_shape("logits", logits, (B, T), "(B, T) to match x", x.shape)
    options = (mode, activation, penalty, beta, gamma, zeta, loc_bias, threshold)
    check = _options.__wrapped__ if torch.compiler.is_compiling() else _options
    beta, gamma, zeta, loc_bias, threshold = check(*options)
    _checks.same_device("x", x, logits=logits)

    if noise is not None and seed is not None:
        raise ValueError("pass either noise or seed (with offset), not both")
    if noise is not None:
        _checks.float_tensor("noise", noise, ndim=2, layout="(B, T)")
        noise = noise.detach()  # a constant, as in the reference: no gradient, and no output requires one for it
        _checks.same_shape("noise", noise, (B, T), "(B, T) to match logits")
        _checks.same_device("x", x, noise=noise)
        if _checks.can_inspect_values(noise):
            if not _checks.in_open_unit_interval(noise):
                raise ValueError("noise must lie in the open interval (0, 1)")
    if seed is not None:
        _checks.nonneg_int("seed", seed)
    _checks.nonneg_int("offset", offset)
    if offset + B * T > 2**63:
        raise ValueError("offset + B·T must be <= 2^63; got offset=%d, B·T=%d" % (offset, B * T))
    if lengths is not None:
        _checks.tensor("lengths", lengths, ndim=1, layout="(B,)")
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError("lengths must be an integer tensor; got %s" % lengths.dtype)
        _checks.same_shape("lengths", lengths, (B,), "(B,) to match x")
        if lengths.device != x.device and lengths.device.type != "cpu":
            raise ValueError("lengths is on %s but x is on %s: pass lengths on x's device or the CPU"
                             % (lengths.device, x.device))
        if _checks.can_inspect_values(lengths) and B:
            lo, hi = (int(v) for v in torch.aminmax(lengths))
            if lo < 0 or hi > T:
                raise ValueError("lengths must lie in [0, T=%d]; got min %d, max %d" % (T, lo, hi))
    # Not while torch.compile traces: is_current_stream_capturing() is a graph break (an error under
    # fullgraph=True), and a compiled graph captured later (mode="reduce-overhead") is the compiler's
    # business. A seed or lengths check then happens at trace time, not at capture.
    if x.is_cuda and not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing():
        # a CUDA graph would freeze a host-drawn seed into every replay, and cannot copy CPU lengths
        if mode == "sample" and noise is None and seed is None:
            raise ValueError("purify_gate under CUDA-graph capture: pass noise= drawn inside the graph (e.g. "
                             "torch.rand(B, T, device='cuda')) for fresh noise per replay, or an explicit seed= "
                             "to replay the same noise; a default seed would be drawn once, at capture")
        if lengths is not None and lengths.device != x.device:
            raise ValueError("purify_gate under CUDA-graph capture: lengths must be on %s (a CPU tensor "
                             "needs a host-to-device copy, which capture forbids)" % x.device)
    if mode == "sample" and noise is None and seed is None:
        seed = reference.draw_seed()  # drawn here so every backend sees the same seed

    dtypes = (x.dtype, logits.dtype) + ((noise.dtype,) if noise is not None else ())
    impl = _backends.select("purify_gate", backend, x.device, dtypes)
    if B == 0:
        return _empty_batch(x, logits, batch_first)
    return impl(x, logits, noise=noise, seed=seed, offset=offset, mode=mode, activation=activation,
                penalty=penalty, lengths=lengths, batch_first=batch_first, beta=beta, gamma=gamma, zeta=zeta,
                loc_bias=loc_bias, threshold=threshold)


_FLOATS = frozenset(_checks.FLOAT_DTYPES)
_function_mode_enabled = torch._C._is_torch_function_mode_enabled
_Tensor = torch.Tensor
_MAX_INDEX = 2**63


def _common_call(x, logits, noise, seed, offset, mode, activation, penalty, lengths, batch_first, beta, gamma, zeta,
                 loc_bias, threshold, backend) -> Optional[PurifyGateOutput]:
    """The call a training step makes, accepted in a few µs (eager only), or None: the full path then
    decides, and raises where it must.

    At MIM's size the argument checks of the full path cost as much as the kernels (~60 µs of Python
    per call on the CI VM, a fifth of the op's forward and backward). This restates the same conditions
    for the common case only, as a handful of cheap tests: plain tensors (not subclasses or wrappers),
    no lengths, a non-empty batch, no CUDA-graph capture. Anything else, every error included, takes the
    full path, so the messages come from one place. tests/test_purify_gate.py::test_common_call_*
    checks that both paths agree on which calls they accept and on what they return."""
    if (type(x) is not _Tensor or type(logits) is not _Tensor or lengths is not None or type(batch_first) is not bool
            or type(offset) is not int or (seed is not None and (noise is not None or type(seed) is not int))
            or (noise is not None and (type(noise) is not _Tensor or noise.requires_grad)) or type(backend) is not str
            or _function_mode_enabled()):  # a TorchFunctionMode sees the op only through torch.ops: the full path
        return None
    shape = x.shape
    if len(shape) != 3:
        return None
    B, T, D = shape if batch_first else (shape[1], shape[0], shape[2])
    if B < 1 or T < 1 or D < 1 or logits.shape != (B, T) or not 0 <= offset <= _MAX_INDEX - B * T:
        return None
    device = x.device
    if logits.device != device or x.dtype not in _FLOATS or logits.dtype not in _FLOATS:
        return None
    if noise is not None:
        if noise.shape != (B, T) or noise.device != device or noise.dtype not in _FLOATS:
            return None
        if device.type == "cpu" and not _checks.in_open_unit_interval(noise):
            return None
        dtypes = (x.dtype, logits.dtype, noise.dtype)
    else:
        dtypes = (x.dtype, logits.dtype)
    if seed is not None and not 0 <= seed < _MAX_INDEX:
        return None
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    beta, gamma, zeta, loc_bias, threshold = _options(mode, activation, penalty, beta, gamma, zeta, loc_bias,
                                                      threshold)
    impl = _backends.select_cached("purify_gate", backend, device.type, dtypes)
    if impl is None:
        return None
    if mode == "sample" and noise is None and seed is None:
        seed = reference.draw_seed()
    if impl in _CPP_IMPLS:  # the C++ backends: the op's call in C++, 3 outputs wrapped instead of 6
        return PurifyGateOutput(*_ext.C.purify_gate_call(
            x, logits, noise, 0 if seed is None else seed, offset, batch_first, mode, activation, loc_bias, beta,
            zeta - gamma, gamma, threshold, _pen_shift(penalty, beta, gamma, zeta, threshold)))
    return impl(x, logits, noise=noise, seed=seed, offset=offset, mode=mode, activation=activation, penalty=penalty,
                lengths=None, batch_first=batch_first, beta=beta, gamma=gamma, zeta=zeta, loc_bias=loc_bias,
                threshold=threshold)


def _empty_batch(x, logits, batch_first) -> PurifyGateOutput:
    """B = 0 (an empty rank of a multi-process run, a filtered batch): pooled (0, D), penalty 0 (the mean
    over no step, as with lengths all 0), gate (0, T); gradients flow (empty ones, and 0 for the penalty)."""
    pooled = x.sum(dim=1 if batch_first else 0)        # (0, D), in x's dtype, connected to x
    penalty = logits.sum()                             # exactly 0, in the logits' dtype
    return PurifyGateOutput(pooled, penalty, logits.detach().new_zeros(logits.shape))


@functools.lru_cache(maxsize=64, typed=True)
def _options(mode, activation, penalty, beta, gamma, zeta, loc_bias, threshold) -> tuple:
    """The validated hyper-parameters (beta, gamma, zeta, loc_bias, threshold) as floats; raises naming the
    argument. Cached per argument tuple (``typed``: True is not 1 here): a training step passes the same
    ones every call, and checking them cost more than the kernels at MIM's size."""
    _checks.choice("mode", mode, MODES)
    _checks.choice("activation", activation, ACTIVATIONS)
    _checks.choice("penalty", penalty, PENALTIES)
    beta = _checks.real("beta", beta, gt=0.0)
    gamma = _checks.real("gamma", gamma, lt=0.0)
    zeta = _checks.real("zeta", zeta, gt=0.0)
    loc_bias = _checks.real("loc_bias", loc_bias)
    threshold = _checks.real("threshold", threshold, ge=0.0, lt=1.0)
    if not gamma < threshold < zeta:
        raise ValueError("threshold must satisfy gamma < threshold < zeta; got gamma=%g, threshold=%g, zeta=%g"
                         % (gamma, threshold, zeta))
    # The kernels compute in float32 (float64 only for float64 inputs): a value float32 cannot hold would turn
    # into inf or 0 there, a gate of another meaning (the reference raises or gives NaN instead).
    for name, v in (("beta", beta), ("gamma", gamma), ("zeta", zeta), ("loc_bias", loc_bias),
                    ("zeta - gamma", zeta - gamma), ("the penalty's shift beta·log(−gamma/zeta)",
                                                     _pen_shift(penalty, beta, gamma, zeta, threshold))):
        _checks.float32_number(name, v)
    if beta < _checks.F32_TINY:
        raise ValueError("beta must be >= %.4g (the smallest normal float32: the kernels divide by it in "
                         "float32); got %r" % (_checks.F32_TINY, beta))
    return beta, gamma, zeta, loc_bias, threshold


# ----------------------------------------------------------------------------------------------------
# The fused backends: torch.library ops (C++ for CPU/CUDA in csrc/purify_gate.cpp, Triton below), each a
# forward op returning (pooled, penalty, gate, ste, dq, inv_count) and a backward op, with fake (meta)
# functions and autograd registered here so torch.compile(fullgraph=True) traces through them.
# ----------------------------------------------------------------------------------------------------
def _fused(forward_op):
    def impl(x, logits, *, noise, seed, offset, mode, activation, penalty, lengths, batch_first, beta, gamma,
             zeta, loc_bias, threshold):
        xs = x.transpose(0, 1) if batch_first else x  # (T, B, D) view: kernels read through strides
        if lengths is not None and lengths.device != x.device:
            # once, here: the forward and the backward (which saves this tensor) then read it in place
            lengths = lengths.to(x.device, torch.int64)
        pen_shift = _pen_shift(penalty, beta, gamma, zeta, threshold)
        out = forward_op(xs, logits, noise, lengths, 0 if seed is None else seed, offset, mode, activation,
                         loc_bias, beta, zeta - gamma, gamma, threshold, pen_shift)
        return PurifyGateOutput(out[0], out[1], out[2])
    return impl


@functools.lru_cache(maxsize=64)
def _pen_shift(penalty, beta, gamma, zeta, threshold) -> float:
    return beta * reference.penalty_log_ratio(penalty, gamma, zeta, threshold)


def _forward_fake(acc_of):
    def fake(x, logits, noise, lengths, seed, offset, mode, activation, loc_bias, beta, zeta_gamma, gamma,
             threshold, pen_shift):
        T, B, D = x.shape
        acc = acc_of(x, logits, noise)
        return (x.new_empty((B, D)), logits.new_empty(()), logits.new_empty((B, T)),
                x.new_empty((B, T), dtype=acc), x.new_empty((B, T), dtype=acc), x.new_empty((), dtype=acc))
    return fake


def _backward_fake(grad_pooled, grad_penalty, x, gate, ste, dq, inv_count, lengths, activation, needs_grad_x=True):
    return (torch.empty_like(x) if needs_grad_x else x.new_empty((0,))), gate.new_empty(gate.shape)


def _register_autograd(forward_name: str, backward_op) -> None:
    def setup_context(ctx, inputs, output):
        x, logits, lengths, activation = inputs[0], inputs[1], inputs[3], inputs[7]
        _, penalty, gate, ste, dq, inv_count = output
        ctx.save_for_backward(x, gate, ste, dq, inv_count, lengths)
        ctx.activation = activation
        # as csrc/autograd.cpp: the penalty needs a gradient only when the logits do
        ctx.mark_non_differentiable(gate, ste, dq, inv_count, *(() if logits.requires_grad else (penalty,)))
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_pooled, grad_penalty, *_):
        _checks.no_create_graph("purify_gate")
        x, gate, ste, dq, inv_count, lengths = ctx.saved_tensors
        if grad_pooled is None and grad_penalty is None:
            return (None,) * 14
        if grad_pooled is None:  # only the penalty reached the loss (csrc/autograd.cpp: no feature pass)
            grad_logits = dq * (grad_penalty.to(dq.dtype) * inv_count) if ctx.needs_input_grad[1] else None
            return (None, grad_logits) + (None,) * 12
        if grad_penalty is None:
            grad_penalty = gate.new_zeros(())
        # ∂L/∂x only when x needs it: MIM's mask-learner update differentiates w.r.t. the logits alone, and
        # not writing ∂L/∂x saves a third of the backward's memory traffic.
        needs_x = ctx.needs_input_grad[0]
        grad_x, grad_logits = backward_op(grad_pooled, grad_penalty, x, gate, ste, dq, inv_count, lengths,
                                          ctx.activation, needs_x)
        return (grad_x if needs_x else None,
                grad_logits if ctx.needs_input_grad[1] else None) + (None,) * 12

    torch.library.register_autograd(forward_name, backward, setup_context=setup_context)


def _acc_cpp(x, logits, noise):
    f64 = torch.float64 in (x.dtype, logits.dtype) or (noise is not None and noise.dtype == torch.float64)
    return torch.float64 if f64 else torch.float32


_no_float64 = _backends.none_of((torch.float16, torch.bfloat16, torch.float32))

if _ext.C is not None:
    torch.library.register_fake("mim_fast::purify_gate_forward")(_forward_fake(_acc_cpp))
    torch.library.register_fake("mim_fast::purify_gate_backward")(_backward_fake)
    # (its autograd is C++: csrc/autograd.cpp, the same logic as _register_autograd below)
    _cpp_impl = _fused(torch.ops.mim_fast.purify_gate_forward)
    _backends.register("purify_gate", "cpu", _cpp_impl, _backends.needs_cpu_extension)
    _backends.register("purify_gate", "cuda", _cpp_impl, _backends.all_of(_backends.needs_cuda_extension, _no_float64))
    _CPP_IMPLS = (_cpp_impl,)  # _common_call calls these through _C.purify_gate_call
else:
    _CPP_IMPLS = ()


@torch.library.custom_op("mim_fast::purify_gate_forward_triton", mutates_args=())
def _forward_triton(x: torch.Tensor, logits: torch.Tensor, noise: Optional[torch.Tensor],
                    lengths: Optional[torch.Tensor], seed: int, offset: int, mode: str, activation: str,
                    loc_bias: float, beta: float, zeta_gamma: float, gamma: float, threshold: float,
                    pen_shift: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                               torch.Tensor, torch.Tensor]:
    from ..triton import purify_gate as kernels

    return kernels.purify_gate_forward(x, logits, noise, lengths, seed, offset, mode, activation, loc_bias, beta,
                                       zeta_gamma, gamma, threshold, pen_shift)


@torch.library.custom_op("mim_fast::purify_gate_backward_triton", mutates_args=())
def _backward_triton(grad_pooled: torch.Tensor, grad_penalty: torch.Tensor, x: torch.Tensor, gate: torch.Tensor,
                     ste: torch.Tensor, dq: torch.Tensor, inv_count: torch.Tensor, lengths: Optional[torch.Tensor],
                     activation: str, needs_grad_x: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    from ..triton import purify_gate as kernels

    return kernels.purify_gate_backward(grad_pooled, grad_penalty, x, gate, ste, dq, inv_count, lengths, activation,
                                        needs_grad_x)


_forward_triton.register_fake(_forward_fake(lambda x, logits, noise: torch.float32))
_backward_triton.register_fake(_backward_fake)
_register_autograd("mim_fast::purify_gate_forward_triton", torch.ops.mim_fast.purify_gate_backward_triton)

_backends.register("purify_gate", "torch", reference.purify_gate, _backends.always)
_backends.register("purify_gate", "triton", _fused(torch.ops.mim_fast.purify_gate_forward_triton),
                   _backends.all_of(_backends.needs_triton, _no_float64))
