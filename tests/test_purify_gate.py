"""purify_gate (SPEC §1): the reference against an independent transcription of the spec's forward and
backward formulas, gradcheck in float64, the spec's properties, and argument checking."""
import itertools
import math

import pytest
import torch

import mim_fast
from mim_fast import reference

MODES = ("sample", "expected")
ACTIVATIONS = ("tanh", "relu", "identity")
PENALTIES = ("mim", "threshold")
ALL_OPTIONS = list(itertools.product(MODES, ACTIVATIONS, PENALTIES, (False, True), (False, True)))
OPTION_IDS = ["%s-%s-%s-%s-%s" % (m, a, p, "len" if l else "nolen", "bf" if b else "sf") for m, a, p, l, b in ALL_OPTIONS]
HP = dict(beta=1 / 3, gamma=-0.2, zeta=1.0, loc_bias=3.0, threshold=0.6)


def make_inputs(T, B, D, *, dtype=torch.float64, batch_first=False, lengths=False, logit_shift=-3.0):
    """Random features, logits around a = g + 3 ≈ 0 (a mix of open and closed gates), noise, lengths."""
    x = torch.randn(B, T, D, dtype=dtype) if batch_first else torch.randn(T, B, D, dtype=dtype)
    logits = 2.0 * torch.randn(B, T, dtype=dtype) + logit_shift
    noise = torch.rand(B, T, dtype=dtype).clamp(1e-3, 1 - 1e-3)
    lens = None
    if lengths:
        lens = torch.randint(0, T + 1, (B,))
        lens[0] = T  # one full sample
        if B > 1:
            lens[-1] = 0  # one empty sample
    return x, logits, noise, lens


def spec_forward_backward(x, logits, noise, lengths, G, w, *, mode, activation, penalty, batch_first,
                          beta, gamma, zeta, loc_bias, threshold):
    """SPEC §1 written out directly (forward and the spec's backward), float64, no autograd."""
    xs = (x.transpose(0, 1) if batch_first else x).double()  # (T, B, D)
    T, B, D = xs.shape
    a = logits.double() + loc_bias
    if mode == "sample":
        u = noise.double().clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + a) / beta)
        ds_da = s * (1 - s) / beta
    else:
        s = torch.sigmoid(a)
        ds_da = s * (1 - s)
    sbar = (zeta - gamma) * s + gamma
    c = sbar.clamp(0, 1)
    valid = torch.ones(B, T, dtype=torch.bool) if lengths is None else (
        torch.arange(T)[None, :] < lengths[:, None])
    h = ((c > threshold) & valid).double()
    if penalty == "mim":
        q = torch.sigmoid(a - beta * math.log(-gamma / zeta))
    else:
        q = torch.sigmoid(a - beta * math.log((threshold - gamma) / (zeta - threshold)))
    n_valid = max(int(valid.sum()), 1)
    P = (q * valid).sum() / n_valid
    y = xs * h.t()[:, :, None]
    if activation == "tanh":
        phi, dphi = torch.tanh(y), 1 - torch.tanh(y) ** 2
    elif activation == "relu":
        phi, dphi = y.clamp(min=0), (y > 0).double()
    else:
        phi, dphi = y, torch.ones_like(y)
    denom = torch.full((B,), float(T), dtype=torch.float64) if lengths is None else lengths.double().clamp(min=1)
    phi = phi * valid.t()[:, :, None]
    pooled = phi.sum(0) / denom[:, None]
    dy = G.double()[None] * dphi / denom[None, :, None] * valid.t()[:, :, None]
    dx = dy * h.t()[:, :, None]
    dc = (dy * xs).sum(-1).t()  # (B, T)
    dsbar = dc * ((sbar >= 0) & (sbar <= 1)).double()
    dg = (zeta - gamma) * dsbar * ds_da + w * q * (1 - q) / n_valid * valid
    if batch_first:
        dx = dx.transpose(0, 1)
    return pooled, P, h, dx, dg


