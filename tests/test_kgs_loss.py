"""kgs_loss (SPEC §2): the reference against a per-sample loop transcription of the spec (forward and
the spec's gradient formulas), against the released code's batch-level rule, gradcheck in float64
with the routing held fixed, the spec's properties, and argument checking."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import mim_fast
from mim_fast import KGSLossOutput, reference

from _isa import saved_under_isa

TERMS = ("loss", "intra", "inter", "masked", "unmasked")
OPTIONS = list(itertools.product((True, False), (False, True), ("mean", "sum", "none")))
OPTION_IDS = ["%s-%s-%s" % ("per_sample" if p else "batch", "divT" if d else "noT", r) for p, d, r in OPTIONS]


def make_inputs(M, B, D, dtype=torch.float64):
    """Random predictions whose 2M absolute errors per sample are all at least ~0.1 apart: routing is
    decided by exact comparisons, and a near-tie could otherwise route differently at two precisions
    (the fused kernel in float32 vs the float64 "exact" run), which is not an error of either. Exact ties
    are tested separately, by construction."""
    y = torch.empty(B, dtype=torch.float64).uniform_(-3, 3)
    levels = torch.rand(2 * M, B, dtype=torch.float64).argsort(dim=0).to(torch.float64)  # a permutation per sample
    err = 0.05 + 0.15 * levels + 0.03 * torch.rand(2 * M, B, dtype=torch.float64)
    err = err * torch.where(torch.rand(2 * M, B) < 0.5, -1.0, 1.0).to(torch.float64)
    yk, yu = y + err[:M], y + err[M:]
    h = 2 * torch.randn(M, B, D, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (yk, yu, y, h))


def sign(v: float) -> float:
    return (v > 0) - (v < 0)


def spec_loop(yk, yu, y, h, grad_out, *, per_sample, kd_scale, kd_divide_T, weights, reduction, eps):
    """SPEC §2 one sample at a time in float64 Python/torch scalars: terms, teacher, alpha and the
    gradients the spec prescribes, for upstream gradients grad_out[name] of each returned term."""
    M, B = yk.shape
    yk, yu, y, h = yk.double(), yu.double(), y.double(), h.double()
    ek, eu = (yk - y).abs(), (yu - y).abs()
    rk, ru = (ek, eu) if per_sample else (ek.mean(1, keepdim=True).expand(M, B), eu.mean(1, keepdim=True).expand(M, B))
    terms = {k: torch.zeros(B, dtype=torch.float64) for k in TERMS[1:]}
    teacher = torch.full((B,), -1, dtype=torch.int64)
    alpha = torch.zeros(M, B, dtype=torch.float64)
    g_yk, g_yu, g_y, g_h = torch.zeros_like(yk), torch.zeros_like(yu), torch.zeros_like(y), torch.zeros_like(h)

    def upstream(name, i):  # d(output)/d(term_i) for the reduction
        g = grad_out[name]
        scale = 1.0 / B if reduction == "mean" else 1.0
        return float(g[i]) if reduction == "none" else float(g) * scale

    w = dict(zip(TERMS[1:], weights))
    for i in range(B):
        c = {k: upstream(k, i) + w[k] * upstream("loss", i) for k in TERMS[1:]}  # per-term chain factors
        for m in range(M):
            I, J = bool(rk[m, i] < ru[m, i]), bool(rk[m, i] > ru[m, i])
            d = float(yk[m, i] - yu[m, i])
            terms["intra"][i] += (d * d) if (I or J) else 0.0
            sk, su = sign(float(yk[m, i] - y[i])), sign(float(yu[m, i] - y[i]))  # sign(0) = 0
            g_yk[m, i] += c["intra"] * (2 * d if J else 0.0) + c["masked"] * sk
            g_yu[m, i] += c["intra"] * (-2 * d if I else 0.0) + c["unmasked"] * su
            g_y[i] -= c["masked"] * sk + c["unmasked"] * su
        terms["masked"][i] = float(ek[:, i].sum())
        terms["unmasked"][i] = float(eu[:, i].sum())
        r = [float(rk[m, i]) for m in range(M)]
        lam = [v / (sum(r) + eps) for v in r]
        inv = [1 / (1 + v) for v in lam]
        for m in range(M):
            alpha[m, i] = M * inv[m] / sum(inv)
        best = min(r)
        if sum(v == best for v in r) == 1:
            t = r.index(best)
            teacher[i] = t
            T = kd_scale * float(alpha[t, i])
            s = T if kd_divide_T else 1.0
            p = torch.softmax(h[t, i] / s, dim=0)
            for m in range(M):
                if m == t:
                    continue
                q = torch.softmax(h[m, i] / s, dim=0)
                terms["inter"][i] += 0.5 * T * T * float((p * (p.log() - q.log())).sum())
                g_h[m, i] += c["inter"] * 0.5 * T * T * (q - p) / s
    loss = sum(w[k] * terms[k] for k in TERMS[1:])
    out = {"loss": loss, **terms}
    red = {"mean": lambda v: v.mean(), "sum": lambda v: v.sum(), "none": lambda v: v}[reduction]
    return {k: red(v) for k, v in out.items()}, teacher, alpha, (g_yk, g_yu, g_y, g_h)


def _grad_outputs(B, reduction):
    shape = (B,) if reduction == "none" else ()
    return {k: torch.randn(shape, dtype=torch.float64) for k in TERMS}


@pytest.mark.parametrize("per_sample,kd_divide_T,reduction", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("M,B,D", [(2, 1, 1), (3, 5, 7), (5, 2, 80), (3, 6, 1500)], ids=lambda v: str(v))
def test_reference_matches_spec_loop(per_sample, kd_divide_T, reduction, M, B, D):
    yk, yu, y, h = make_inputs(M, B, D)
    weights = tuple(float(v) for v in torch.rand(4) * 2)
    opts = dict(per_sample=per_sample, kd_scale=float(1 + 9 * torch.rand(())), kd_divide_T=kd_divide_T,
                weights=weights, reduction=reduction, eps=1e-12)
    ins = [t.clone().requires_grad_() for t in (yk, yu, y, h)]
    out = mim_fast.kgs_loss(*ins, backend="torch", **opts)
    go = _grad_outputs(B, reduction)
    torch.autograd.backward([getattr(out, k) for k in TERMS], [go[k] for k in TERMS])
    exp, teacher, alpha, grads = spec_loop(yk, yu, y, h, go, **opts)
    for k in TERMS:
        torch.testing.assert_close(getattr(out, k), exp[k], rtol=1e-10, atol=1e-10, msg=lambda s, k=k: k + ": " + s)
    assert torch.equal(out.teacher, teacher)
    torch.testing.assert_close(out.alpha, alpha, rtol=1e-12, atol=1e-12)
    for name, got, want in zip(("yk", "yu", "y", "h"), ins, grads):
        torch.testing.assert_close(got.grad, want, rtol=1e-10, atol=1e-10, msg=lambda s, n=name: n + ": " + s)


@pytest.mark.parametrize("per_sample,kd_divide_T,reduction", OPTIONS, ids=OPTION_IDS)
def test_gradcheck_float64_with_routing_fixed(per_sample, kd_divide_T, reduction):
    """The routing and the stop-gradient copies are constants of the loss (SPEC: no gradient flows
    through them); with them held at their values the loss is smooth and finite differences apply."""
    M, B, D = 3, 5, 6
    yk, yu, y, h = make_inputs(M, B, D)
    routing = reference.kgs_routing(yk, yu, y, per_sample=per_sample, kd_scale=10.0, kd_divide_T=kd_divide_T)
    weights = (0.7, 0.3, 1.1, 0.9)
    red = {"mean": torch.mean, "sum": torch.sum, "none": lambda v: v}[reduction]

    def f(yk_, yu_, y_, h_):
        terms = reference.kgs_terms(yk_, yu_, y_, h_, routing, yk_sg=yk, yu_sg=yu, h_sg=h)
        return tuple(red(t) for t in terms) + (red(sum(w * t for w, t in zip(weights, terms))),)

    ins = tuple(t.clone().requires_grad_() for t in (yk, yu, y, h))
    assert torch.autograd.gradcheck(f, ins)
    # and the public op's gradients are those of the fixed-routing function
    out = mim_fast.kgs_loss(*ins, per_sample=per_sample, kd_divide_T=kd_divide_T, weights=weights,
                            reduction=reduction)
    ref = f(*ins)
    for a, b in zip((out.intra, out.inter, out.masked, out.unmasked, out.loss), ref):
        ga = torch.autograd.grad(a.sum(), ins, allow_unused=True, retain_graph=True)
        gb = torch.autograd.grad(b.sum(), ins, allow_unused=True, retain_graph=True)
        for u, v in zip(ga, gb):
            if u is None or v is None:
                assert (u is None or not u.any()) and (v is None or not v.any())
            else:
                torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


def _released_batch_rule(yk, yu, y, h):
    """The released MIM code's loss for M = 3 (utils/loss.py + train.py, repaired): batch-mean L1 losses
    decide every transfer; KLDivLoss(batchmean) with temperature 10·α only scaling the loss; the
    Adjuster in its published three-modality product form."""
    L1, MSE, KL = torch.nn.L1Loss(), torch.nn.MSELoss(), torch.nn.KLDivLoss(reduction="batchmean")
    Lk = [L1(yk[m], y) for m in range(3)]
    Lu = [L1(yu[m], y) for m in range(3)]
    intra = sum(MSE(yk[m].detach(), yu[m]) * (Lk[m] < Lu[m]) + MSE(yk[m], yu[m].detach()) * (Lk[m] > Lu[m])
                for m in range(3))
    total = sum(v.item() for v in Lk)
    lam = [v.item() / total for v in Lk]
    den = (1 + lam[1]) * (1 + lam[0]) + (1 + lam[2]) * (1 + lam[0]) + (1 + lam[1]) * (1 + lam[2])
    alpha = [3 * (1 + lam[1]) * (1 + lam[2]) / den, 3 * (1 + lam[0]) * (1 + lam[2]) / den,
             3 * (1 + lam[0]) * (1 + lam[1]) / den]
    inter = 0.0
    for t in range(3):
        others = [m for m in range(3) if m != t]
        if all(Lk[t] < Lk[m] for m in others):
            T = 10 * alpha[t]
            p = F.softmax(h[t].detach(), dim=1)
            inter = inter + 0.5 * T * T * sum(KL(F.log_softmax(h[m], dim=1), p) for m in others)
    return intra, inter, sum(Lk), sum(Lu), alpha


def test_batch_mode_equals_released_code():
    M, B, D = 3, 16, 80
    yk, yu, y, h = make_inputs(M, B, D)
    ins = [t.clone().requires_grad_() for t in (yk, yu, y, h)]
    out = mim_fast.kgs_loss(*ins, per_sample=False, eps=1e-300)
    ins2 = [t.clone().requires_grad_() for t in (yk, yu, y, h)]
    intra, inter, masked, unmasked, alpha = _released_batch_rule(*ins2)
    for got, want in zip((out.intra, out.inter, out.masked, out.unmasked), (intra, inter, masked, unmasked)):
        torch.testing.assert_close(got, torch.as_tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.alpha[:, 0], torch.tensor(alpha, dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.equal(out.alpha, out.alpha[:, :1].expand(M, B))  # one decision for the whole batch
    out.loss.backward()
    (intra + inter + masked + unmasked).backward()
    for a, b in zip(ins, ins2):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_alpha_sums_to_M_and_favours_the_better_modality():
    for M in (2, 3, 5):
        yk, yu, y, h = make_inputs(M, 257, 4)
        out = mim_fast.kgs_loss(yk, yu, y, h)
        torch.testing.assert_close(out.alpha.sum(0), torch.full((257,), float(M), dtype=torch.float64))
        err = (yk - y).abs()
        # α is decreasing in the modality's error: the teacher gets the largest α
        has = out.teacher >= 0
        assert torch.equal(out.alpha.argmax(0)[has], out.teacher[has])
        assert torch.equal(err.argmin(0)[has], out.teacher[has])


def test_ties_give_no_teacher_and_no_transfer():
    y = torch.zeros(4, dtype=torch.float64)
    # sample 0: modalities 0 and 1 tie for the lowest error -> no teacher; sample 1: a unique best (2);
    # samples 2, 3: masked and unmasked errors tie in every modality -> no intra transfer.
    yk = torch.tensor([[0.5, 1.0, 0.3, -0.7], [-0.5, 2.0, 0.3, 0.7], [1.5, 0.25, -0.3, 0.9]], dtype=torch.float64)
    yu = torch.tensor([[0.9, 3.0, -0.3, 0.7], [0.1, 1.0, 0.3, -0.7], [1.0, 0.5, 0.3, -0.9]], dtype=torch.float64)
    h = torch.randn(3, 4, 9, dtype=torch.float64)
    out = mim_fast.kgs_loss(yk, yu, y, h, reduction="none")
    assert out.teacher.tolist()[:2] == [-1, 2]
    assert float(out.inter[0]) == 0.0 and float(out.inter[1]) > 0.0
    assert float(out.intra[2]) == 0.0 and float(out.intra[3]) == 0.0
    ins = [t.clone().requires_grad_() for t in (yk, yu, y, h)]
    o = mim_fast.kgs_loss(*ins, reduction="none", weights=(1.0, 1.0, 0.0, 0.0))
    o.loss[[0, 2, 3]].sum().backward()
    assert not ins[3].grad[:, 0].any()  # no teacher: nothing distilled into h
    assert not ins[0].grad[:, 2:].any() and not ins[1].grad[:, 2:].any()  # tied branches: no intra gradient
    # the teacher row of a sample with a teacher gets no gradient either
    ins[3].grad = None
    mim_fast.kgs_loss(*ins, reduction="none").inter[1].backward()
    assert not ins[3].grad[2, 1].any() and ins[3].grad[0, 1].any()


def test_prediction_equal_to_label_has_zero_sign_gradient():
    y = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    yk = torch.tensor([[0.5, 0.0], [0.5, -1.0]], dtype=torch.float64, requires_grad=True)
    yu = torch.tensor([[0.5, -1.0], [1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 2, 3, dtype=torch.float64)
    out = mim_fast.kgs_loss(yk, yu, y, h, weights=(0.0, 0.0, 1.0, 1.0))
    out.loss.backward()
    assert yk.grad.tolist() == [[0.0, 0.5], [0.0, 0.0]]  # sign(0) = 0; sign(+1)/B
    assert yu.grad.tolist() == [[0.0, 0.0], [0.5, 0.0]]
    assert y.grad.tolist() == [-0.5, -0.5]


def test_reductions_are_consistent():
    yk, yu, y, h = make_inputs(3, 9, 5)
    none = mim_fast.kgs_loss(yk, yu, y, h, reduction="none")
    mean = mim_fast.kgs_loss(yk, yu, y, h, reduction="mean")
    total = mim_fast.kgs_loss(yk, yu, y, h, reduction="sum")
    for k in TERMS:
        assert getattr(none, k).shape == (9,)
        torch.testing.assert_close(getattr(none, k).mean(), getattr(mean, k))
        torch.testing.assert_close(getattr(none, k).sum(), getattr(total, k))


def test_per_sample_and_batch_rule_agree_for_one_sample():
    yk, yu, y, h = make_inputs(3, 1, 11)
    a = mim_fast.kgs_loss(yk, yu, y, h, per_sample=True)
    b = mim_fast.kgs_loss(yk, yu, y, h, per_sample=False)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_nan_propagates_without_crash():
    yk, yu, y, h = make_inputs(3, 4, 5)
    yk[0, 2] = float("nan")
    h[1, 3, 0] = float("nan")
    out = mim_fast.kgs_loss(yk, yu, y, h, reduction="none")
    assert out.teacher[2] == -1 and float(out.inter[2]) == 0.0  # a NaN error never wins
    assert math.isnan(float(out.masked[2])) and math.isfinite(float(out.masked[0]))
    assert math.isnan(float(out.alpha[0, 2]))
    # sample 3: NaN in h enters inter only if modality 1 is a student or the teacher of sample 3
    if out.teacher[3] >= 0:
        assert math.isnan(float(out.inter[3]))
    assert math.isfinite(float(out.inter[0])) and math.isfinite(float(out.inter[1]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    yk, yu, y, h = (t.to(dtype) for t in make_inputs(3, 33, 80, dtype=torch.float32))
    out = mim_fast.kgs_loss(yk, yu, y, h, reduction="none")
    ref = mim_fast.kgs_loss(yk.float(), yu.float(), y.float(), h.float(), reduction="none")
    assert out.loss.dtype == dtype and out.alpha.dtype == dtype and out.teacher.dtype == torch.int64
    assert torch.equal(out.teacher, ref.teacher)
    for k in TERMS:
        torch.testing.assert_close(getattr(out, k), getattr(ref, k).to(dtype), rtol=0, atol=0)


def test_inputs_are_not_mutated():
    ins = [t.requires_grad_() for t in make_inputs(3, 6, 5)]
    copies = [t.detach().clone() for t in ins]
    out = mim_fast.kgs_loss(*ins, kd_divide_T=True)
    sum(getattr(out, k) for k in TERMS).backward()
    for t, c in zip(ins, copies):
        assert torch.equal(t.detach(), c)


def _bad_calls():
    yk, yu, y, h = make_inputs(3, 4, 5, dtype=torch.float32)
    return [
        (dict(yk=yk.long(), yu=yu, y=y, h=h), TypeError, "yk must be a floating-point tensor"),
        (dict(yk=yk[:1], yu=yu[:1], y=y, h=h[:1]), ValueError, "M >= 2"),
        (dict(yk=yk[0], yu=yu, y=y, h=h), ValueError, r"yk must be 2-D \(M, B\)"),
        (dict(yk=yk, yu=yu[:, :3], y=y, h=h), ValueError, r"yu must have shape \(3, 4\)"),
        (dict(yk=yk, yu=yu, y=y[:3], h=h), ValueError, r"y must have shape \(4,\)"),
        (dict(yk=yk, yu=yu, y=y[:, None], h=h), ValueError, r"y must be 1-D \(B,\)"),
        (dict(yk=yk, yu=yu, y=y, h=h[:2]), ValueError, r"h must have shape \(M, B, D\) = \(3, 4, D\)"),
        (dict(yk=yk, yu=yu, y=y, h=h[:, :, :0]), ValueError, "D must be >= 1"),
        (dict(yk=yk, yu=yu, y=y.int(), h=h), TypeError, "y must be a floating-point tensor"),
        (dict(yk=yk, yu=yu, y=y, h=h, kd_scale=0.0), ValueError, "kd_scale must be a finite number > 0"),
        (dict(yk=yk, yu=yu, y=y, h=h, eps=0.0), ValueError, "eps must be a finite number > 0"),
        (dict(yk=yk, yu=yu, y=y, h=h, reduction="avg"), ValueError, "reduction must be one of"),
        (dict(yk=yk, yu=yu, y=y, h=h, weights=(1.0, 1.0)), ValueError, "weights must be 4 numbers"),
        (dict(yk=yk, yu=yu, y=y, h=h, weights=1.0), TypeError, "weights must be a sequence"),
        (dict(yk=yk, yu=yu, y=y, h=h, weights=(1.0, float("inf"), 1.0, 1.0)), ValueError, r"weights\[1\]"),
        # finite, but not float32 numbers in the kernels (the reference gives NaN where they give inf)
        (dict(yk=yk, yu=yu, y=y, h=h, weights=(1.0, 1e39, 1.0, 1.0)), ValueError, r"weights\[1\] must lie within"),
        (dict(yk=yk, yu=yu, y=y, h=h, kd_scale=1e20), ValueError, "kd_scale must lie in"),
        (dict(yk=yk, yu=yu, y=y, h=h, kd_scale=1e-39), ValueError, "kd_scale must lie in"),
        (dict(yk=yk, yu=yu, y=y, h=h, backend="gpu"), ValueError, "backend must be 'auto' or one of"),
    ]


@pytest.mark.parametrize("kwargs,exc,match", _bad_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_arguments_raise_clear_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        mim_fast.kgs_loss(**kwargs)


@pytest.mark.cuda
def test_reference_runs_on_cuda_and_matches_cpu():
    yk, yu, y, h = make_inputs(3, 64, 80, dtype=torch.float32)
    a = mim_fast.kgs_loss(yk, yu, y, h, backend="torch")
    b = mim_fast.kgs_loss(yk.cuda(), yu.cuda(), y.cuda(), h.cuda(), backend="torch")
    assert torch.equal(a.teacher, b.teacher.cpu())
    torch.testing.assert_close(a.loss, b.loss.cpu())
    with pytest.raises(ValueError, match="h is on cpu but yk is on cuda"):
        mim_fast.kgs_loss(yk.cuda(), yu.cuda(), y.cuda(), h)


# ====================================================================================================
# Fused backends (cpu: C++ kernel; triton: under TRITON_INTERPRET=1 on CPU; cuda: GPU only) against the
# reference: forward terms, routing and the gradients of every term for random upstream gradients.
# ====================================================================================================
from mim_fast.ops import _backends  # noqa: E402

FUSED = [pytest.param("cpu", marks=pytest.mark.skipif(mim_fast.build_info() is None, reason="no _C")),
         pytest.param("triton", marks=pytest.mark.triton),
         pytest.param("cuda", marks=pytest.mark.cuda)]
DEVICE = {"cpu": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu", "cuda": "cuda"}
FORWARD_OP = {"cpu": "kgs_loss_forward", "cuda": "kgs_loss_forward", "triton": "kgs_loss_forward_triton"}
BACKWARD_OP = {"cpu": "kgs_loss_backward", "cuda": "kgs_loss_backward", "triton": "kgs_loss_backward_triton"}


def _skip_unless_available(backend, dtype=torch.float32):
    reason = _backends.backend_status("kgs_loss", DEVICE[backend], (dtype,))[backend]
    if reason:
        pytest.skip(reason)


@pytest.mark.triton
def test_triton_refuses_float64_with_the_reason():
    """On the device Triton runs on here (a GPU, or the CPU under the interpreter): float64 is refused,
    and the error says so. (With CPU tensors on a GPU machine the refusal names the device instead.)"""
    dev = DEVICE["triton"]
    if _backends.triton_import_error() or (dev == "cpu" and not _backends.triton_interpreting()):
        pytest.skip("Triton cannot run on %s here" % dev)
    yk, yu, y, h = (t.to(dev) for t in make_inputs(3, 4, 5, dtype=torch.float32))
    with pytest.raises(mim_fast.BackendUnavailableError, match=r"kgs_loss: backend 'triton' cannot run here: .*float64"):
        mim_fast.kgs_loss(yk, yu, y, h.double(), backend="triton")


def run_kgs(backend, yk, yu, y, h, grad_out=None, *, terms=TERMS, **opts):
    """Forward and backward of kgs_loss on `backend`: (output with detached fields, [grad of yk, yu, y, h]).

    Only the outputs named in `terms` are back-propagated, each with its upstream gradient grad_out[name]."""
    ins = [t.detach().clone().requires_grad_() for t in (yk, yu, y, h)]
    out = mim_fast.kgs_loss(*ins, backend=backend, **opts)
    if grad_out is not None:
        torch.autograd.backward([getattr(out, k) for k in terms],
                                [grad_out[k].to(getattr(out, k).dtype) for k in terms])
    out = KGSLossOutput(*(t.detach() for t in out))
    return out, [t.grad for t in ins]


def _random_grad_out(B, reduction, device, dtype=torch.float32):
    shape = (B,) if reduction == "none" else ()
    return {k: torch.randn(shape, dtype=dtype, device=device) for k in TERMS}


def _close(got, want, name, *, rtol=1e-5, scale_atol=1e-5, equal_nan=False):
    """assert_close with an absolute tolerance relative to the reference's magnitude: the KL gradient
    q − p cancels, so its error is ~ulp of the larger of q and p, not of the difference."""
    if want is None:
        assert got is None or not got.any(), name
        return
    w = want.detach().double().cpu()
    finite = w[torch.isfinite(w)]
    atol = scale_atol * (float(finite.abs().max()) if finite.numel() else 0.0) + 1e-30
    torch.testing.assert_close(got.detach().double().cpu(), w, rtol=rtol, atol=atol, equal_nan=equal_nan,
                               msg=lambda s: "%s: %s" % (name, s))


# The KL of two nearly equal distributions is ill-conditioned: every log-probability carries a rounding
# error ≈ ε·(|x| + log D) and ½T² amplifies the sum, so one draw's float32 error in `inter` (and in the
# loss that contains it) fluctuates by 10× between equally careful implementations — up to ~1e-5 of its
# magnitude for the reference, the C++ and the Triton kernels alike (150 random cases, M ≤ 5, kd_scale
# ≤ 10). The 2× rule gets a floor of that size there; elsewhere 1e-5 of the magnitude (sums over D and B
# in another order: torch's own error is sometimes ~1e-8 by luck, which would make 2× of it a coin toss). The same holds for ∂inter/∂h
# = c·(q − p): the difference of two nearly equal distributions, each rounded at ε·max(p, q) (seen: a
# fused error of 1.8e-5 of max|∂L/∂h| against torch's 2e-6 in about 1 run in 10).
_FLOOR = {"inter": 4e-5, "loss": 4e-5, "grad h": 4e-5}


def _accurate(got, ref, exact, name, *, floor=None):
    """The project's accuracy rule (flash-attention's): against a float64 computation on the same inputs,
    the fused result's error is at most twice that of the same-precision torch reference, plus `floor`
    relative to the result's magnitude. Non-finite values must match exactly."""
    floor = _FLOOR.get(name, 1e-5) if floor is None else floor
    # a result stored in float16/bfloat16 is rounded to its grid: either side of a half-ulp is right, and
    # torch being on the lucky side makes 2× its error a coin toss (seen: bf16 ∂L/∂h 0.256 vs 2×0.124)
    floor = max(floor, torch.finfo(got.dtype).eps) if got.is_floating_point() else floor
    # ... and below its smallest normal the grid is absolute (float16: steps of 2^-24 = 6e-8): two of its
    # steps (seen: a float16 ∂L/∂h of magnitude 7e-5, fused 1.5 steps off, torch 0.5, in ~1 run in 8)
    subnormal = (2 * torch.finfo(got.dtype).tiny * torch.finfo(got.dtype).eps
                 if got.is_floating_point() and got.dtype in (torch.float16, torch.bfloat16) else 0.0)
    g, r, e = (t.detach().double().cpu() for t in (got, ref, exact))
    finite = torch.isfinite(e)
    torch.testing.assert_close(g[~finite], e[~finite], rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: "%s (non-finite): %s" % (name, m))
    if finite.any():
        err_fused = float((g[finite] - e[finite]).abs().max())
        err_torch = float((r[finite] - e[finite]).abs().max())
        bound = 2 * err_torch + floor * float(e[finite].abs().max()) + subnormal + 1e-30
        assert err_fused <= bound, (name, err_fused, err_torch, bound)


