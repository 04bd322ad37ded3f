"""kgs_loss (SPEC §2): the reference against a per-sample loop transcription of the spec (forward and
the spec's gradient formulas), against the released code's batch-level rule, gradcheck in float64
with the routing held fixed, the spec's properties, and argument checking."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import mim_fast
from mim_fast import reference

TERMS = ("loss", "intra", "inter", "masked", "unmasked")
OPTIONS = list(itertools.product((True, False), (False, True), ("mean", "sum", "none")))
OPTION_IDS = ["%s-%s-%s" % ("per_sample" if p else "batch", "divT" if d else "noT", r) for p, d, r in OPTIONS]


def make_inputs(M, B, D, dtype=torch.float64):
    y = torch.empty(B, dtype=dtype).uniform_(-3, 3)
    yk = y + torch.randn(M, B, dtype=dtype)
    yu = y + torch.randn(M, B, dtype=dtype)
    h = 2 * torch.randn(M, B, D, dtype=dtype)
    return yk, yu, y, h


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
        (dict(yk=yk, yu=yu, y=y, h=h, backend="triton"), mim_fast.BackendUnavailableError, "kgs_loss: backend 'triton'"),
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