@pytest.mark.parametrize("mode,activation,penalty,use_lengths,batch_first", ALL_OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("shape", [(7, 5, 3), (1, 1, 1), (13, 2, 129)], ids=lambda s: "T%d-B%d-D%d" % s)
def test_reference_matches_spec_formulas(mode, activation, penalty, use_lengths, batch_first, shape):
    T, B, D = shape
    x, logits, noise, lens = make_inputs(T, B, D, batch_first=batch_first, lengths=use_lengths)
    opts = dict(mode=mode, activation=activation, penalty=penalty, batch_first=batch_first, **HP)
    xg, lg = x.clone().requires_grad_(), logits.clone().requires_grad_()
    out = mim_fast.purify_gate(xg, lg, noise=noise if mode == "sample" else None, lengths=lens,
                               backend="torch", **opts)
    G, w = torch.randn(B, D, dtype=torch.float64), float(torch.randn(()))
    torch.autograd.backward([out.pooled, out.penalty], [G, torch.tensor(w, dtype=torch.float64)])
    pooled, P, h, dx, dg = spec_forward_backward(x, logits, noise, lens, G, w, **opts)
    torch.testing.assert_close(out.pooled, pooled, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.penalty, P, rtol=1e-12, atol=1e-12)
    assert torch.equal(out.gate, h)
    torch.testing.assert_close(xg.grad, dx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lg.grad, dg, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode,activation,penalty,use_lengths,batch_first", ALL_OPTIONS, ids=OPTION_IDS)
def test_gradcheck_float64(mode, activation, penalty, use_lengths, batch_first):
    """Finite differences agree with autograd wherever the forward is smooth: pooled in x (the gate is
    piecewise constant in x's neighbourhood) and the penalty in the logits. The straight-through
    gradient of pooled w.r.t. the logits is by design not a derivative of the forward value; it is
    checked against the spec's formula in test_reference_matches_spec_formulas."""
    x, logits, noise, lens = make_inputs(5, 4, 6, batch_first=batch_first, lengths=use_lengths)
    opts = dict(noise=noise if mode == "sample" else None, lengths=lens, mode=mode, activation=activation,
                penalty=penalty, batch_first=batch_first, backend="torch")
    x.requires_grad_()
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda x_: mim_fast.purify_gate(x_, logits.detach(), **opts).pooled, (x,))
    assert torch.autograd.gradgradcheck(lambda x_: mim_fast.purify_gate(x_, logits.detach(), **opts).pooled, (x,)) \
        if activation != "relu" else True
    assert torch.autograd.gradcheck(lambda g_: mim_fast.purify_gate(x.detach(), g_, **opts).penalty, (logits,))


@pytest.mark.parametrize("penalty", PENALTIES)
def test_penalty_closed_forms(penalty):
    B, T = 6, 11
    g = 3 * torch.randn(B, T, dtype=torch.float64)
    beta, gamma, zeta, tau, lb = 0.5, -0.1, 1.1, 0.4, 1.5
    out = mim_fast.purify_gate(torch.randn(T, B, 3, dtype=torch.float64), g, mode="expected", penalty=penalty,
                               beta=beta, gamma=gamma, zeta=zeta, threshold=tau, loc_bias=lb)
    ratio = -gamma / zeta if penalty == "mim" else (tau - gamma) / (zeta - tau)
    expected = sum(1 / (1 + math.exp(-(float(v) + lb - beta * math.log(ratio)))) for v in g.flatten()) / (B * T)
    assert abs(float(out.penalty) - expected) < 1e-12


@pytest.mark.parametrize("penalty,tau", [("threshold", 0.6), ("threshold", 0.25), ("mim", 0.0)])
def test_gate_open_rate_matches_closed_form(penalty, tau):
    """In mode "sample", P(gate open) = P(c > τ) = σ(a − β·ln((τ−γ)/(ζ−τ))); with τ = 0 that is the
    "mim" penalty P(c > 0) = σ(a − β·ln(−γ/ζ))."""
    n, levels = 40_000, torch.tensor([-4.0, -3.0, -2.2, -1.0])
    logits = levels.repeat(n, 1)  # (n, 4): each column one logit value
    x = torch.randn(1, n, 1)
    seed = int(torch.randint(0, 2**62, ()))
    out = mim_fast.purify_gate(x.expand(4, n, 1).contiguous(), logits, seed=seed, penalty=penalty, threshold=tau)
    rate = out.gate.mean(dim=0)
    q = reference.gate_open_probability(levels[None, :], penalty=penalty, threshold=tau)[0]
    sigma = (q * (1 - q) / n).sqrt()
    assert torch.all((rate - q).abs() < 5 * sigma + 1e-9), (rate, q)


def test_lengths_zero_pools_to_zero_and_padding_is_never_read():
    T, B, D = 6, 4, 5
    x, logits, noise, _ = make_inputs(T, B, D, dtype=torch.float32)
    lens = torch.tensor([0, 3, 6, 1])
    x_bad = x.clone()
    for b in range(B):
        x_bad[int(lens[b]):, b] = float("nan")  # garbage in the padding
    logits_bad = logits.clone()
    logits_bad[0, :] = float("inf")
    for activation in ACTIVATIONS:
        xg, lg = x_bad.clone().requires_grad_(), logits.clone().requires_grad_()
        out = mim_fast.purify_gate(xg, lg, noise=noise, lengths=lens, activation=activation)
        assert torch.equal(out.pooled[0], torch.zeros(D))
        assert torch.isfinite(out.pooled).all() and torch.isfinite(out.penalty)
        ref = mim_fast.purify_gate(x, logits, noise=noise, lengths=lens, activation=activation)
        torch.testing.assert_close(out.pooled, ref.pooled)
        (out.pooled.sum() + out.penalty).backward()
        for b in range(B):
            assert torch.equal(xg.grad[int(lens[b]):, b], torch.zeros_like(xg.grad[int(lens[b]):, b]))
            assert torch.equal(lg.grad[b, int(lens[b]):], torch.zeros_like(lg.grad[b, int(lens[b]):]))
            assert torch.equal(out.gate[b, int(lens[b]):], torch.zeros_like(out.gate[b, int(lens[b]):]))
        assert torch.isfinite(xg.grad).all() and torch.isfinite(lg.grad).all()
    all_empty = mim_fast.purify_gate(x, logits, noise=noise, lengths=torch.zeros(B, dtype=torch.int64))
    assert torch.equal(all_empty.pooled, torch.zeros(B, D)) and float(all_empty.penalty) == 0.0


def test_full_lengths_equal_no_lengths():
    x, logits, noise, _ = make_inputs(9, 3, 4)
    a = mim_fast.purify_gate(x, logits, noise=noise)
    b = mim_fast.purify_gate(x, logits, noise=noise, lengths=torch.full((3,), 9))
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-14, atol=1e-14)