def _check_outputs(got, ggot, ref, gref, exact, gexact, names, rtol):
    """Fused vs reference: same teacher, dtypes and shapes; values by the accuracy rule (float64 inputs:
    within rtol of the reference, which is then itself the float64 computation)."""
    assert torch.equal(got.teacher.cpu(), ref.teacher), "teachers differ"
    for k in TERMS + ("alpha",):
        a, b = getattr(got, k), getattr(ref, k)
        assert a.dtype == b.dtype and a.shape == b.shape, k
        if exact is None:
            _close(a, b, k, rtol=rtol, equal_nan=True)
        else:
            _accurate(a, b, getattr(exact, k), k)
    for i, (name, a, b) in enumerate(zip(names, ggot, gref)):
        assert (a is None) == (b is None), name
        if b is None:
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if exact is None:
            _close(a, b, "grad " + name, rtol=rtol, equal_nan=True)
        else:
            _accurate(a, b, gexact[i], "grad " + name)


def compare_to_reference(backend, yk, yu, y, h, grad_out, *, terms=TERMS, rtol=1e-10, **opts):
    """kgs_loss on `backend` against the "torch" reference at the inputs' precision and in float64."""
    dev = DEVICE[backend]
    ins = (yk, yu, y, h)
    got, ggot = run_kgs(backend, *(t.to(dev) for t in ins), {k: v.to(dev) for k, v in grad_out.items()},
                        terms=terms, **opts)
    ref, gref = run_kgs("torch", *ins, grad_out, terms=terms, **opts)
    exact, gexact = (None, None) if all(t.dtype == torch.float64 for t in ins) else \
        run_kgs("torch", *(t.double() for t in ins), {k: v.double() for k, v in grad_out.items()}, terms=terms, **opts)
    _check_outputs(got, ggot, ref, gref, exact, gexact, ("yk", "yu", "y", "h"), rtol)
    return got, ggot


