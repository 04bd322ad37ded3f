"""``mim_fast.kgs_loss``: SPEC §2, the per-sample Knowledge Guidance Scheme loss."""
import math
from typing import List, Optional, Sequence, Tuple

import torch

from .. import _ext, reference
from .._types import KGSLossOutput
from . import _backends, _checks

__all__ = ["kgs_loss", "kgs_loss_with_heads"]

REDUCTIONS = ("mean", "sum", "none")


def kgs_loss(
    yk: torch.Tensor,
    yu: torch.Tensor,
    y: torch.Tensor,
    h: torch.Tensor,
    *,
    per_sample: bool = True,
    kd_scale: float = 10.0,
    kd_divide_T: bool = False,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    reduction: str = "mean",
    eps: float = 1e-12,
    backend: str = "auto",
) -> KGSLossOutput:
    """The KGS loss over M modalities (SPEC §2).

    Args:
        yk: (M, B) predictions from the purified (gated) representations, M ≥ 2.
        yu: (M, B) predictions from the unpurified representations.
        y:  (B,) labels.
        h:  (M, B, D) purified pooled representations (the gate's ``pooled``).
        per_sample: route every sample by its own errors (True) or by batch-mean errors (False, the
            released code).
        kd_scale: T_i = kd_scale·α[teacher, i] scales the KL (> 0).
        kd_divide_T: also divide the logits by T_i inside the softmaxes (Hinton-style); MIM: False.
        weights: (w_intra, w_inter, w_masked, w_unmasked) for ``loss``.
        reduction: "mean" (over samples), "sum", or "none" (every term per sample, (B,)).
        eps: ε in λ = r / (Σ r + ε) (> 0).
        backend: "auto", "torch", "cpu", "triton" or "cuda" (the fused kernels; float64 on "cpu" only).

    Returns:
        ``KGSLossOutput(loss, intra, inter, masked, unmasked, teacher (B,) int64 with -1 for none,
        alpha (M, B))``; the five losses are separately differentiable.

    Numerics: float32 accumulation (float64 for float64 inputs); results in the promoted input dtype.
    Routing (which branch teaches which, α, the teacher) uses detached errors and is exact: ties give
    no transfer and no teacher. NaN in an input propagates to the terms it enters; a NaN error never
    wins a comparison, so a sample with a NaN error has no teacher.

    Fused backends ("cpu", "cuda", "triton"): one kernel pass computes, per sample, the routing, the
    terms and — when an input requires grad — every per-term gradient (the backward only scales them by
    the incoming gradients, one more pass). Bytes: h read once (M·B·D), ∂inter/∂h written once, plus
    O(M·B); the backward reads the saved ∂inter/∂h and writes ∂L/∂h. Launches: forward 1 (+1 small
    batch-mean pass with per_sample=False; on GPUs a 4-byte zeroing of the completion counter when
    per_sample=True reduces to a scalar), backward 1. Only the gradients that the back-propagated
    outputs reach are computed (back-propagating ``masked`` alone writes no ∂L/∂h); inputs they do not
    reach get None, as from the reference's graph. Results are deterministic (fixed work partition and
    summation order) and differ from the "torch" backend by float32 rounding and summation order only:
    per-sample routing compares the same rounded errors, so it is identical; batch means are summed in
    float64 (the reference sums in float32), so only a near-tie of two batch means could route
    differently. The saved ∂inter/∂h has h's dtype (float16/bfloat16 h: one extra rounding of ∂L/∂h,
    ≤ 1 ulp). The fused backends have no second derivative: a backward with create_graph=True through them
    raises (use backend="torch" for higher-order gradients).
    """
    _checks.float_tensor("yk", yk, ndim=2, layout="(M, B)")
    M, B = yk.shape
    if M < 2:
        raise ValueError("yk must have M >= 2 modalities (shape (M, B)); got M=%d" % M)
    _checks.float_tensor("yu", yu, ndim=2, layout="(M, B)")
    _checks.same_shape("yu", yu, (M, B), "(M, B) to match yk")
    _checks.float_tensor("y", y, ndim=1, layout="(B,)")
    _checks.same_shape("y", y, (B,), "(B,) to match yk (M, B)")
    _checks.float_tensor("h", h, ndim=3, layout="(M, B, D)")
    if tuple(h.shape[:2]) != (M, B):
        raise ValueError("h must have shape (M, B, D) = (%d, %d, D) to match yk; got %s"
                         % (M, B, _checks.shape_str(h.shape)))
    _checks.nonempty("h", {"D": h.shape[2]})
    _checks.same_device("yk", yk, yu=yu, y=y, h=h)
    kd_scale, eps, weights = _options(kd_scale, eps, reduction, weights)

    impl = _backends.select("kgs_loss", backend, yk.device, (yk.dtype, yu.dtype, y.dtype, h.dtype))
    if B == 0:
        return _empty_batch((yk, yu, y, h), M, reduction)
    return impl(yk, yu, y, h, per_sample=bool(per_sample), kd_scale=kd_scale, kd_divide_T=bool(kd_divide_T),
                weights=weights, reduction=reduction, eps=eps)