def _closed_gate_logit():
    # mode "expected": s̄ = 1.2·σ(g + 3) − 0.2 = 0.25 for g = -3.5: the gate is closed (c ≤ τ) but
    # the clamp passes gradient (0 ≤ s̄ ≤ 1), so only φ'(0) decides whether the logit learns.
    return -3.5


@pytest.mark.parametrize("activation,gets_gradient", [("relu", False), ("tanh", True), ("identity", True)])
def test_closed_gates_gradient_depends_on_activation(activation, gets_gradient):
    T, B, D = 4, 3, 8
    x = torch.randn(T, B, D, dtype=torch.float64)
    logits = torch.full((B, T), _closed_gate_logit(), dtype=torch.float64, requires_grad=True)
    out = mim_fast.purify_gate(x, logits, mode="expected", activation=activation)
    assert torch.equal(out.gate, torch.zeros(B, T, dtype=torch.float64))
    out.pooled.sum().backward()  # no penalty term: only the straight-through path
    assert bool((logits.grad != 0).any()) == gets_gradient
    if gets_gradient:  # ∂L/∂g = (ζ−γ)·Σ_d x/T·s(1−s) for G = 1 and φ'(0) = 1
        s = torch.sigmoid(torch.tensor(_closed_gate_logit() + 3.0, dtype=torch.float64))
        expected = 1.2 * x.sum(-1).t() / T * s * (1 - s)
        torch.testing.assert_close(logits.grad, expected)