SMALL_SHAPES = [(2, 1, 1), (3, 5, 7), (5, 2, 80), (2, 3, 768)]
# Larger shapes with a sample of the options (the Triton interpreter runs ~1 ms per program).
LARGE_CASES = [((3, 4097, 80), OPTIONS[0]), ((2, 4097, 1), OPTIONS[10]), ((2, 5, 1500), OPTIONS[4]),
               ((5, 2, 1500), OPTIONS[8]), ((3, 33, 768), OPTIONS[7])]


# every option on the two smallest shapes, every other option on the wider ones
SMALL_CASES = [(shape, opts) for shape in SMALL_SHAPES
               for opts in (OPTIONS if shape[2] < 10 else OPTIONS[::2])]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("M,B,D,per_sample,kd_divide_T,reduction", [shape + opts for shape, opts in SMALL_CASES],
                         ids=["%s-%s" % (shape, OPTION_IDS[OPTIONS.index(opts)]) for shape, opts in SMALL_CASES])
def test_fused_matches_reference(backend, per_sample, kd_divide_T, reduction, M, B, D):
    _skip_unless_available(backend)
    yk, yu, y, h = make_inputs(M, B, D, dtype=torch.float32)
    opts = dict(per_sample=per_sample, kd_divide_T=kd_divide_T, reduction=reduction,
                kd_scale=float(1 + 9 * torch.rand(())), weights=tuple(float(v) for v in torch.rand(4) * 2))
    compare_to_reference(backend, yk, yu, y, h, _random_grad_out(B, reduction, "cpu"), **opts)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape,options", LARGE_CASES, ids=lambda v: str(v) if isinstance(v, tuple) and
                         isinstance(v[0], int) else OPTION_IDS[OPTIONS.index(v)] if v in OPTIONS else str(v))