def _empty_batch(inputs, M: int, reduction: str) -> KGSLossOutput:
    """B = 0 (an empty rank of a multi-process run, a filtered batch): every term 0 ("mean" and "sum") or
    (0,) ("none"), teacher (0,), alpha (M, 0); each term is connected to every empty input (empty
    gradients). The heads' weight and bias (not empty) get no gradient: no sample used them."""
    dtype = inputs[0].dtype
    for t in inputs[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    total = sum(t.sum() for t in inputs if t.numel() == 0).to(dtype)     # exactly 0
    term = total if reduction != "none" else total.expand(0)              # (0,) for "none"
    ref = inputs[0]
    return KGSLossOutput(term, term.clone(), term.clone(), term.clone(), term.clone(),
                         torch.empty((0,), dtype=torch.int64, device=ref.device),
                         ref.detach().new_zeros((M, 0), dtype=dtype))


_backends.register("kgs_loss", "torch", reference.kgs_loss, _backends.always)


# ----------------------------------------------------------------------------------------------------
# The fused backends: torch.library ops (C++ for CPU/CUDA in csrc/kgs_loss.cpp, Triton below). The
# forward op returns (loss, intra, inter, masked, unmasked, teacher, alpha, saved_preds, saved_h): the
# last two are the per-term gradients it computed on the way — saved_preds (4, M, B) in the compute
# dtype holds r·J·2(yk−yu), r·I·2(yu−yk), r·sign(yk−y), r·sign(yu−y) and saved_h (M, B, D) in h's dtype
# holds r·½T²(q−p)/s (r = 1/B for "mean", else 1) — and the backward op scales them by
# c_k = G_k + w_k·G_loss. Fakes and autograd are registered here so torch.compile(fullgraph=True)
# traces through with no graph break.
# ----------------------------------------------------------------------------------------------------
def _fused(forward_op):
    def impl(yk, yu, y, h, *, per_sample, kd_scale, kd_divide_T, weights, reduction, eps):
        # Gradients are computed in the forward pass only when autograd will ask for them.
        grad_on = torch.is_grad_enabled()
        grad_preds = grad_on and (yk.requires_grad or yu.requires_grad or y.requires_grad)
        grad_h = grad_on and h.requires_grad
        out = forward_op(yk, yu, y, h, per_sample, kd_scale, kd_divide_T, list(weights), reduction, eps, grad_preds,
                         grad_h)
        return KGSLossOutput(*out[:7])
    return impl


def _acc_dtype(*dtypes) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _forward_fake(acc_of):
    def fake(yk, yu, y, h, per_sample, kd_scale, kd_divide_T, weights, reduction, eps, grad_preds, grad_h):
        M, B = yk.shape
        D = h.shape[2]
        out = torch.promote_types(torch.promote_types(yk.dtype, yu.dtype), torch.promote_types(y.dtype, h.dtype))
        term_shape = (B,) if reduction == "none" else ()
        acc = acc_of(yk.dtype, yu.dtype, y.dtype, h.dtype)
        return tuple(h.new_empty(term_shape, dtype=out) for _ in range(5)) + (
            h.new_empty((B,), dtype=torch.int64), h.new_empty((M, B), dtype=out),
            h.new_empty((4, M, B) if grad_preds else (0,), dtype=acc),
            h.new_empty((M, B, D) if grad_h else (0,), dtype=h.dtype))
    return fake


def _backward_fake(grad_loss, grad_intra, grad_inter, grad_masked, grad_unmasked, saved_preds, saved_h, weights,
                   yk_dtype, yu_dtype, y_dtype):
    has_preds = saved_preds.numel() > 0
    small = tuple(saved_preds.shape[1:]) if has_preds else (0,)
    B = saved_preds.shape[2] if has_preds else 0
    return (saved_preds.new_empty(small, dtype=yk_dtype), saved_preds.new_empty(small, dtype=yu_dtype),
            saved_preds.new_empty((B,) if has_preds else (0,), dtype=y_dtype),
            saved_h.new_empty(saved_h.shape))


def _options(kd_scale, eps, reduction, weights) -> tuple:
    """kd_scale, eps and the 4 weights checked, as floats; raises naming the argument (the functional ops
    and nn.KGSLoss's constructor). kd_scale, its square and the weights must be float32 numbers, the
    kernels' compute type (_checks.float32_number)."""
    kd_scale = _checks.real("kd_scale", kd_scale, gt=0.0)
    if not _checks.F32_TINY <= kd_scale <= math.sqrt(_checks.F32_MAX):
        raise ValueError("kd_scale must lie in [%.4g, %.4g] (it and its square are float32 numbers in the kernels); "
                         "got %r" % (_checks.F32_TINY, math.sqrt(_checks.F32_MAX), kd_scale))
    eps = _checks.real("eps", eps, gt=0.0)
    _checks.choice("reduction", reduction, REDUCTIONS)
    try:
        weights = tuple(weights)
    except TypeError:
        raise TypeError("weights must be a sequence of 4 numbers (intra, inter, masked, unmasked)") from None
    if len(weights) != 4:
        raise ValueError("weights must be 4 numbers (intra, inter, masked, unmasked); got %d" % len(weights))
    weights = tuple(_checks.float32_number("weights[%d]" % i, _checks.real("weights[%d]" % i, w))
                    for i, w in enumerate(weights))
    return kd_scale, eps, weights


def _register_autograd(forward_name: str, backward_op) -> None:
    def setup_context(ctx, inputs, output):
        yk, yu, y, h, _, _, _, weights = inputs[:8]
        ctx.save_for_backward(output[7], output[8])
        ctx.weights = list(weights)
        ctx.dtypes = (yk.dtype, yu.dtype, y.dtype)
        # as csrc/autograd.cpp: a term needs a gradient only when an input it depends on does (intra: yk, yu;
        # inter: h; masked: yk, y; unmasked: yu, y), as in the reference
        r = [t.requires_grad for t in (yk, yu, y, h)]
        deps = ((0, 1), (3,), (0, 2), (1, 2))
        ctx.mark_non_differentiable(output[5], output[6], output[7], output[8],
                                    *(output[1 + k] for k, d in enumerate(deps) if not any(r[i] for i in d)))
        # Unused outputs arrive as None (the kernel reads them as zero) instead of zero tensors that
        # autograd would otherwise allocate and fill, (M, B, D)-sized for saved_h.
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss, grad_intra, grad_inter, grad_masked, grad_unmasked, *_):
        _checks.no_create_graph("kgs_loss")
        saved_preds, saved_h = ctx.saved_tensors
        need = ctx.needs_input_grad
        if (any(need[:3]) and saved_preds.numel() == 0) or (need[3] and saved_h.numel() == 0):
            raise RuntimeError("kgs_loss_forward was called with grad_preds/grad_h off for an input that requires "
                               "grad: call mim_fast.kgs_loss, which sets them from requires_grad")

        def reached(*grads):
            return any(g is not None for g in grads)

        # An input gets a gradient only from the terms that gradients reached (None otherwise, as the
        # reference's autograd graph gives): back-propagating only `masked` does not touch ∂L/∂h.
        want = (need[0] and reached(grad_loss, grad_intra, grad_masked),
                need[1] and reached(grad_loss, grad_intra, grad_unmasked),
                need[2] and reached(grad_loss, grad_masked, grad_unmasked),
                need[3] and reached(grad_loss, grad_inter))
        if not any(want):  # e.g. only `inter` reached us but h is frozen: nothing to compute
            return (None,) * 12
        empty = saved_preds.new_empty((0,))
        gyk, gyu, gy, gh = backward_op(grad_loss, grad_intra, grad_inter, grad_masked, grad_unmasked,
                                       saved_preds if any(want[:3]) else empty,
                                       saved_h if want[3] else saved_h.new_empty((0,)), ctx.weights, *ctx.dtypes)
        return (gyk if want[0] else None, gyu if want[1] else None, gy if want[2] else None,
                gh if want[3] else None) + (None,) * 8

    torch.library.register_autograd(forward_name, backward, setup_context=setup_context)