def test_batch_first_equals_seq_first_and_does_not_copy_input():
    x, logits, noise, lens = make_inputs(8, 5, 7, dtype=torch.float32, batch_first=True, lengths=True)
    a = mim_fast.purify_gate(x, logits, noise=noise, lengths=lens, batch_first=True)
    b = mim_fast.purify_gate(x.transpose(0, 1), logits, noise=noise, lengths=lens)  # strided view, no copy
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_seed_path_equals_given_philox_noise_and_is_repeatable():
    T, B, D = 7, 5, 3
    x, logits, _, _ = make_inputs(T, B, D, dtype=torch.float32)
    seed, offset = int(torch.randint(0, 2**62, ())), int(torch.randint(0, 2**40, ()))
    a = mim_fast.purify_gate(x, logits, seed=seed, offset=offset)
    b = mim_fast.purify_gate(x, logits, seed=seed, offset=offset)
    noise = mim_fast.philox_uniform(seed, offset, (B, T))  # u[b, t] = philox(seed, offset + b·T + t)
    c = mim_fast.purify_gate(x, logits, noise=noise)
    for u, v, w in zip(a, b, c):
        assert torch.equal(u, v) and torch.equal(u, w)
    d = mim_fast.purify_gate(x, logits, seed=seed, offset=offset + B * T)
    assert not torch.equal(a.gate, d.gate) or not torch.equal(a.pooled, d.pooled)


def test_default_seed_comes_from_torch_default_generator():
    x, logits, _, _ = make_inputs(20, 8, 3, dtype=torch.float32)
    torch.manual_seed(123)
    a = mim_fast.purify_gate(x, logits)
    torch.manual_seed(123)
    b = mim_fast.purify_gate(x, logits)
    c = mim_fast.purify_gate(x, logits)
    assert torch.equal(a.gate, b.gate)
    assert not torch.equal(a.gate, c.gate)