def test_fused_matches_reference_large(backend, shape, options):
    _skip_unless_available(backend)
    (M, B, D), (per_sample, kd_divide_T, reduction) = shape, options
    yk, yu, y, h = make_inputs(M, B, D, dtype=torch.float32)
    compare_to_reference(backend, yk, yu, y, h, _random_grad_out(B, reduction, "cpu"), per_sample=per_sample,
                         kd_divide_T=kd_divide_T, reduction=reduction, weights=(0.5, 1.5, 0.8, 1.2))


@pytest.mark.parametrize("backend", FUSED)
def test_fused_matches_reference_mim_size(backend):
    """MIM's shape in a big batch: B = 4097 samples of D = 768 features, M = 3."""
    _skip_unless_available(backend)
    if backend == "triton" and DEVICE[backend] == "cpu":
        pytest.skip("9.4M features: too slow for the Triton interpreter")
    yk, yu, y, h = make_inputs(3, 4097, 768, dtype=torch.float32)
    compare_to_reference(backend, yk, yu, y, h, _random_grad_out(4097, "mean", "cpu"))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("terms", [("intra",), ("inter",), ("masked", "unmasked"), ("loss",), ("inter", "loss")],
                         ids=lambda t: "+".join(t))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_gradients_of_some_terms_only(backend, terms, reduction):
    """Back-propagating a subset of the terms (as MIM does: masked to the mask learners, the rest to all
    parameters) gives exactly those terms' gradients; unused outputs contribute nothing."""
    _skip_unless_available(backend)
    yk, yu, y, h = make_inputs(3, 9, 20, dtype=torch.float32)
    got, grads = compare_to_reference(backend, yk, yu, y, h, _random_grad_out(9, reduction, "cpu"), terms=terms,
                                      reduction=reduction, weights=(0.7, 1.3, 0.4, 2.0))
    if terms == ("intra",):  # intra has no y or h gradient: None, as from the reference's graph
        assert grads[2] is None and grads[3] is None
    if terms == ("inter",):  # inter only reaches h
        assert grads[0] is None and grads[1] is None and grads[2] is None and grads[3].any()
    if terms == ("masked", "unmasked"):  # MIM's mask-learner step: no ∂L/∂h is computed
        assert grads[3] is None


@pytest.mark.parametrize("backend", FUSED)
def test_fused_only_some_inputs_require_grad(backend):
    _skip_unless_available(backend)
    dev = DEVICE[backend]
    yk, yu, y, h = (t.to(dev) for t in make_inputs(3, 6, 11, dtype=torch.float32))
    for which in ([3], [0], [1, 2], []):
        ins = [t.clone().requires_grad_(i in which) for i, t in enumerate((yk, yu, y, h))]
        ref_ins = [t.detach().cpu().clone().requires_grad_(i in which) for i, t in enumerate(ins)]
        out = mim_fast.kgs_loss(*ins, backend=backend)
        ref = mim_fast.kgs_loss(*ref_ins, backend="torch")
        _close(out.loss, ref.loss, "loss")
        if which:
            out.loss.backward()
            ref.loss.backward()
        for i, (a, b) in enumerate(zip(ins, ref_ins)):
            assert (a.grad is None) == (i not in which)
            if i in which:
                _close(a.grad, b.grad, "grad %d" % i)
    with torch.no_grad():  # inference: no gradient is computed or saved
        out = mim_fast.kgs_loss(*(t.requires_grad_() for t in (yk.clone(), yu.clone(), y.clone(), h.clone())),
                                backend=backend)
        assert not out.loss.requires_grad


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("per_sample", [True, False])
def test_fused_exact_ties(backend, per_sample):
    """Exact ties give no transfer (I = J = 0) and no teacher (−1), bit for bit as the reference."""
    _skip_unless_available(backend)
    y = torch.zeros(6)
    # sample 0: modalities 0 and 1 tie for the lowest error; sample 1: a unique best (2); samples 2, 3:
    # masked and unmasked errors tie in every modality; sample 4: all three tie; sample 5: |−0.5| = |0.5|.
    yk = torch.tensor([[0.5, 1.0, 0.3, -0.7, 0.25, -0.5], [-0.5, 2.0, 0.3, 0.7, -0.25, 0.75],
                       [1.5, 0.25, -0.3, 0.9, 0.25, 1.0]])
    yu = torch.tensor([[0.9, 3.0, -0.3, 0.7, 0.25, 0.5], [0.1, 1.0, 0.3, -0.7, 0.5, 1.0],
                       [1.0, 0.5, 0.3, -0.9, -0.25, 2.0]])
    if not per_sample:  # batch mode: modality 0 ties between the branches, modalities 1 and 2 tie as teachers
        yk[0] = 4 * yk[0]
        yu[0] = -yk[0]
        yk[1] = torch.tensor([-0.5, 2.0, 0.25, 0.75, -0.25, 0.75])  # dyadic: every summation order is exact
        yk[2] = yk[1].flip(0)
    h = torch.randn(3, 6, 9)
    got, grads = compare_to_reference(backend, yk, yu, y, h, _random_grad_out(6, "none", "cpu"), reduction="none",
                                      per_sample=per_sample)
    _, intra_grads = compare_to_reference(backend, yk, yu, y, h, _random_grad_out(6, "none", "cpu"),
                                          terms=("intra",), reduction="none", per_sample=per_sample)
    if per_sample:
        assert got.teacher.tolist()[:2] == [-1, 2] and got.teacher.tolist()[4:] == [-1, 0]
        assert float(got.intra[2]) == 0.0 and float(got.intra[3]) == 0.0
        assert not grads[3][:, 0].any() and not grads[3][2, 1].any() and grads[3][0, 1].any()
        assert not intra_grads[0][:, 2:4].any() and not intra_grads[1][:, 2:4].any()  # tied branches
    else:
        assert (got.teacher == -1).all() and not grads[3].any()
        assert not intra_grads[0][0].any() and not intra_grads[1][0].any()  # tied modality: no intra gradient
        assert intra_grads[0][1:].any() or intra_grads[1][1:].any()