_float16_32 = _backends.none_of((torch.float16, torch.bfloat16, torch.float32))

if _ext.C is not None:
    torch.library.register_fake("mim_fast::kgs_loss_forward")(_forward_fake(_acc_dtype))
    torch.library.register_fake("mim_fast::kgs_loss_backward")(_backward_fake)
    # (its autograd is C++: csrc/autograd.cpp, the same logic as _register_autograd above)
    _backends.register("kgs_loss", "cpu", _fused(torch.ops.mim_fast.kgs_loss_forward), _backends.needs_cpu_extension)
    _backends.register("kgs_loss", "cuda", _fused(torch.ops.mim_fast.kgs_loss_forward),
                       _backends.all_of(_backends.needs_cuda_extension, _float16_32))


@torch.library.custom_op("mim_fast::kgs_loss_forward_triton", mutates_args=())
def _forward_triton(yk: torch.Tensor, yu: torch.Tensor, y: torch.Tensor, h: torch.Tensor, per_sample: bool,
                    kd_scale: float, kd_divide_T: bool, weights: List[float], reduction: str, eps: float,
                    grad_preds: bool, grad_h: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                             torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
    from ..triton import kgs_loss as kernels

    return kernels.kgs_loss_forward(yk, yu, y, h, per_sample, kd_scale, kd_divide_T, weights, reduction, eps,
                                    grad_preds, grad_h)


@torch.library.custom_op("mim_fast::kgs_loss_backward_triton", mutates_args=())
def _backward_triton(grad_loss: Optional[torch.Tensor], grad_intra: Optional[torch.Tensor],
                     grad_inter: Optional[torch.Tensor], grad_masked: Optional[torch.Tensor],
                     grad_unmasked: Optional[torch.Tensor], saved_preds: torch.Tensor, saved_h: torch.Tensor,
                     weights: List[float], yk_dtype: torch.dtype, yu_dtype: torch.dtype,
                     y_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..triton import kgs_loss as kernels

    return kernels.kgs_loss_backward(grad_loss, grad_intra, grad_inter, grad_masked, grad_unmasked, saved_preds,
                                     saved_h, weights, yk_dtype, yu_dtype, y_dtype)


_forward_triton.register_fake(_forward_fake(lambda *dtypes: torch.float32))
_backward_triton.register_fake(_backward_fake)
_register_autograd("mim_fast::kgs_loss_forward_triton", torch.ops.mim_fast.kgs_loss_backward_triton)
_backends.register("kgs_loss", "triton", _fused(torch.ops.mim_fast.kgs_loss_forward_triton),
                   _backends.all_of(_backends.needs_triton, _float16_32))


# ----------------------------------------------------------------------------------------------------
# kgs_loss_with_heads: the predictions from MIM's per-modality heads inside the fused pass
# ----------------------------------------------------------------------------------------------------
def kgs_loss_with_heads(
    h_masked: torch.Tensor,
    h_unmasked: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    y: torch.Tensor,
    *,
    per_sample: bool = True,
    kd_scale: float = 10.0,
    kd_divide_T: bool = False,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    reduction: str = "mean",
    eps: float = 1e-12,
    backend: str = "auto",
) -> KGSLossOutput:
    """The KGS loss with MIM's heads fused in: yk[m, i] = h_masked[m, i]·weight[m] + bias[m] and
    yu[m, i] = h_unmasked[m, i]·weight[m] + bias[m] (one Linear(D, 1) per modality, shared by both
    branches, SPEC §3), then :func:`kgs_loss` (yk, yu, y, h = h_masked).

    Args:
        h_masked: (M, B, D) purified pooled representations (the gate's ``pooled``), M ≥ 2.
        h_unmasked: (M, B, D) unpurified pooled representations, h_masked's dtype.
        weight: (M, D) the heads' weights; bias: (M,) their biases.
        y: (B,) labels. Options and backend as :func:`kgs_loss` ("torch", "cpu" or "triton"; the
            "triton" backend runs on GPUs).

    Returns:
        ``KGSLossOutput`` as :func:`kgs_loss`; gradients flow to h_masked (through yk and the inter
        term), h_unmasked, weight, bias and y.

    Numerics: the predictions are accumulated in float32 (float64 for float64 inputs) and rounded once
    to the promoted dtype of (h_masked, h_unmasked, weight, bias), as a Linear in that dtype would; the
    reference is exactly the composition ``mim_fast.reference.kgs_loss_with_heads``. The routing depends
    on the predictions, so fused and reference agree on it when their dot products round alike (they do
    for exactly representable sums; otherwise a near-tie can differ in its last bit).

    Fused backends: forward one pass reading h_masked and h_unmasked once (per_sample=False: a first
    pass computes the predictions for the batch means, then h_masked is read again); backward one pass
    reading h_masked, h_unmasked and the saved ∂inter/∂h_masked, writing ∂L/∂h_masked and ∂L/∂h_unmasked,
    with the weight and bias gradients reduced over B deterministically.
    """
    _checks.float_tensor("h_masked", h_masked, ndim=3, layout="(M, B, D)")
    M, B, D = h_masked.shape
    if M < 2:
        raise ValueError("h_masked must have M >= 2 modalities (shape (M, B, D)); got M=%d" % M)
    _checks.nonempty("h_masked", {"D": D})  # B = 0: empty results, as kgs_loss
    _checks.float_tensor("h_unmasked", h_unmasked, ndim=3, layout="(M, B, D)")
    _checks.same_shape("h_unmasked", h_unmasked, (M, B, D), "(M, B, D) to match h_masked")
    if h_unmasked.dtype != h_masked.dtype:
        raise TypeError("h_unmasked must have h_masked's dtype %s; got %s" % (h_masked.dtype, h_unmasked.dtype))
    _checks.float_tensor("weight", weight, ndim=2, layout="(M, D)")
    _checks.same_shape("weight", weight, (M, D), "(M, D) to match h_masked")
    _checks.float_tensor("bias", bias, ndim=1, layout="(M,)")
    _checks.same_shape("bias", bias, (M,), "(M,) to match h_masked")
    _checks.float_tensor("y", y, ndim=1, layout="(B,)")
    _checks.same_shape("y", y, (B,), "(B,) to match h_masked (M, B, D)")
    _checks.same_device("h_masked", h_masked, h_unmasked=h_unmasked, weight=weight, bias=bias, y=y)
    kd_scale, eps, weights = _options(kd_scale, eps, reduction, weights)
    impl = _backends.select("kgs_loss_with_heads", backend, h_masked.device,
                            (h_masked.dtype, weight.dtype, bias.dtype, y.dtype))
    if B == 0:
        return _empty_batch((h_masked, h_unmasked, weight, bias, y), M, reduction)
    return impl(h_masked, h_unmasked, weight, bias, y, per_sample=bool(per_sample), kd_scale=kd_scale,
                kd_divide_T=bool(kd_divide_T), weights=weights, reduction=reduction, eps=eps)


def _heads_fused(forward_op):
    def impl(h_masked, h_unmasked, weight, bias, y, *, per_sample, kd_scale, kd_divide_T, weights, reduction, eps):
        grad_on = torch.is_grad_enabled()
        grad_preds = grad_on and any(t.requires_grad for t in (h_masked, h_unmasked, weight, bias, y))
        grad_h = grad_on and h_masked.requires_grad
        out = forward_op(h_masked, h_unmasked, weight, bias, y, per_sample, kd_scale, kd_divide_T, list(weights),
                         reduction, eps, grad_preds, grad_h)
        return KGSLossOutput(*out[:7])
    return impl


def _heads_forward_fake(acc_of):
    def fake(h_masked, h_unmasked, weight, bias, y, per_sample, kd_scale, kd_divide_T, weights, reduction, eps,
             grad_preds, grad_h):
        M, B, D = h_masked.shape
        pred = torch.promote_types(torch.promote_types(h_masked.dtype, h_unmasked.dtype),
                                   torch.promote_types(weight.dtype, bias.dtype))
        out = torch.promote_types(pred, y.dtype)
        term_shape = (B,) if reduction == "none" else ()
        acc = acc_of(out)
        return tuple(h_masked.new_empty(term_shape, dtype=out) for _ in range(5)) + (
            h_masked.new_empty((B,), dtype=torch.int64), h_masked.new_empty((M, B), dtype=out),
            h_masked.new_empty((4, M, B) if grad_preds else (0,), dtype=acc),
            h_masked.new_empty((M, B, D) if grad_h else (0,), dtype=h_masked.dtype))
    return fake


def _heads_backward_fake(grad_loss, grad_intra, grad_inter, grad_masked, grad_unmasked, saved_preds, saved_h,
                         h_masked, h_unmasked, weight, weights, needs, bias_dtype, y_dtype):
    M, B, D = h_masked.shape
    return (h_masked.new_empty((M, B, D) if needs[0] else (0,)), h_masked.new_empty((M, B, D) if needs[1] else (0,)),
            weight.new_empty((M, D) if needs[2] else (0,)), weight.new_empty((M,) if needs[3] else (0,), dtype=bias_dtype),
            weight.new_empty((B,) if needs[4] else (0,), dtype=y_dtype))


def _register_heads_autograd(forward_name: str, backward_op) -> None:
    def setup_context(ctx, inputs, output):
        h_masked, h_unmasked, weight, bias, y = inputs[:5]
        ctx.save_for_backward(output[7], output[8], h_masked, h_unmasked, weight)
        ctx.weights = list(inputs[8])
        ctx.dtypes = (bias.dtype, y.dtype)
        # a term needs a gradient only when an input it depends on does, as in the reference: intra on the
        # predictions of both branches (h_masked, h_unmasked, weight, bias), inter on h_masked, masked on
        # h_masked, weight, bias and y, unmasked on h_unmasked, weight, bias and y
        r = [t.requires_grad for t in (h_masked, h_unmasked, weight, bias, y)]
        deps = ((0, 1, 2, 3), (0,), (0, 2, 3, 4), (1, 2, 3, 4))
        ctx.mark_non_differentiable(output[5], output[6], output[7], output[8],
                                    *(output[1 + k] for k, d in enumerate(deps) if not any(r[i] for i in d)))
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss, grad_intra, grad_inter, grad_masked, grad_unmasked, *_):
        _checks.no_create_graph("kgs_loss_with_heads")
        saved_preds, saved_h, h_masked, h_unmasked, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        if (any(need[:5]) and saved_preds.numel() == 0) or (need[0] and saved_h.numel() == 0):
            raise RuntimeError("kgs_loss_heads_forward was called with grad_preds/grad_h off for an input that "
                               "requires grad: call mim_fast.kgs_loss_with_heads, which sets them")

        def reached(*grads):
            return any(g is not None for g in grads)

        yk_on = reached(grad_loss, grad_intra, grad_masked)
        yu_on = reached(grad_loss, grad_intra, grad_unmasked)
        inter_on = reached(grad_loss, grad_inter)
        want = [need[0] and (yk_on or inter_on), need[1] and yu_on, need[2] and (yk_on or yu_on),
                need[3] and (yk_on or yu_on), need[4] and reached(grad_loss, grad_masked, grad_unmasked)]
        grads = backward_op(grad_loss, grad_intra, grad_inter, grad_masked, grad_unmasked, saved_preds, saved_h,
                            h_masked, h_unmasked, weight, ctx.weights, want, *ctx.dtypes)
        return tuple(g if w else None for g, w in zip(grads, want)) + (None,) * 8

    torch.library.register_autograd(forward_name, backward, setup_context=setup_context)


def _heads_torch(h_masked, h_unmasked, weight, bias, y, **options):
    return reference.kgs_loss_with_heads(h_masked, h_unmasked, weight, bias, y, **options)


_backends.register("kgs_loss_with_heads", "torch", _heads_torch, _backends.always)
if _ext.C is not None:
    torch.library.register_fake("mim_fast::kgs_loss_heads_forward")(
        _heads_forward_fake(lambda out: torch.float64 if out == torch.float64 else torch.float32))
    torch.library.register_fake("mim_fast::kgs_loss_heads_backward")(_heads_backward_fake)
    _register_heads_autograd("mim_fast::kgs_loss_heads_forward", torch.ops.mim_fast.kgs_loss_heads_backward)
    _backends.register("kgs_loss_with_heads", "cpu", _heads_fused(torch.ops.mim_fast.kgs_loss_heads_forward),
                       _backends.needs_cpu_extension)


@torch.library.custom_op("mim_fast::kgs_loss_heads_forward_triton", mutates_args=())
def _heads_forward_triton(h_masked: torch.Tensor, h_unmasked: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          y: torch.Tensor, per_sample: bool, kd_scale: float, kd_divide_T: bool, weights: List[float],
                          reduction: str, eps: float, grad_preds: bool, grad_h: bool
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..triton import kgs_loss as kernels

    return kernels.kgs_loss_heads_forward(h_masked, h_unmasked, weight, bias, y, per_sample, kd_scale, kd_divide_T,
                                          weights, reduction, eps, grad_preds, grad_h)


@torch.library.custom_op("mim_fast::kgs_loss_heads_backward_triton", mutates_args=())
def _heads_backward_triton(grad_loss: Optional[torch.Tensor], grad_intra: Optional[torch.Tensor],
                           grad_inter: Optional[torch.Tensor], grad_masked: Optional[torch.Tensor],
                           grad_unmasked: Optional[torch.Tensor], saved_preds: torch.Tensor, saved_h: torch.Tensor,
                           h_masked: torch.Tensor, h_unmasked: torch.Tensor, weight: torch.Tensor, weights: List[float],
                           needs: List[bool], bias_dtype: torch.dtype, y_dtype: torch.dtype
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..triton import kgs_loss as kernels

    return kernels.kgs_loss_heads_backward(grad_loss, grad_intra, grad_inter, grad_masked, grad_unmasked, saved_preds,
                                           saved_h, h_masked, h_unmasked, weight, weights, needs, bias_dtype, y_dtype)


_heads_forward_triton.register_fake(_heads_forward_fake(lambda out: torch.float32))
_heads_backward_triton.register_fake(_heads_backward_fake)
_register_heads_autograd("mim_fast::kgs_loss_heads_forward_triton", torch.ops.mim_fast.kgs_loss_heads_backward_triton)
_backends.register("kgs_loss_with_heads", "triton", _heads_fused(torch.ops.mim_fast.kgs_loss_heads_forward_triton),
                   _backends.all_of(_backends.needs_triton, _float16_32))