def test_expected_mode_is_deterministic_and_ignores_noise():
    x, logits, noise, _ = make_inputs(6, 4, 3)
    a = mim_fast.purify_gate(x, logits, mode="expected")
    b = mim_fast.purify_gate(x, logits, mode="expected", noise=noise)
    c = mim_fast.purify_gate(x, logits, mode="expected", seed=5)
    expected_gate = ((1.2 * torch.sigmoid(logits + 3.0) - 0.2).clamp(0, 1) > 0.6).double()
    assert torch.equal(a.gate, expected_gate)
    for u, v, w in zip(a, b, c):
        assert torch.equal(u, v) and torch.equal(u, w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    x, logits, noise, _ = make_inputs(50, 6, 33, dtype=torch.float32)
    out = mim_fast.purify_gate(x.to(dtype), logits.to(dtype), noise=noise)
    ref = mim_fast.purify_gate(x.to(dtype).float(), logits.to(dtype).float(), noise=noise)
    assert out.pooled.dtype == dtype and out.penalty.dtype == dtype and out.gate.dtype == dtype
    assert torch.equal(out.gate.float(), ref.gate)
    torch.testing.assert_close(out.pooled.float(), ref.pooled.to(dtype).float(), rtol=0, atol=0)


def test_mixed_dtypes_compute_in_float64_when_any_is_float64():
    x, logits, noise, _ = make_inputs(5, 3, 4, dtype=torch.float32)
    out = mim_fast.purify_gate(x, logits.double(), noise=noise)
    assert out.pooled.dtype == torch.float32 and out.penalty.dtype == torch.float64
    ref = mim_fast.purify_gate(x.double(), logits.double(), noise=noise.double())
    torch.testing.assert_close(out.pooled, ref.pooled.float())


def test_inputs_are_not_mutated():
    x, logits, noise, lens = make_inputs(6, 4, 5, dtype=torch.float32, lengths=True)
    copies = [t.clone() for t in (x, logits, noise, lens)]
    xg, lg = x.requires_grad_(), logits.requires_grad_()
    out = mim_fast.purify_gate(xg, lg, noise=noise, lengths=lens)
    (out.pooled.sum() + out.penalty).backward()
    for t, c in zip((x, logits, noise, lens), copies):
        assert torch.equal(t.detach(), c)


def _bad_calls():
    x = torch.randn(5, 3, 4)
    g = torch.randn(3, 5)
    return [
        (dict(x=x.long(), logits=g), TypeError, "x must be a floating-point tensor"),
        (dict(x=x[0], logits=g), ValueError, r"x must be 3-D \(T, B, D\)"),
        (dict(x=x, logits=g.t()), ValueError, r"logits must have shape \(3, 5\)"),
        (dict(x=x, logits=g, batch_first=True), ValueError, r"logits must have shape \(5, 3\)"),
        (dict(x=x, logits=g.int()), TypeError, "logits must be a floating-point tensor"),
        (dict(x=x, logits=[[0.0]]), TypeError, "logits must be a torch.Tensor"),
        (dict(x=torch.randn(0, 3, 4), logits=torch.randn(3, 0)), ValueError, "T must be >= 1"),
        (dict(x=x, logits=g, mode="hard"), ValueError, "mode must be one of"),
        (dict(x=x, logits=g, activation="gelu"), ValueError, "activation must be one of"),
        (dict(x=x, logits=g, penalty="l1"), ValueError, "penalty must be one of"),
        (dict(x=x, logits=g, beta=0.0), ValueError, "beta must be a finite number > 0"),
        (dict(x=x, logits=g, gamma=0.1), ValueError, "gamma must be a finite number < 0"),
        (dict(x=x, logits=g, threshold=1.0), ValueError, "threshold must be"),
        (dict(x=x, logits=g, zeta=0.5, threshold=0.6), ValueError, "gamma < threshold < zeta"),
        (dict(x=x, logits=g, loc_bias=float("nan")), ValueError, "loc_bias must be a finite number"),
        (dict(x=x, logits=g, noise=torch.rand(3, 5), seed=1), ValueError, "either noise or seed"),
        (dict(x=x, logits=g, noise=torch.rand(5, 3)), ValueError, r"noise must have shape \(3, 5\)"),
        (dict(x=x, logits=g, noise=torch.zeros(3, 5)), ValueError, r"noise must lie in the open interval"),
        (dict(x=x, logits=g, noise=torch.ones(3, 5)), ValueError, r"noise must lie in the open interval"),
        (dict(x=x, logits=g, seed=-3), ValueError, "seed must be in"),
        (dict(x=x, logits=g, seed=2.0), TypeError, "seed must be a Python int"),
        (dict(x=x, logits=g, offset=-1), ValueError, "offset must be in"),
        (dict(x=x, logits=g, lengths=torch.tensor([1, 2, 6])), ValueError, r"lengths must lie in \[0, T=5\]"),
        (dict(x=x, logits=g, lengths=torch.tensor([1, -1, 2])), ValueError, r"lengths must lie in \[0, T=5\]"),
        (dict(x=x, logits=g, lengths=torch.tensor([1.0, 2.0, 3.0])), TypeError, "lengths must be an integer"),
        (dict(x=x, logits=g, lengths=torch.tensor([1, 2])), ValueError, r"lengths must have shape \(3,\)"),
        (dict(x=x, logits=g, batch_first=1), TypeError, "batch_first must be a bool"),
        (dict(x=x, logits=g, backend="gpu"), ValueError, "backend must be 'auto' or one of"),
        (dict(x=x, logits=g, backend="cuda"), mim_fast.BackendUnavailableError, "purify_gate: backend 'cuda'"),
    ]


@pytest.mark.parametrize("kwargs,exc,match", _bad_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_bad_arguments_raise_clear_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        mim_fast.purify_gate(**kwargs)


@pytest.mark.cuda
def test_mismatched_devices_are_rejected():
    x = torch.randn(5, 3, 4, device="cuda")
    with pytest.raises(ValueError, match="logits is on cpu but x is on cuda"):
        mim_fast.purify_gate(x, torch.randn(3, 5))


@pytest.mark.cuda
def test_reference_runs_on_cuda_and_matches_cpu():
    x, logits, noise, lens = make_inputs(9, 4, 6, dtype=torch.float32, lengths=True)
    a = mim_fast.purify_gate(x, logits, seed=7, lengths=lens, backend="torch")
    b = mim_fast.purify_gate(x.cuda(), logits.cuda(), seed=7, lengths=lens, backend="torch")
    assert torch.equal(a.gate, b.gate.cpu())
    torch.testing.assert_close(a.pooled, b.pooled.cpu())