@pytest.mark.parametrize("backend", FUSED)
def test_fused_predictions_equal_to_labels(backend):
    """sign(0) = 0: a prediction equal to its label gets no masked/unmasked gradient; equal branches tie."""
    _skip_unless_available(backend)
    y = torch.tensor([0.5, -1.0, 2.0])
    yk = torch.tensor([[0.5, 0.0, 2.0], [0.5, -1.0, 1.0]])
    yu = torch.tensor([[0.5, -1.0, 2.0], [1.0, -1.0, 1.0]])
    h = torch.randn(2, 3, 5)
    got, grads = compare_to_reference(backend, yk, yu, y, h, _random_grad_out(3, "sum", "cpu"), reduction="sum",
                                      weights=(0.0, 1.0, 1.0, 1.0))
    assert grads[0][0, 0] == 0 and grads[1][0, 0] == 0 and grads[0][0, 2] == 0


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("where", ["yk", "y", "h_student", "h_teacher", "h_inf"])
def test_fused_nan_and_inf_propagate_like_the_reference(backend, where):
    _skip_unless_available(backend)
    yk, yu, y, h = make_inputs(3, 5, 13, dtype=torch.float32)
    # make modality 0 the teacher of every sample, so "student" and "teacher" rows are known
    yk[0] = y + 0.01 * torch.sign(torch.randn(5))
    yk[1:] = y + 1 + torch.rand(2, 5)
    if where == "yk":
        yk[1, 2] = float("nan")  # sample 2: a NaN error never wins, no teacher, NaN masked term
    elif where == "y":
        y[3] = float("nan")
    elif where == "h_student":
        h[2, 1, 4] = float("nan")
    elif where == "h_teacher":
        h[0, 4, 0] = float("nan")
    else:
        h[1, 0, 3] = float("inf")
        h[2, 1, 5] = float("-inf")
        h[0, 2, 6] = float("-inf")
    got, _ = compare_to_reference(backend, yk, yu, y, h, _random_grad_out(5, "none", "cpu"), reduction="none")
    assert not torch.isfinite(got.loss).all()
    if where == "yk":
        assert got.teacher[2] == -1 and float(got.inter[2]) == 0.0
    if where in ("yk", "y"):  # only some terms back-propagated: NaN enters exactly where the reference's does
        for terms in [("masked",), ("intra",), ("unmasked", "inter")]:
            compare_to_reference(backend, yk, yu, y, h, _random_grad_out(5, "none", "cpu"), terms=terms,
                                 reduction="none")


def _assert_half_precision_within_2x(pairs, dtype):
    """(fused, torch, float64 exact, name) tuples: each fused result is in `dtype` and its error against
    the exact value is at most twice torch's plus one ulp of `dtype` at the result's scale."""
    for g, r, e, name in pairs:
        assert g.dtype == dtype, name
        err_fused = float((g.double().cpu() - e).abs().max())
        err_torch = float((r.double() - e).abs().max())
        floor = torch.finfo(dtype).eps * float(e.abs().max() + 1e-6)
        assert err_fused <= 2 * err_torch + floor, (name, err_fused, err_torch, floor)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_half_precision_within_2x_of_torch_error(backend, dtype):
    """flash-attention's rule: the fused result's error against a float64 computation on the same
    (rounded) inputs is at most twice the error of the same-precision torch reference, plus one ulp of
    the output's dtype at the output's scale."""
    _skip_unless_available(backend, dtype)
    dev = DEVICE[backend]
    M, B, D = 3, 37, 80
    ins = [t.to(dtype) for t in make_inputs(M, B, D, dtype=torch.float32)]
    for reduction in ("mean", "none"):
        go = _random_grad_out(B, reduction, "cpu")
        exact, gexact = run_kgs("torch", *(t.double() for t in ins), go, reduction=reduction)
        got, ggot = run_kgs(backend, *(t.to(dev) for t in ins), {k: v.to(dev) for k, v in go.items()},
                            reduction=reduction)
        ref, gref = run_kgs("torch", *ins, go, reduction=reduction)
        assert torch.equal(got.teacher.cpu(), exact.teacher) and torch.equal(ref.teacher, exact.teacher)
        pairs = [(getattr(got, k), getattr(ref, k), getattr(exact, k), k) for k in TERMS + ("alpha",)]
        pairs += [(a, b, c, "grad") for a, b, c in zip(ggot, gref, gexact)]
        _assert_half_precision_within_2x(pairs, dtype)


@pytest.mark.parametrize("backend", FUSED)
def test_fused_float64_and_mixed_dtypes(backend):
    dev = DEVICE[backend]
    yk, yu, y, h = make_inputs(3, 7, 19)
    if backend != "cpu":
        _skip_unless_available(backend)  # (the device itself must be one the backend runs on)
        reason = _backends.backend_status("kgs_loss", dev, (torch.float64,))[backend]
        assert reason and "float64" in reason  # fp64 is a CPU-only feature, refused with a reason
        with pytest.raises(mim_fast.BackendUnavailableError, match="float64"):
            mim_fast.kgs_loss(yk.to(dev), yu.to(dev), y.to(dev), h.to(dev), backend=backend)
        pytest.skip(reason)
    _skip_unless_available(backend)
    for opts in OPTIONS[::3]:
        per_sample, kd_divide_T, reduction = opts
        compare_to_reference(backend, yk, yu, y, h, _random_grad_out(7, reduction, "cpu", torch.float64),
                             per_sample=per_sample, kd_divide_T=kd_divide_T, reduction=reduction)
    # mixed: float64 anywhere makes float64 the compute and output dtype; each gradient keeps its input's dtype
    for dts in [(torch.float32, torch.float32, torch.float64, torch.float32),
                (torch.float64, torch.float32, torch.float32, torch.bfloat16),
                (torch.float16, torch.bfloat16, torch.float32, torch.float32)]:
        ins = [t.to(d) for t, d in zip((yk, yu, y, h), dts)]
        got, grads = compare_to_reference(backend, *ins, _random_grad_out(7, "none", "cpu"), reduction="none")
        assert [g.dtype for g in grads] == list(dts)


@pytest.mark.parametrize("backend", FUSED)
def test_fused_strided_inputs_are_read_in_place(backend):
    _skip_unless_available(backend)
    yk, yu, y, h = make_inputs(3, 6, 21, dtype=torch.float32)
    h_strided = torch.randn(6, 3, 2 * 21 + 1).transpose(0, 1)[:, :, 1::2]  # non-contiguous in every dim
    h_strided.copy_(h)
    yk_t = yk.t().contiguous().t()  # (M, B) stored sample-major: strides (1, M)
    y_s = torch.randn(12)[::2]
    y_s.copy_(y)
    compare_to_reference(backend, yk_t, yu, y_s, h_strided, _random_grad_out(6, "mean", "cpu"), kd_divide_T=True)


@pytest.mark.parametrize("backend", FUSED)
def test_fused_is_deterministic_and_does_not_mutate_inputs(backend):
    _skip_unless_available(backend)
    dev = DEVICE[backend]
    ins = [t.to(dev) for t in make_inputs(3, 300, 40, dtype=torch.float32)]
    copies = [t.clone() for t in ins]
    go = _random_grad_out(300, "mean", dev)
    for per_sample in (True, False):
        a, ga = run_kgs(backend, *ins, go, per_sample=per_sample)
        b, gb = run_kgs(backend, *ins, go, per_sample=per_sample)
        for u, v in zip(list(a) + ga, list(b) + gb):
            assert torch.equal(u, v)
    for t, c in zip(ins, copies):
        assert torch.equal(t, c)


def test_triton_chunked_feature_path_matches_reference():
    """D larger than one feature tile: the online log-sum-exp over D-chunks (the GPU path for wide rows)."""
    _skip_unless_available("triton")
    from mim_fast.triton import kgs_loss as tk

    M, B, D = 3, 6, 1500
    yk, yu, y, h = make_inputs(M, B, D, dtype=torch.float32)
    h[1, 2, :700] = float("-inf")  # a chunk of −inf in a row: adds exp(−inf) = 0, as the reference
    for per_sample, reduction in [(True, "none"), (False, "sum")]:
        ref = reference.kgs_loss(yk, yu, y, h, per_sample=per_sample, reduction=reduction)
        ins = [t.clone().requires_grad_() for t in (yk, yu, y, h)]
        ref_t = reference.kgs_loss(*ins, per_sample=per_sample, reduction=reduction)
        ref_t.inter.sum().backward()
        dev = DEVICE["triton"]
        out = tk.kgs_loss_forward(yk.to(dev), yu.to(dev), y.to(dev), h.to(dev), per_sample, 10.0, False,
                                  [1.0, 1.0, 1.0, 1.0], reduction, 1e-12, True, True, block_d=256)
        assert torch.equal(out[5].cpu(), ref.teacher)
        for i, k in enumerate(TERMS):
            _close(out[i], getattr(ref, k), k, equal_nan=True)
        g = tk.kgs_loss_backward(None, None, torch.ones_like(out[2]), None, None, out[7], out[8],
                                 [1.0, 1.0, 1.0, 1.0], torch.float32, torch.float32, torch.float32)
        _close(g[3], ins[3].grad, "grad h", equal_nan=True)


def test_cpu_kernel_is_bit_identical_across_isas():
    """The CPU kernel's vector loops use the same IEEE operations at every width (fixed lanes, no FMA):
    the baseline x86-64 build (in a subprocess) gives the same bits as the widest one here."""
    if mim_fast.build_info() is None:
        pytest.skip("no _C")
    code = ("import sys, torch, mim_fast; torch.manual_seed(5)\n"
            "y = torch.randn(77); yk = y + torch.randn(3, 77); yu = y + torch.randn(3, 77)\n"
            "h = torch.randn(3, 77, 130).requires_grad_()\n"
            "out = mim_fast.kgs_loss(yk, yu, y, h, backend='cpu', reduction='none', kd_divide_T=True)\n"
            "out.inter.sum().backward()\n"
            "torch.save([out.loss, out.inter, out.alpha, h.grad], sys.argv[1])\n")
    baseline = saved_under_isa(code, "default", "kgs")
    exec(code.replace("torch.save([out.loss, out.inter, out.alpha, h.grad], sys.argv[1])",
                      "here = [out.loss, out.inter, out.alpha, h.grad]"), scope := {})
    for a, b in zip(baseline, scope["here"]):
        assert torch.equal(a, b)


def _op_samples(dev):
    """(forward args, requires_grad flags) covering the options and the grad_preds/grad_h switches."""
    samples = []
    for (M, B, D), per_sample, kd_divide_T, reduction, grad_preds, grad_h in [
            ((3, 5, 7), True, False, "mean", True, True), ((2, 4, 3), False, True, "none", True, False),
            ((3, 1, 1), True, True, "sum", False, True), ((2, 3, 5), False, False, "mean", False, False)]:
        yk, yu, y, h = (t.to(dev) for t in make_inputs(M, B, D, dtype=torch.float32))
        yk.requires_grad_(grad_preds)
        y.requires_grad_(grad_preds)
        h.requires_grad_(grad_h)
        samples.append((yk, yu, y, h, per_sample, 7.0, kd_divide_T, [0.5, 1.0, 1.5, 2.0], reduction, 1e-12,
                        grad_preds, grad_h))
    return samples


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend):
    _skip_unless_available(backend)
    dev = DEVICE[backend]
    fwd = getattr(torch.ops.mim_fast, FORWARD_OP[backend])
    bwd = getattr(torch.ops.mim_fast, BACKWARD_OP[backend])
    for args in _op_samples(dev):
        torch.library.opcheck(fwd, args)
        out = fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
        B = args[0].shape[1]
        shape = (B,) if args[8] == "none" else ()
        g = [torch.randn(shape, device=dev), None, torch.randn(shape, device=dev), None,
             torch.randn(shape, device=dev).expand(shape)]
        torch.library.opcheck(bwd, (*g, out[7], out[8], args[7], torch.float32, torch.float32, torch.float32))
    # strided views are read in place
    yk, yu, y, h = (t.to(dev) for t in make_inputs(3, 4, 6, dtype=torch.float32))
    h_t = h.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    torch.library.opcheck(fwd, (yk.t().contiguous().t(), yu, y, h_t, True, 10.0, False, [1.0, 1.0, 1.0, 1.0],
                                "none", 1e-12, False, True))


@pytest.mark.parametrize("backend", FUSED)
def test_compile_fullgraph(backend):
    _skip_unless_available(backend)
    dev = DEVICE[backend]
    torch._dynamo.reset()

    def step(yk, yu, y, h):
        a = mim_fast.kgs_loss(yk, yu, y, h, kd_divide_T=True, backend=backend)
        b = mim_fast.kgs_loss(yk, yu, y, h, per_sample=False, reduction="none", backend=backend)
        # the heads op too: h as h_masked, h flipped as h_unmasked, yk's first column as weights
        c = mim_fast.kgs_loss_with_heads(h, h.flip(1), h[:, 0] * 0.1, yk[:, 1], y,
                                         backend="triton" if backend == "cuda" else backend)
        return a.loss + 0.5 * a.inter + (b.intra * y).sum() + c.loss, a.teacher, b.alpha

    compiled = torch.compile(step, fullgraph=True)
    ins = [t.to(dev) for t in make_inputs(3, 8, 16, dtype=torch.float32)]
    xa = [t.clone().requires_grad_() for t in ins]
    xb = [t.clone().requires_grad_() for t in ins]
    ra, rb = step(*xa), compiled(*xb)
    ra[0].backward()
    rb[0].backward()
    assert torch.equal(ra[1], rb[1])
    torch.testing.assert_close(ra[0], rb[0])
    torch.testing.assert_close(ra[2], rb[2])
    for u, v in zip(xa, xb):
        torch.testing.assert_close(u.grad, v.grad)


@pytest.mark.cuda
def test_cuda_large_batch_and_wide_rows():
    """Many blocks for the last-block reduction, the batch-mean pass, and a row wider than a warp loop."""
    for (M, B, D), per_sample in [((3, 65536, 80), True), ((3, 20000, 80), False), ((4, 7, 5000), True)]:
        yk, yu, y, h = make_inputs(M, B, D, dtype=torch.float32)
        compare_to_reference("cuda", yk, yu, y, h, _random_grad_out(B, "mean", "cpu"), per_sample=per_sample)


# ====================================================================================================
# mim_fast.nn.KGSLoss
# ====================================================================================================
@pytest.mark.parametrize("backend", ["torch"] + FUSED)
def test_module_equals_functional_and_drives_mims_two_gradient_sets(backend):
    """The module is kgs_loss with its options fixed; MIM's step takes two gradient sets from one
    forward (SPEC §3): masked → the mask learners, unmasked + inter + intra → everything."""
    if backend != "torch":
        _skip_unless_available(backend)
    dev = DEVICE.get(backend, "cpu")
    loss_fn = mim_fast.nn.KGSLoss(per_sample=True, kd_scale=8.0, kd_divide_T=True, weights=(0.5, 1.0, 2.0, 1.0),
                                  reduction="mean", backend=backend)
    assert "kd_scale=8" in repr(loss_fn) and "reduction='mean'" in repr(loss_fn) and not list(loss_fn.parameters())
    yk, yu, y, h = (t.to(dev) for t in make_inputs(3, 12, 16, dtype=torch.float32))
    out = loss_fn(yk, yu, y, h)
    ref = mim_fast.kgs_loss(yk, yu, y, h, kd_scale=8.0, kd_divide_T=True, weights=(0.5, 1.0, 2.0, 1.0),
                            backend=backend)
    for a, b in zip(out, ref):
        assert torch.equal(a, b)

    ins = [t.clone().requires_grad_() for t in (yk, yu, y, h)]
    ref_ins = [t.detach().cpu().clone().requires_grad_() for t in ins]
    grads = []
    for xs, fn in ((ins, loss_fn), (ref_ins, mim_fast.nn.KGSLoss(kd_scale=8.0, kd_divide_T=True, backend="torch"))):
        o = fn(*xs)
        g_a = torch.autograd.grad(o.masked, xs, allow_unused=True, retain_graph=True)
        g_b = torch.autograd.grad(o.unmasked + o.inter + o.intra, xs, allow_unused=True)
        grads.append((g_a, g_b))
    for got, want in zip(grads[0], grads[1]):
        for name, a, b in zip(("yk", "yu", "y", "h"), got, want):
            assert (a is None) == (b is None), name
            if b is not None:
                _close(a, b, name)


def test_module_rejects_bad_options_at_construction():
    with pytest.raises(ValueError, match="reduction must be one of"):
        mim_fast.nn.KGSLoss(reduction="avg")
    with pytest.raises(ValueError, match="kd_scale must be a finite number > 0"):
        mim_fast.nn.KGSLoss(kd_scale=-1.0)
    with pytest.raises(ValueError, match="weights must be 4 numbers"):
        mim_fast.nn.KGSLoss(weights=(1.0,))
    # the functional op's own checks (ops/kgs_loss.py::_options), float32's range included
    with pytest.raises(ValueError, match="kd_scale must lie in"):
        mim_fast.nn.KGSLoss(kd_scale=1e20)
    with pytest.raises(ValueError, match=r"weights\[2\] must lie within float32's range"):
        mim_fast.nn.KGSLoss(weights=(1.0, 1.0, -1e39, 1.0))
    with pytest.raises(TypeError, match="per_sample must be a bool"):
        mim_fast.nn.KGSLoss(per_sample=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        mim_fast.nn.KGSLoss(backend="gpu")


# ====================================================================================================
# kgs_loss_with_heads: the predictions from MIM's per-modality heads inside the fused pass
# ====================================================================================================
HEADS_FUSED = [pytest.param("cpu", marks=pytest.mark.skipif(mim_fast.build_info() is None, reason="no _C")),
               pytest.param("triton", marks=pytest.mark.triton)]
HEADS_FORWARD_OP = {"cpu": "kgs_loss_heads_forward", "triton": "kgs_loss_heads_forward_triton"}
HEADS_BACKWARD_OP = {"cpu": "kgs_loss_heads_backward", "triton": "kgs_loss_heads_backward_triton"}


def make_head_inputs(M, B, D, dtype=torch.float32):
    """Dyadic values (h: multiples of 1/32, weight 1/64, bias 1/64, y 1/16, small enough that every dot
    product over D ≤ 2048 features is exact in float32): the fused kernel and the reference then compute
    bit-identical predictions, so their routing (strict comparisons of errors) is comparable exactly."""
    q = lambda t, s: (t * s).round() / s  # noqa: E731
    h_masked = q(torch.randn(M, B, D).clamp(-4, 4), 32)
    h_unmasked = q(torch.randn(M, B, D).clamp(-4, 4), 32)
    weight = q(torch.randn(M, D).clamp(-3, 3) / 4, 64)
    bias = q(torch.randn(M), 64)
    y = q(torch.empty(B).uniform_(-3, 3), 16)
    return [t.to(dtype) for t in (h_masked, h_unmasked, weight, bias, y)]


def run_heads(backend, inputs, grad_out=None, *, terms=TERMS, **opts):
    ins = [t.detach().clone().requires_grad_() for t in inputs]
    out = mim_fast.kgs_loss_with_heads(*ins, backend=backend, **opts)
    if grad_out is not None:
        torch.autograd.backward([getattr(out, k) for k in terms],
                                [grad_out[k].to(getattr(out, k).dtype) for k in terms])
    return KGSLossOutput(*(t.detach() for t in out)), [t.grad for t in ins]


def compare_heads_to_reference(backend, inputs, grad_out, *, terms=TERMS, rtol=1e-10, **opts):
    dev = DEVICE[backend]
    got, ggot = run_heads(backend, [t.to(dev) for t in inputs], {k: v.to(dev) for k, v in grad_out.items()},
                          terms=terms, **opts)
    ref, gref = run_heads("torch", inputs, grad_out, terms=terms, **opts)
    exact, gexact = (None, None) if all(t.dtype == torch.float64 for t in inputs) else \
        run_heads("torch", [t.double() for t in inputs], {k: v.double() for k, v in grad_out.items()}, terms=terms,
                  **opts)
    _check_outputs(got, ggot, ref, gref, exact, gexact, ("h_masked", "h_unmasked", "weight", "bias", "y"), rtol)
    return got, ggot


def test_reference_heads_are_mims_linear_heads():
    """reference.kgs_loss_with_heads is C_m = Linear(D, 1) per modality, shared by both branches, then kgs_loss."""
    M, B, D = 3, 7, 10
    hm, hu, w, b, y = (t.double() for t in make_head_inputs(M, B, D))
    heads = [torch.nn.Linear(D, 1).double() for _ in range(M)]
    with torch.no_grad():
        for m, lin in enumerate(heads):
            lin.weight.copy_(w[m:m + 1])
            lin.bias.copy_(b[m:m + 1])
    yk = torch.stack([heads[m](hm[m]).squeeze(-1) for m in range(M)])
    yu = torch.stack([heads[m](hu[m]).squeeze(-1) for m in range(M)])
    want = mim_fast.kgs_loss(yk, yu, y, hm, per_sample=False, reduction="none")
    got = reference.kgs_loss_with_heads(hm, hu, w, b, y, per_sample=False, reduction="none")
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", HEADS_FUSED)
@pytest.mark.parametrize("per_sample,kd_divide_T,reduction", OPTIONS[::2] + OPTIONS[1::4], ids=lambda v: str(v))
@pytest.mark.parametrize("M,B,D", [(2, 1, 1), (3, 9, 80), (5, 3, 37)], ids=lambda v: str(v))
def test_heads_fused_matches_reference(backend, per_sample, kd_divide_T, reduction, M, B, D):
    _skip_unless_available(backend)
    compare_heads_to_reference(backend, make_head_inputs(M, B, D), _random_grad_out(B, reduction, "cpu"),
                               per_sample=per_sample, kd_divide_T=kd_divide_T, reduction=reduction,
                               weights=(0.6, 1.4, 0.9, 1.1))


@pytest.mark.parametrize("backend", HEADS_FUSED)
def test_heads_fused_matches_reference_large(backend):
    _skip_unless_available(backend)
    (M, B, D), per_sample = ((3, 4097, 80), True) if backend == "cpu" else ((3, 1025, 64), False)
    compare_heads_to_reference(backend, make_head_inputs(M, B, D), _random_grad_out(B, "mean", "cpu"),
                               per_sample=per_sample)


@pytest.mark.parametrize("backend", HEADS_FUSED)
@pytest.mark.parametrize("terms", [("masked",), ("unmasked", "inter"), ("intra",), ("inter",)], ids="+".join)
def test_heads_gradients_of_some_terms_only(backend, terms):
    """MIM's step: masked alone (→ mask learners) and the rest (→ all parameters) from one forward."""
    _skip_unless_available(backend)
    got, grads = compare_heads_to_reference(backend, make_head_inputs(3, 10, 24), _random_grad_out(10, "mean", "cpu"),
                                            terms=terms)
    if terms == ("masked",):
        assert grads[1] is None and grads[0] is not None  # h_unmasked only feeds yu
    if terms == ("inter",):
        assert grads[1] is None and grads[2] is None and grads[3] is None and grads[4] is None


@pytest.mark.parametrize("backend", HEADS_FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_heads_half_precision_within_2x_of_torch_error(backend, dtype):
    _skip_unless_available(backend, dtype)
    dev = DEVICE[backend]
    ins = make_head_inputs(3, 29, 48, dtype)
    go = _random_grad_out(29, "mean", "cpu")
    # float64 of the same function: the predictions rounded to the input dtype (straight through)
    xs = [t.double().requires_grad_() for t in ins]
    yk, yu = reference.kgs_heads(*xs[:4])
    yk = yk + (yk.to(dtype).double() - yk).detach()
    yu = yu + (yu.to(dtype).double() - yu).detach()
    exact = mim_fast.kgs_loss(yk, yu, xs[4], xs[0], backend="torch")
    torch.autograd.backward([getattr(exact, k) for k in TERMS], [go[k].double() for k in TERMS])
    got, ggot = run_heads(backend, [t.to(dev) for t in ins], {k: v.to(dev) for k, v in go.items()})
    ref, gref = run_heads("torch", ins, go)
    assert torch.equal(got.teacher.cpu(), exact.teacher) and torch.equal(ref.teacher, exact.teacher)
    pairs = [(getattr(got, k), getattr(ref, k), getattr(exact, k).detach(), k) for k in TERMS + ("alpha",)]
    pairs += [(a, b, x.grad, "grad") for a, b, x in zip(ggot, gref, xs)]
    _assert_half_precision_within_2x(pairs, dtype)


@pytest.mark.parametrize("backend", HEADS_FUSED)
def test_heads_float64_strides_and_determinism(backend):
    _skip_unless_available(backend)
    hm, hu, w, b, y = make_head_inputs(3, 6, 21)
    hu_strided = torch.empty(6, 3, 43)[:, :, 1::2].transpose(0, 1)
    hu_strided.copy_(hu)
    a = compare_heads_to_reference(backend, [hm, hu_strided, w.t().contiguous().t(), b, y],
                                   _random_grad_out(6, "sum", "cpu"), reduction="sum", kd_divide_T=True)
    b2 = compare_heads_to_reference(backend, [hm, hu_strided, w.t().contiguous().t(), b, y],
                                    _random_grad_out(6, "sum", "cpu"), reduction="sum", kd_divide_T=True)
    assert torch.equal(a[0].loss, b2[0].loss)
    if backend == "cpu":
        compare_heads_to_reference(backend, [t.double() for t in (hm, hu, w, b, y)],
                                   _random_grad_out(6, "none", "cpu", torch.float64), reduction="none")
    else:
        assert "float64" in _backends.backend_status("kgs_loss_with_heads", DEVICE[backend], (torch.float64,))[backend]


def test_triton_heads_chunked_feature_path():
    _skip_unless_available("triton")
    from mim_fast.triton import kgs_loss as tk

    hm, hu, w, b, y = make_head_inputs(3, 5, 700)
    ref = reference.kgs_loss_with_heads(hm, hu, w, b, y, reduction="none")
    dev = DEVICE["triton"]  # the launcher is called directly: inputs on the device Triton runs on
    out = tk.kgs_loss_heads_forward(*(t.to(dev) for t in (hm, hu, w, b, y)), True, 10.0, False, [1.0, 1.0, 1.0, 1.0],
                                    "none", 1e-12, False, False, block_d=256)
    assert torch.equal(out[5].cpu(), ref.teacher)
    for i, k in enumerate(TERMS):
        _close(out[i], getattr(ref, k), k)


@pytest.mark.parametrize("backend", HEADS_FUSED)
def test_heads_opcheck(backend):
    _skip_unless_available(backend)
    dev = DEVICE[backend]
    fwd = getattr(torch.ops.mim_fast, HEADS_FORWARD_OP[backend])
    bwd = getattr(torch.ops.mim_fast, HEADS_BACKWARD_OP[backend])
    for (M, B, D), per_sample, reduction, grad in [((3, 5, 7), True, "mean", True), ((2, 4, 3), False, "none", False)]:
        ins = [t.to(dev).requires_grad_(grad) for t in make_head_inputs(M, B, D)]
        args = (*ins, per_sample, 10.0, False, [1.0, 0.5, 2.0, 1.0], reduction, 1e-12, grad, grad)
        torch.library.opcheck(fwd, args)
        out = fwd(*[t.detach() for t in ins], *args[5:11], True, True)
        shape = (B,) if reduction == "none" else ()
        g = [torch.randn(shape, device=dev), None, torch.randn(shape, device=dev), torch.randn(shape, device=dev), None]
        torch.library.opcheck(bwd, (*g, out[7], out[8], ins[0].detach(), ins[1].detach(), ins[2].detach(),
                                    [1.0, 0.5, 2.0, 1.0], [True, True, True, True, True], torch.float32,
                                    torch.float32))


@pytest.mark.cuda
def test_heads_on_cuda_run_through_triton():
    reason = _backends.backend_status("kgs_loss_with_heads", "cuda", (torch.float32,))["cuda"]
    assert reason  # no hand-written CUDA kernel: "auto" takes the Triton one on GPUs
    compare_heads_to_reference("triton", make_head_inputs(3, 300, 80), _random_grad_out(300, "mean", "cpu"))


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_backward_when_the_reached_terms_touch_no_input_that_requires_grad(backend, reduction):
    """inter reaches only h; with h frozen (and only yk trainable) the backward has nothing to compute."""
    if mim_fast.backend_status("kgs_loss", "cpu")[backend]:
        pytest.skip(mim_fast.backend_status("kgs_loss", "cpu")[backend])
    yk, yu, y, h = make_inputs(3, 4, 6, dtype=torch.float32)
    yk.requires_grad_()
    out = mim_fast.kgs_loss(yk, yu, y, h, reduction=reduction, backend=backend)
    extra = (yk ** 2).sum()
    if out.inter.requires_grad:
        (out.inter.mean() + extra).backward()
    else:
        extra.backward()
    torch.testing.assert_close(yk.grad, 2 * yk.detach())
    yk.grad = None
    out = mim_fast.kgs_loss(yk, yu, y, h.requires_grad_(), reduction=reduction, backend=backend)
    (out.masked.sum() if reduction == "none" else out.masked).backward()  # masked never reaches h
    assert yk.grad is not None and h.grad is None


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_gives_zero_terms(backend, reduction):
    """Issue 15, item 10: B = 0 gives every term 0 (or (0,) with reduction "none"), not NaN, teacher (0,)
    and alpha (M, 0), on kgs_loss and kgs_loss_with_heads; the backward runs."""
    if backend != "torch":
        _skip_unless_available(backend)
    dev = DEVICE.get(backend, "cpu")
    M, D = 3, 6
    yk, yu, y = (torch.randn(M, 0, device=dev, requires_grad=True), torch.randn(M, 0, device=dev, requires_grad=True),
                 torch.randn(0, device=dev, requires_grad=True))
    h = torch.randn(M, 0, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    out = mim_fast.kgs_loss(yk, yu, y, h, reduction=reduction, backend=backend)
    heads_backend = backend if backend != "cuda" else "triton"
    w, b = torch.randn(M, D, device=dev), torch.randn(M, device=dev)
    out_h = mim_fast.kgs_loss_with_heads(h, h.detach().clone(), w, b, y, reduction=reduction, backend=heads_backend) \
        if _backends.backend_status("kgs_loss_with_heads", dev, (torch.float32,))[heads_backend] is None else None
    for o in (out, out_h):
        if o is None:
            continue
        shape = (0,) if reduction == "none" else ()
        for k in TERMS:
            t = getattr(o, k)
            assert t.shape == shape and t.dtype == torch.float32 and not torch.isnan(t).any(), k
            if reduction != "none":
                assert float(t) == 0.0, k
        assert o.teacher.shape == (0,) and o.teacher.dtype == torch.int64 and o.alpha.shape == (M, 0)
    (out.loss.sum() + out.inter.sum()).backward()
    assert yk.grad.shape == yk.shape and h.grad.shape == h.shape


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("heads", [False, True], ids=["kgs_loss", "with_heads"])
def test_create_graph_raises(backend, heads):
    """backward(create_graph=True) through the op raises: the fused backward has no derivative of its own,
    and the gradients it returns (computed from saved outputs) would pass for constants, so a second
    derivative would be silently missing. A plain backward is unaffected."""
    if heads and backend == "cuda":
        pytest.skip("kgs_loss_with_heads runs through Triton on CUDA")
    _skip_unless_available(backend)
    dev = DEVICE[backend]
    for create_graph in (True, False):
        if heads:
            ins = [t.to(dev).requires_grad_() for t in make_head_inputs(3, 4, 6)]
            out = mim_fast.kgs_loss_with_heads(*ins, backend=backend)
        else:
            ins = [t.to(dev, torch.float32).requires_grad_() for t in make_inputs(3, 4, 6)]
            out = mim_fast.kgs_loss(*ins, backend=backend)
        if create_graph:
            with pytest.raises(RuntimeError, match="create_graph=True is not supported.*backend='torch'"):
                torch.autograd.grad(out.loss, ins[0], create_graph=True)
        else:
            torch.autograd.grad(out.loss, ins[0])


TERM_DEPS = {"intra": ("yk", "yu"), "inter": ("h",), "masked": ("yk", "y"), "unmasked": ("yu", "y")}
HEAD_TERM_DEPS = {"intra": ("h_masked", "h_unmasked", "weight", "bias"), "inter": ("h_masked",),
                  "masked": ("h_masked", "weight", "bias", "y"), "unmasked": ("h_unmasked", "weight", "bias", "y")}


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
@pytest.mark.parametrize("heads", [False, True], ids=["kgs_loss", "with_heads"])
def test_terms_require_grad_as_in_the_reference(backend, heads):
    """Found by a differential fuzzer: each term needs a gradient only when an input it depends on does, as
    in the reference (with only h trainable, intra.backward() must raise, not silently do nothing)."""
    if heads and backend == "cuda":
        pytest.skip("kgs_loss_with_heads runs through Triton on CUDA")
    if backend != "torch":
        _skip_unless_available(backend)
    dev = DEVICE.get(backend, "cpu")
    names, deps = (("h_masked", "h_unmasked", "weight", "bias", "y"), HEAD_TERM_DEPS) if heads else \
        (("yk", "yu", "y", "h"), TERM_DEPS)
    base = make_head_inputs(3, 4, 6) if heads else [t.float() for t in make_inputs(3, 4, 6)]
    fn = mim_fast.kgs_loss_with_heads if heads else mim_fast.kgs_loss
    for trainable in names:
        ins = [t.to(dev).clone().requires_grad_(n == trainable) for n, t in zip(names, base)]
        out = fn(*ins, backend=backend)
        assert out.loss.requires_grad
        for term, needs in deps.items():
            assert getattr(out, term).requires_grad == (trainable in needs), (trainable, term)
        for term, needs in deps.items():
            if trainable not in needs:
                with pytest.raises(RuntimeError, match="does not require grad"):
                    getattr(out, term).backward(retain_graph=True)


def test_reference_empty_batch_mean_is_zero():
    """The reference, as the op: reduction "mean" over no sample is 0, not 0/0."""
    out = reference.kgs_loss(torch.randn(3, 0), torch.randn(3, 0), torch.randn(0), torch.randn(3, 0, 4))
    assert all(float(t) == 0.0 for t in out[:5])
