"""purify_gate (SPEC §1): the reference against an independent transcription of the spec's forward and
backward formulas, gradcheck in float64, the spec's properties, and argument checking."""
import importlib
import itertools
import math

import pytest
import torch

import mim_fast
from mim_fast import reference

from _isa import saved_under_isa
from _modes import SeenFunctions, SeenOps

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
        # finite, but not in float32, the kernels' compute type (the reference raises or computes NaN)
        (dict(x=x, logits=g, beta=1e300), ValueError, "beta must lie within float32's range"),
        (dict(x=x, logits=g, beta=1e-300), ValueError, "beta must be >= "),
        (dict(x=x, logits=g, zeta=1e300), ValueError, "zeta must lie within float32's range"),
        (dict(x=x, logits=g, gamma=-1e300), ValueError, "gamma must lie within float32's range"),
        (dict(x=x, logits=g, loc_bias=-1e39), ValueError, "loc_bias must lie within float32's range"),
        (dict(x=x, logits=g, gamma=-3e38, zeta=3e38), ValueError, "zeta - gamma must lie within float32's range"),
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


def _common_and_odd_calls():
    """Calls a training step makes (served by the fast path) and calls it must hand to the full path."""
    x, g = torch.randn(5, 3, 4), torch.randn(3, 5) - 3
    u = torch.rand(3, 5).clamp(1e-3, 1 - 1e-3)
    nan_u = u.clone()
    nan_u[1, 2] = float("nan")
    calls = [dict(), dict(noise=u), dict(noise=u.half()), dict(noise=u.double()), dict(noise=u.bfloat16()),
             dict(seed=7), dict(seed=7, offset=11), dict(mode="expected"), dict(mode="expected", noise=u),
             dict(activation="relu", penalty="threshold", threshold=0.3, seed=1), dict(backend="torch", seed=2),
             dict(backend="cpu", noise=u), dict(beta=0.5, gamma=-0.1, zeta=1.1, loc_bias=2, seed=3),
             dict(x=x.transpose(0, 1).contiguous(), batch_first=True, seed=4), dict(x=x.bfloat16(), seed=5),
             dict(logits=g.double(), seed=6), dict(x=x.double(), noise=u), dict(x=torch.randn(1, 1, 1),
             logits=torch.randn(1, 1), seed=8), dict(lengths=torch.tensor([5, 0, 2]), seed=9),
             dict(x=torch.nn.Parameter(x), seed=10), dict(x=torch.randn(5, 0, 4), logits=torch.randn(0, 5), seed=1),
             dict(noise=nan_u), dict(seed=True), dict(offset=2**63 - 15), dict(offset=2**63 - 14), dict(offset=True),
             dict(batch_first=0), dict(backend=3), dict(backend="triton"), dict(seed=2**63), dict(noise=u, seed=None),
             dict(logits=g[:, :4]), dict(noise=u[:2]), dict(noise=u.long()), dict(beta=True),
             dict(noise=u.clone().requires_grad_())]
    calls += [kw for kw, _, _ in _bad_calls()]
    return [dict(dict(x=x, logits=g), **kw) for kw in calls]


def _outcome(call, kwargs):
    """(exception type, message) or the outputs and the gradients of x and the logits."""
    kwargs = dict(kwargs)
    leaves = []
    for k in ("x", "logits"):
        v = kwargs.get(k)
        if isinstance(v, torch.Tensor) and v.dtype.is_floating_point:
            kwargs[k] = v.detach().clone().requires_grad_()
            leaves.append(kwargs[k])
    torch.manual_seed(1234)  # the default seed's draw
    try:
        out = call(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the point is to compare them
        return type(exc), str(exc)
    grads = ()
    if out.pooled.requires_grad:
        G = torch.linspace(-1, 1, out.pooled.numel(), dtype=out.pooled.dtype).reshape(out.pooled.shape)
        grads = torch.autograd.grad([out.pooled, out.penalty], leaves, [G, torch.ones_like(out.penalty)],
                                    allow_unused=True)
    return tuple(out) + tuple(grads)


def test_common_call_agrees_with_full_path(monkeypatch):
    """The fast path for the common call (ops/purify_gate.py::_common_call) accepts only what the full
    path accepts and returns what it returns: results and gradients bit for bit, the same error otherwise."""
    module = importlib.import_module("mim_fast.ops.purify_gate")

    calls = _common_and_odd_calls()
    fast = [_outcome(mim_fast.purify_gate, kw) for kw in calls]
    monkeypatch.setattr(module, "_common_call", lambda *a: None)
    for kw, got in zip(calls, fast):
        want = _outcome(mim_fast.purify_gate, kw)
        what = {k: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        assert type(got) is type(want) and len(got) == len(want), what
        if isinstance(want[0], type):
            assert got == want, what
        else:
            for a, b in zip(got, want):
                assert (a is None) == (b is None), what
                if a is not None:
                    assert a.dtype == b.dtype and a.shape == b.shape, what
                    assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)), what
                    assert torch.equal(a.isnan(), b.isnan()), what


def test_common_call_serves_the_training_step():
    """The calls MIM's training step makes take the fast path (a regression here costs ~60 µs a call)."""
    module = importlib.import_module("mim_fast.ops.purify_gate")

    x, g = torch.randn(50, 16, 80, requires_grad=True), torch.randn(16, 50, requires_grad=True)
    u = torch.rand(16, 50).clamp(1e-6, 1 - 1e-6)
    args = dict(mode="sample", activation="tanh", penalty="mim", lengths=None, batch_first=False, beta=1 / 3,
                gamma=-0.2, zeta=1.0, loc_bias=3.0, threshold=0.6, backend="auto")
    for noise, seed in ((u, None), (None, 7), (None, None)):
        out = module._common_call(x, g, noise, seed, 0, *args.values())
        assert isinstance(out, mim_fast.PurifyGateOutput) and out.pooled.requires_grad


@pytest.mark.skipif(mim_fast.build_info() is None, reason="mim_fast._C not built")
def test_noise_range_check_matches_aminmax():
    from mim_fast.ops import _checks

    base = torch.rand(7, 9).clamp(1e-6, 1 - 1e-6)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for bad in (None, 0.0, 1.0, -0.5, 1.5, float("nan"), float("inf"), 1e-45):
            t = base.to(dtype).clone()
            if bad is not None:
                t[3, 4] = bad
            for view in (t, t.t(), t[:, ::2]):
                lo, hi = torch.aminmax(view)
                assert _checks.in_open_unit_interval(view) == (float(lo) > 0 and float(hi) < 1), (dtype, bad)
    assert _checks.in_open_unit_interval(torch.rand(0, 5))


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


# ====================================================================================================
# Fused backends (cpu: C++ kernels; triton: under TRITON_INTERPRET=1 on CPU; cuda: GPU only) against
# the reference. The gate math is the same IEEE sequence everywhere, so gates must be bit-identical.
# ====================================================================================================
from mim_fast.ops import _backends  # noqa: E402

FUSED = [pytest.param("cpu", marks=pytest.mark.skipif(mim_fast.build_info() is None, reason="no _C")),
         pytest.param("triton", marks=pytest.mark.triton),
         pytest.param("cuda", marks=pytest.mark.cuda)]
DEVICE = {"cpu": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu", "cuda": "cuda"}


def _skip_unless_available(backend, dtype=torch.float32):
    reason = _backends.backend_status("purify_gate", DEVICE[backend], (dtype,))[backend]
    if reason:
        pytest.skip(reason)


def run_gate(backend, x, logits, G, w, **opts):
    """Forward and backward of purify_gate on `backend`: (pooled, penalty, gate, dx, dlogits)."""
    xg, lg = x.detach().clone().requires_grad_(), logits.detach().clone().requires_grad_()
    out = mim_fast.purify_gate(xg, lg, backend=backend, **opts)
    torch.autograd.backward([out.pooled, out.penalty], [G.to(out.pooled.dtype), torch.tensor(w, dtype=out.penalty.dtype,
                                                                                             device=x.device)])
    return out.pooled.detach(), out.penalty.detach(), out.gate.detach(), xg.grad, lg.grad


SHAPES = [(1, 1, 1), (7, 3, 5), (50, 2, 129), (3, 2, 1030)]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("mode,activation,penalty,use_lengths,batch_first", ALL_OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T%d-B%d-D%d" % s)
def test_fused_backend_matches_reference(backend, mode, activation, penalty, use_lengths, batch_first, shape):
    _skip_unless_available(backend)
    dev = DEVICE[backend]
    T, B, D = shape
    x, logits, noise, lens = make_inputs(T, B, D, dtype=torch.float32, batch_first=batch_first, lengths=use_lengths)
    x, logits, noise = x.to(dev), logits.to(dev), noise.to(dev)
    lens = lens.to(dev) if lens is not None else None
    G, w = torch.randn(B, D, device=dev), float(torch.randn(()))
    seed = int(torch.randint(0, 2**62, ()))
    opts = dict(mode=mode, activation=activation, penalty=penalty, batch_first=batch_first, lengths=lens)
    for noise_opts in ([dict(seed=seed, offset=int(torch.randint(0, 2**40, ()))), dict(noise=noise)]
                       if mode == "sample" else [dict()]):
        got = run_gate(backend, x, logits, G, w, **opts, **noise_opts)
        ref = run_gate("torch", x, logits, G, w, **opts, **noise_opts)
        assert torch.equal(got[2], ref[2]), "gates differ"
        torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)  # pooled
        torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-7)  # penalty
        torch.testing.assert_close(got[3], ref[3], rtol=1e-5, atol=1e-7)  # dx
        # dlogits[b, t] sums D products dy·x that can cancel: its float32 rounding error scales with the
        # sum of their magnitudes (the same chain with |x|, |G|, |w|, in float64), not with the result
        abs_opts = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                    for k, v in noise_opts.items()}
        terms = run_gate("torch", x.abs().double(), logits.double(), G.abs().double(), abs(w), **opts,
                         **abs_opts)[4].abs()
        scale = float(ref[4].abs().max()) + 1e-3
        err = (got[4].double() - ref[4].double()).abs()
        tol = 1e-4 * ref[4].double().abs() + 1e-5 * scale + D ** 0.5 * 1e-6 * terms
        assert bool((err <= tol).all()), ("dlogits", float((err - tol).max()), float(err.max()))


@pytest.mark.parametrize("backend", FUSED)
def test_fused_backend_float64_and_mixed_dtypes(backend):
    dev = DEVICE[backend]
    T, B, D = 9, 4, 37
    x, logits, noise, lens = make_inputs(T, B, D, dtype=torch.float64, lengths=True)
    x, logits, noise, lens = x.to(dev), logits.to(dev), noise.to(dev), lens.to(dev)
    G, w = torch.randn(B, D, dtype=torch.float64, device=dev), 0.7
    if backend != "cpu":
        _skip_unless_available(backend)  # (the device itself must be one the backend runs on)
        reason = _backends.backend_status("purify_gate", dev, (torch.float64,))[backend]
        assert reason and "float64" in reason  # fp64 is a CPU-only feature, refused with a reason
        pytest.skip(reason)
    for xd, gd in [(torch.float64, torch.float64), (torch.float32, torch.float64), (torch.float64, torch.float32)]:
        got = run_gate("cpu", x.to(xd), logits.to(gd), G, w, noise=noise, lengths=lens)
        ref = run_gate("torch", x.to(xd), logits.to(gd), G, w, noise=noise, lengths=lens)
        assert got[0].dtype == xd and got[1].dtype == gd and got[4].dtype == gd and got[3].dtype == xd
        assert torch.equal(got[2], ref[2])
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-12 if xd == gd else 1e-6, atol=1e-12 if xd == gd else 1e-7)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_backend_half_precision_within_2x_of_torch_error(backend, dtype):
    """flash-attention's rule: the fused result's error against a float64 computation is at most twice
    the error of the same-precision PyTorch reference, plus one ulp of the output's dtype at the output's
    scale (both results are rounded to that dtype at the end)."""
    _skip_unless_available(backend, dtype)
    dev = DEVICE[backend]
    T, B, D = 50, 3, 264
    x, logits, noise, _ = make_inputs(T, B, D, dtype=torch.float32)
    xh, logits, noise = x.to(dev, dtype), logits.to(dev), noise.to(dev)
    G, w = torch.randn(B, D, device=dev), 0.3
    exact = run_gate("torch", xh.double(), logits.double(), G.double(), w, noise=noise.double())
    got = run_gate(backend, xh, logits, G, w, noise=noise)
    ref = run_gate("torch", xh, logits, G, w, noise=noise)
    assert torch.equal(got[2].double(), exact[2]) and torch.equal(ref[2].double(), exact[2])
    assert got[0].dtype == dtype and got[3].dtype == dtype
    for i in (0, 3, 4):
        err_fused = float((got[i].double() - exact[i]).abs().max())
        err_torch = float((ref[i].double() - exact[i]).abs().max())
        floor = torch.finfo(got[i].dtype).eps * float(exact[i].abs().max() + 1e-3)
        assert err_fused <= 2 * err_torch + floor, (i, err_fused, err_torch)


@pytest.mark.parametrize("backend", FUSED)
def test_fused_backend_strided_inputs_are_read_in_place(backend):
    _skip_unless_available(backend)
    dev = DEVICE[backend]
    T, B, D = 6, 4, 21
    base = torch.randn(T, 2 * B, 2 * D + 1, device=dev)
    x = base[:, ::2, 1::2]  # non-contiguous in every dimension but T
    logits = (torch.randn(T, B, device=dev) - 3).t()  # a transposed (B, T) view
    G, w = torch.randn(B, D, device=dev), 1.3
    got = run_gate(backend, x, logits, G, w, seed=11, activation="identity")
    ref = run_gate("torch", x, logits, G, w, seed=11, activation="identity")
    assert torch.equal(got[2], ref[2])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_all_backends_draw_bit_identical_gates_from_a_seed():
    backends = [b for b in ("torch", "cpu", "triton") if _backends.backend_status("purify_gate", "cpu")[b] is None]
    if torch.cuda.is_available():
        backends += ["cuda", "triton-cuda"]
    T, B, D = 50, 64, 3
    x, logits, _, _ = make_inputs(T, B, D, dtype=torch.float32, logit_shift=-2.5)
    seed = int(torch.randint(0, 2**62, ()))
    gates = {}
    for name in backends:
        backend, dev = (name.split("-")[0], "cuda") if name.endswith("cuda") else (name, "cpu")
        if name == "cuda":
            dev = "cuda"
        for mode in ("sample", "expected"):
            gates[(name, mode)] = mim_fast.purify_gate(x.to(dev), logits.to(dev), seed=seed, offset=12345, mode=mode,
                                                       backend=backend).gate.cpu()
    for (name, mode), g in gates.items():
        assert torch.equal(g, gates[("torch", mode)]), (name, mode)
    assert 0 < float(gates[("torch", "sample")].mean()) < 1  # a real mix of open and closed gates


@pytest.mark.parametrize("backend", FUSED)
def test_fused_gate_open_rate_matches_closed_form(backend):
    _skip_unless_available(backend)
    dev = DEVICE[backend]
    n = 20_000
    levels = torch.tensor([-4.0, -3.0, -2.2, -1.0])
    # one sample per logit level, n time steps each: 4 programs (the Triton interpreter is slow per program)
    out = mim_fast.purify_gate(torch.randn(n, 4, 1, device=dev), levels[:, None].expand(4, n).to(dev), seed=99,
                               penalty="threshold", backend=backend)
    rate = out.gate.mean(dim=1).cpu()
    q = reference.gate_open_probability(levels[None, :], penalty="threshold")[0]
    assert torch.all((rate - q).abs() < 5 * (q * (1 - q) / n).sqrt() + 1e-9), (rate, q)


@pytest.mark.parametrize("backend", FUSED)
def test_fused_backend_is_deterministic_and_does_not_mutate(backend):
    _skip_unless_available(backend)
    dev = DEVICE[backend]
    x, logits, noise, lens = make_inputs(8, 3, 40, dtype=torch.float32, lengths=True)
    x, logits, noise, lens = x.to(dev), logits.to(dev), noise.to(dev), lens.to(dev)
    copies = [t.clone() for t in (x, logits, noise, lens)]
    G = torch.randn(3, 40, device=dev)
    a = run_gate(backend, x, logits, G, 0.5, noise=noise, lengths=lens)
    b = run_gate(backend, x, logits, G, 0.5, noise=noise, lengths=lens)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    for t, c in zip((x, logits, noise, lens), copies):
        assert torch.equal(t, c)


@pytest.mark.parametrize("backend", FUSED)
def test_fused_backend_only_penalty_or_only_pooled_used(backend):
    _skip_unless_available(backend)
    dev = DEVICE[backend]
    x, logits, _, _ = make_inputs(5, 2, 7, dtype=torch.float32)
    x, logits = x.to(dev).requires_grad_(), logits.to(dev).requires_grad_()
    mim_fast.purify_gate(x, logits, seed=1, backend=backend).penalty.backward()
    assert x.grad is None  # no gradient flows from the penalty to x (as in the reference)
    ref = logits.grad.clone()
    logits.grad = None
    l2 = logits.detach().clone().requires_grad_()
    mim_fast.purify_gate(x.detach(), l2, seed=1, backend="torch").penalty.backward()
    torch.testing.assert_close(ref, l2.grad, rtol=1e-5, atol=1e-8)
    x.grad = logits.grad = None
    G = torch.randn(2, 7, device=dev)
    (mim_fast.purify_gate(x, logits, seed=1, backend=backend).pooled * G).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    l2 = logits.detach().clone().requires_grad_()
    (mim_fast.purify_gate(x2, l2, seed=1, backend="torch").pooled * G).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.grad, l2.grad, rtol=1e-5, atol=1e-6)


def _op_samples(dev, dtype=torch.float32):
    T, B, D = 7, 3, 10
    samples = []
    for noise, lengths, mode, act in [(False, False, "sample", "tanh"), (True, True, "sample", "relu"),
                                      (False, True, "expected", "identity")]:
        x = torch.randn(T, B, D, device=dev, dtype=dtype, requires_grad=True)
        g = (torch.randn(B, T, device=dev) - 3).requires_grad_()
        samples.append((x, g, torch.rand(B, T, device=dev) if noise else None,
                        torch.tensor([7, 0, 3], device=dev) if lengths else None, 5, 17, mode, act,
                        3.0, 1 / 3, 1.2, -0.2, 0.6, (1 / 3) * math.log(0.2)))
    return samples


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend):
    _skip_unless_available(backend)
    dev = DEVICE[backend]
    fwd = {"cpu": torch.ops.mim_fast.purify_gate_forward, "cuda": torch.ops.mim_fast.purify_gate_forward,
           "triton": torch.ops.mim_fast.purify_gate_forward_triton}[backend]
    bwd = {"cpu": torch.ops.mim_fast.purify_gate_backward, "cuda": torch.ops.mim_fast.purify_gate_backward,
           "triton": torch.ops.mim_fast.purify_gate_backward_triton}[backend]
    for args in _op_samples(dev):
        torch.library.opcheck(fwd, args)
        out = fwd(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
        x = args[0].detach()
        bargs = (torch.randn(x.shape[1], x.shape[2], device=dev), torch.tensor(0.3, device=dev), x, out[2], out[3],
                 out[4], out[5], args[3], args[7])
        torch.library.opcheck(bwd, bargs)
        torch.library.opcheck(bwd, bargs + (False,))  # ∂L/∂x not wanted: a (0,) tensor
    # a batch-first view of x: the op reads strides and returns a gradient of the same layout
    xb = torch.randn(3, 7, 10, device=dev).transpose(0, 1).requires_grad_()
    torch.library.opcheck(fwd, (xb,) + _op_samples(dev)[0][1:])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("batch_first", [False, True])
def test_backward_without_x_gradient(backend, batch_first):
    """x frozen (MIM's mask-learner update differentiates w.r.t. the logits only): the fused backward
    computes no ∂L/∂x — the op returns a (0,) tensor — and ∂L/∂logits is the same, bit for bit, as when
    x needs a gradient too (the same reduction, in the same order)."""
    _skip_unless_available(backend)
    dev = DEVICE[backend]
    T, B, D = 11, 3, 70
    x, logits, _, lens = make_inputs(T, B, D, dtype=torch.float32, batch_first=batch_first, lengths=True)
    x, logits, lens = x.to(dev), logits.to(dev), lens.to(dev)
    G = torch.randn(B, D, device=dev)
    opts = dict(seed=int(torch.randint(0, 2**62, ())), lengths=lens, batch_first=batch_first)
    both = run_gate(backend, x, logits, G, 0.4, **opts)
    lg = logits.clone().requires_grad_()
    out = mim_fast.purify_gate(x, lg, backend=backend, **opts)
    torch.autograd.backward([out.pooled, out.penalty], [G, torch.tensor(0.4, device=dev)])
    assert torch.equal(lg.grad, both[4])
    ref = run_gate("torch", x, logits, G, 0.4, **opts)
    torch.testing.assert_close(lg.grad, ref[4], rtol=1e-4, atol=1e-5)

    ops = {"triton": (torch.ops.mim_fast.purify_gate_forward_triton, torch.ops.mim_fast.purify_gate_backward_triton)}
    fwd, bwd = ops.get(backend, (torch.ops.mim_fast.purify_gate_forward, torch.ops.mim_fast.purify_gate_backward))
    xs = x.transpose(0, 1) if batch_first else x
    saved = fwd(xs, logits, None, lens, 3, 0, "sample", "tanh", 3.0, 1 / 3, 1.2, -0.2, 0.6, -0.5)
    gx, gl = bwd(G, torch.tensor(0.4, device=dev), xs, saved[2], saved[3], saved[4], saved[5], lens, "tanh", False)
    gx_full, gl_full = bwd(G, torch.tensor(0.4, device=dev), xs, saved[2], saved[3], saved[4], saved[5], lens, "tanh")
    assert gx.shape == (0,) and gx_full.shape == xs.shape
    assert torch.equal(gl, gl_full)


@pytest.mark.parametrize("backend", FUSED)
def test_compile_fullgraph(backend):
    _skip_unless_available(backend)
    dev = DEVICE[backend]
    torch._dynamo.reset()

    def step(x, logits, lengths):
        out = mim_fast.purify_gate(x, logits, seed=7, offset=3, lengths=lengths, backend=backend)
        return out.pooled.square().sum() + out.penalty, out.gate

    compiled = torch.compile(step, fullgraph=True)
    x, logits, _, lens = make_inputs(6, 3, 16, dtype=torch.float32, lengths=True)
    x, logits, lens = x.to(dev), logits.to(dev), lens.to(dev)
    xa, la = x.clone().requires_grad_(), logits.clone().requires_grad_()
    xb, lb = x.clone().requires_grad_(), logits.clone().requires_grad_()
    loss_a, gate_a = step(xa, la, lens)
    loss_b, gate_b = compiled(xb, lb, lens)
    loss_a.backward()
    loss_b.backward()
    assert torch.equal(gate_a, gate_b)
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(la.grad, lb.grad)


@pytest.mark.cuda
def test_cuda_lengths_on_cpu_and_large_batch():
    x = torch.randn(50, 300, 768, device="cuda")
    logits = torch.randn(300, 50, device="cuda") - 3
    lens = torch.randint(0, 51, (300,))
    G = torch.randn(300, 768, device="cuda")
    got = run_gate("cuda", x, logits, G, 0.4, seed=5, lengths=lens)
    ref = run_gate("torch", x, logits, G, 0.4, seed=5, lengths=lens.cuda())
    assert torch.equal(got[2], ref[2])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_auto_prefers_the_cpu_kernels_on_cpu():
    if _backends.backend_status("purify_gate", "cpu")["cpu"] is not None:
        pytest.skip("no _C")
    assert _backends.select("purify_gate", "auto", torch.device("cpu"), (torch.float32,)) is \
        _backends._REGISTRY["purify_gate"]["cpu"][0]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_backend_propagates_nonfinite_features_like_the_reference(backend, activation):
    """x·0 is NaN for x = NaN or ±inf: a closed gate does not hide a non-finite feature (SPEC: y = x·z)."""
    _skip_unless_available(backend)
    dev = DEVICE[backend]
    T, B, D = 6, 3, 40
    x, _, _, _ = make_inputs(T, B, D, dtype=torch.float32)
    logits = torch.full((B, T), -3.0)
    logits[:, ::2] = 5.0  # even steps open, odd steps closed (mode "expected")
    x[1, 0, 3] = float("nan")   # closed step
    x[2, 1, 5] = float("inf")   # open step
    x[3, 2, 7] = -float("inf")  # closed step
    G = torch.randn(B, D)
    got = run_gate(backend, x.to(dev), logits.to(dev), G.to(dev), 0.5, mode="expected", activation=activation)
    ref = run_gate("torch", x, logits, G, 0.5, mode="expected", activation=activation)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.isnan(got[0][0, 3]) and torch.isnan(got[0][2, 7])


# ----------------------------------------------------------------------------------------------------
# One NaN policy on every backend (the reference's docstring): NaN in, NaN out as SPEC §1's formulas
# compute it; the clamp's indicator selects; padding is never read.
# ----------------------------------------------------------------------------------------------------
NAN = float("nan")


def _grads_of(backend, x, logits, *, G, w, **opts):
    xg, lg = x.clone().requires_grad_(), logits.clone().requires_grad_()
    out = mim_fast.purify_gate(xg, lg, backend=backend, **opts)
    torch.autograd.backward([out.pooled, out.penalty], [G, torch.tensor(w, device=x.device)])
    return out, xg.grad, lg.grad


def _same(got, want, what):
    got, want = got.detach().cpu(), want.detach().cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (what, got, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True, msg=what)


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
@pytest.mark.parametrize("mode", ["expected", "sample"])
def test_nan_logit_makes_the_gate_and_the_sample_nan(backend, mode):
    """Issue 15, item 7: a NaN logit at a valid step: gate NaN there, pooled NaN in every feature of that
    sample (z = c + sg(h − c) is NaN), the other sample untouched; ∂L/∂x NaN at that step, ∂L/∂logits NaN
    at that logit only."""
    if backend != "torch":
        _skip_unless_available(backend)
    dev = DEVICE.get(backend, "cpu")
    x = torch.randn(3, 2, 4, device=dev)
    logits = torch.tensor([[NAN, 5.0, -9.0], [1.0, -2.0, 6.0]], device=dev)
    G = torch.randn(2, 4, device=dev)
    out, gx, gl = _grads_of(backend, x, logits, G=G, w=0.0, mode=mode, seed=3)
    ref, rgx, rgl = _grads_of("torch", x.cpu(), logits.cpu(), G=G.cpu(), w=0.0, mode=mode, seed=3)
    assert torch.isnan(out.gate[0, 0]) and not torch.isnan(out.gate[0, 1:]).any() and not torch.isnan(out.gate[1]).any()
    assert torch.isnan(out.pooled[0]).all() and not torch.isnan(out.pooled[1]).any()
    assert torch.isnan(gx[0, 0]).all() and not torch.isnan(gx[1:, 0]).any() and not torch.isnan(gx[:, 1]).any()
    assert torch.isnan(gl[0, 0]) and not torch.isnan(gl[0, 1:]).any() and not torch.isnan(gl[1]).any()
    for a, b, what in ((out.gate, ref.gate, "gate"), (out.pooled, ref.pooled, "pooled"), (gx, rgx, "dx"),
                       (gl, rgl, "dlogits")):
        _same(a, b, what)


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
@pytest.mark.parametrize("bad", [NAN, -float("inf"), float("inf")])
def test_nonfinite_feature_at_a_clamped_step_gives_its_logit_no_gradient(backend, bad):
    """Issue 15, item 8: a NaN/±inf feature at a step whose gate is clamped closed (s̄ < 0): pooled is NaN
    (x·0), but the clamp passes no gradient, so ∂L/∂logits there is 0, not NaN·0."""
    if backend != "torch":
        _skip_unless_available(backend)
    dev = DEVICE.get(backend, "cpu")
    x = torch.randn(3, 1, 5, device=dev)
    x[1, 0, 2] = bad
    logits = torch.tensor([[4.0, -30.0, 4.0]], device=dev)  # step 1: s̄ = (ζ−γ)·σ(−27) + γ < 0
    G = torch.randn(1, 5, device=dev)
    out, gx, gl = _grads_of(backend, x, logits, G=G, w=0.0, mode="expected")
    assert out.gate.tolist() == [[1.0, 0.0, 1.0]] and torch.isnan(out.pooled[0, 2])
    assert float(gl[0, 1]) == 0.0, gl
    ref, rgx, rgl = _grads_of("torch", x.cpu(), logits.cpu(), G=G.cpu(), w=0.0, mode="expected")
    for a, b, what in ((out.pooled, ref.pooled, "pooled"), (gx, rgx, "dx"), (gl, rgl, "dlogits")):
        _same(a, b, what)


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
def test_padding_is_never_read_whatever_it_holds(backend):
    """Issue 15, item 9: NaN/inf logits and features at padding (t ≥ lengths[b]) change nothing: the
    outputs and gradients equal those of the same call with finite padding, and padding gets exactly
    zero gradient."""
    if backend != "torch":
        _skip_unless_available(backend)
    dev = DEVICE.get(backend, "cpu")
    T, B, D = 6, 3, 7
    x, logits, noise, _ = make_inputs(T, B, D, dtype=torch.float32)
    lens = torch.tensor([4, 0, 6])
    x, logits, noise = x.to(dev), logits.to(dev), noise.to(dev)
    dirty_x, dirty_l, dirty_u = x.clone(), logits.clone(), noise.clone()
    dirty_x[4:, 0] = NAN
    dirty_x[:, 1, 0] = float("inf")
    dirty_l[0, 4:] = NAN
    dirty_l[1, :] = float("inf")
    dirty_u[0, 5] = 0.999  # (NaN noise is refused at any step by the argument check)
    G = torch.randn(B, D, device=dev)
    for opts in (dict(mode="expected"), dict(noise=noise), dict(seed=9)):
        u = opts.pop("noise", None)
        clean = _grads_of(backend, x, logits, G=G, w=0.7, lengths=lens.to(dev), noise=u, **opts)
        dirty = _grads_of(backend, dirty_x, dirty_l, G=G, w=0.7, lengths=lens.to(dev),
                          noise=dirty_u if u is not None else None, **opts)
        for a, b, what in zip(dirty[0] + dirty[1:], clean[0] + clean[1:], ("pooled", "penalty", "gate", "dx", "dl")):
            assert torch.equal(a, b), (what, opts)
        assert not dirty[1][4:, 0].any() and not dirty[1][:, 1].any() and not dirty[2][0, 4:].any() \
            and not dirty[2][1].any()


@pytest.mark.cuda
def test_cuda_gate_math_bit_identical_to_cpu_at_op_level():
    """The op's gate, ste and dq outputs are pure IEEE gate math: CPU and GPU must agree bit for bit."""
    if _backends.backend_status("purify_gate", "cpu")["cpu"] or _backends.backend_status("purify_gate", "cuda")["cuda"]:
        pytest.skip("needs both the cpu and the cuda kernels")
    T, B = 300, 257
    x = torch.randn(T, B, 3)
    logits = torch.randn(B, T) * 4 - 3
    for mode in ("sample", "expected"):
        args = (None, None, 12345, 678, mode, "tanh", 3.0, 1 / 3, 1.2, -0.2, 0.6, (1 / 3) * math.log(0.2))
        cpu = torch.ops.mim_fast.purify_gate_forward(x, logits, *args)
        gpu = torch.ops.mim_fast.purify_gate_forward(x.cuda(), logits.cuda(), *args)
        for i in (2, 3, 4):
            assert torch.equal(cpu[i].view(torch.int32), gpu[i].cpu().view(torch.int32)), (mode, i)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(500, 64, 768), (50, 2048, 96), (3, 5, 1030), (1, 1, 1)])
def test_cuda_shapes_that_split_time_or_features(shape):
    """Few samples: the forward splits T across blocks (partial sums); many tiles; odd widths."""
    T, B, D = shape
    x, logits, noise, lens = make_inputs(T, B, D, dtype=torch.float32, lengths=True)
    x, logits, noise, lens = x.cuda(), logits.cuda(), noise.cuda(), lens.cuda()
    G = torch.randn(B, D, device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        got = run_gate("cuda", x.to(dtype), logits, G, 0.4, noise=noise, lengths=lens)
        ref = run_gate("torch", x.to(dtype), logits, G, 0.4, noise=noise, lengths=lens)
        assert torch.equal(got[2], ref[2])
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.float(), b.float(), **tol)


def test_lengths_beyond_T_on_an_unchecked_path_are_clamped():
    """Lengths on a GPU are not range-checked (no host sync); every backend clamps them to [0, T]."""
    x, logits, noise, _ = make_inputs(6, 3, 4, dtype=torch.float32)
    lens = torch.tensor([9, -2, 3])
    ref = reference.purify_gate(x, logits, noise=noise, lengths=lens)
    clamped = reference.purify_gate(x, logits, noise=noise, lengths=lens.clamp(0, 6))
    for a, b in zip(ref, clamped):
        assert torch.equal(a, b)
    if mim_fast.build_info() is not None:
        out = torch.ops.mim_fast.purify_gate_forward(x, logits, noise, lens, 0, 0, "sample", "tanh", 3.0, 1 / 3, 1.2,
                                                     -0.2, 0.6, (1 / 3) * math.log(0.2))
        torch.testing.assert_close(out[0], ref.pooled)
        torch.testing.assert_close(out[1], ref.penalty)


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
@pytest.mark.parametrize("batch_first", [False, True])
def test_empty_batch_gives_empty_results(backend, batch_first):
    """Issue 15, item 10: B = 0 (an empty rank, a filtered batch) is not an error: pooled (0, D), penalty
    exactly 0 (not 0/0), gate (0, T), and the backward runs (empty gradients, 0 for the penalty)."""
    if backend != "torch":
        _skip_unless_available(backend)
    dev = DEVICE.get(backend, "cpu")
    T, D = 5, 7
    x = torch.randn((0, T, D) if batch_first else (T, 0, D), device=dev, dtype=torch.bfloat16, requires_grad=True)
    logits = torch.randn(0, T, device=dev, requires_grad=True)
    for opts in (dict(seed=3), dict(mode="expected"), dict(lengths=torch.zeros(0, dtype=torch.int64))):
        out = mim_fast.purify_gate(x, logits, backend=backend, batch_first=batch_first, **opts)
        assert out.pooled.shape == (0, D) and out.pooled.dtype == torch.bfloat16
        assert out.gate.shape == (0, T) and out.penalty.shape == () and float(out.penalty) == 0.0
        (out.pooled.float().sum() + out.penalty).backward()
        assert x.grad.shape == x.shape and logits.grad.shape == logits.shape
    assert mim_fast.purify_gate(x, logits, backend=backend, batch_first=batch_first).pooled.shape == (0, D)


@pytest.mark.skipif(mim_fast.build_info() is None, reason="no _C")
def test_cpu_op_autograd_is_cpp():
    """The C++ ops' graph nodes are C++ (csrc/autograd.cpp): no Python runs on the way forward or back,
    which is most of the per-call cost at MIM's size (benchmarks/op_overhead.py). Triton keeps its Python
    autograd."""
    x, g = torch.randn(3, 2, 4, requires_grad=True), torch.randn(2, 3, requires_grad=True)
    assert "CppNode<mim_fast::" in mim_fast.purify_gate(x, g, seed=1, backend="cpu").pooled.grad_fn.name()
    for op in ("mim_fast::purify_gate_forward", "mim_fast::kgs_loss_forward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "Autograd"), op


@pytest.mark.skipif(mim_fast.build_info() is None, reason="no _C")
@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_cpu_kernel_is_bit_identical_across_isas(isa):
    """The gate pass and the feature loops are vectorized per ISA with the same IEEE operations in every
    lane (no FMA, sums in a fixed order): a narrower build (in a subprocess) gives the same bits as the
    widest one here, sampled and expected gates, forward and backward."""
    code = ("import sys, torch, mim_fast; torch.manual_seed(5)\n"
            "x = torch.randn(61, 7, 133).requires_grad_(); g = (3 * torch.randn(7, 61) - 3).requires_grad_()\n"
            "res = []\n"
            "for opts in (dict(seed=2**40 + 7, offset=3), dict(mode='expected', lengths=torch.tensor([61, 0, 5, 60, 1, 61, 30])),\n"
            "             dict(noise=torch.rand(7, 61), activation='relu')):\n"
            "    x.grad = g.grad = None\n"
            "    out = mim_fast.purify_gate(x, g, backend='cpu', **opts)\n"
            "    (out.pooled.square().sum() + out.penalty).backward()\n"
            "    res += [out.pooled, out.penalty, out.gate, x.grad, g.grad]\n"
            "torch.save([t.detach() for t in res], sys.argv[1])\n")
    narrow = saved_under_isa(code, isa, "gate")
    scope = {}
    exec(code.replace("torch.save([t.detach() for t in res], sys.argv[1])", "here = [t.detach() for t in res]"), scope)
    for a, b in zip(narrow, scope["here"]):
        assert torch.equal(a, b)


@pytest.mark.skipif(mim_fast.build_info() is None, reason="mim_fast._C not built")
@pytest.mark.parametrize("batch_first", [False, True])
def test_common_call_goes_through_the_dispatcher(batch_first, monkeypatch):
    """The common call reaches the C++ op through _C.purify_gate_call, not torch.ops: a dispatch mode still
    sees the forward op (and autograd its backward), and the results equal the full path's bit for bit."""
    module = importlib.import_module("mim_fast.ops.purify_gate")

    T, B, D = 6, 3, 5
    x = torch.randn(B, T, D) if batch_first else torch.randn(T, B, D)
    g = torch.randn(B, T) - 3
    u = torch.rand(B, T).clamp(1e-6, 1 - 1e-6)
    results = []
    for common in (True, False):
        xl, gl = x.clone().requires_grad_(), g.clone().requires_grad_()
        args = (xl, gl, u, None, 0, "sample", "tanh", "mim", None, batch_first, 1 / 3, -0.2, 1.0, 3.0, 0.6, "cpu")
        with SeenOps() as rec:
            if common:
                out = module._common_call(*args)
                assert out is not None
            else:  # the full path: torch.ops.mim_fast.purify_gate_forward from Python
                with monkeypatch.context() as m:
                    m.setattr(module, "_common_call", lambda *a: None)
                    out = mim_fast.purify_gate(xl, gl, noise=u, batch_first=batch_first, backend="cpu")
            torch.autograd.backward([out.pooled, out.penalty], [torch.ones(B, D), torch.ones(())])
        assert "mim_fast.purify_gate_forward.default" in rec.ops
        assert "mim_fast.purify_gate_backward.default" in rec.ops
        results.append(tuple(out) + (xl.grad, gl.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------
# Found by a differential fuzzer (fast path vs full path vs reference), 2026-12-07.
@pytest.mark.parametrize("backend", ["torch"] + FUSED)
def test_clamp_passes_gradient_at_its_bounds(backend):
    """SPEC §1: ∂L/∂s̄ = ∂L/∂c·1[0 ≤ s̄ ≤ 1], the closed interval, on every backend and in the reference
    (torch.clamp's own backward passes none at the bounds in torch 2.14). s̄ = 0 exactly: gamma = −1, zeta = 1,
    a = 0 in mode "expected" (s = 1/2): ∂L/∂g = (ζ−γ)·s(1−s)·Σ_d G·x/T, not 0. s̄ = 1 exactly (a saturated
    gate, s = 1) with an inf feature: ∂L/∂g = (ζ−γ)·0·inf = NaN, as the formula computes it."""
    if backend != "torch":
        _skip_unless_available(backend)
    dev = DEVICE.get(backend, "cpu")
    T, B, D = 4, 3, 6
    x = torch.randn(T, B, D, device=dev)
    G = torch.randn(B, D, device=dev)
    opts = dict(mode="expected", activation="identity", gamma=-1.0, zeta=1.0, threshold=0.6, loc_bias=3.0)
    logits = torch.full((B, T), -3.0, device=dev)  # a = 0: s = 1/2, s̄ = 0, c = 0, the gate closed
    out, _, gl = _grads_of(backend, x, logits, G=G, w=0.0, **opts)
    assert out.gate.eq(0).all()
    want = 0.5 * torch.einsum("bd,tbd->bt", G.double(), x.double()) / T  # 2·(1/4)·Σ_d G·x/T
    torch.testing.assert_close(gl.double().cpu(), want.cpu(), rtol=1e-5, atol=1e-6)
    assert gl.abs().min() > 0
    x[1, 0, 2] = float("inf")
    logits = torch.full((B, T), -3.0, device=dev)
    logits[0, 1] = 60.0  # s = 1 (exactly, in float32 and float64), s̄ = 1: open, on the upper bound
    out, _, gl = _grads_of(backend, x, logits, G=G, w=0.0, **opts)
    assert float(out.gate[0, 1]) == 1.0 and torch.isnan(gl[0, 1]) and not torch.isnan(gl[0, [0, 2, 3]]).any()
    ref, _, rgl = _grads_of("torch", x.cpu(), logits.cpu(), G=G.cpu(), w=0.0, **opts)
    _same(gl, rgl, "dlogits")


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
@pytest.mark.parametrize("bad", [NAN, float("inf")])
def test_penalty_alone_never_reads_x(backend, bad):
    """A backward of the penalty alone: the logits get ∂L/∂P·q(1−q)/n, as the reference's autograd gives,
    even where x holds NaN or inf (the feature pass, whose ste·Σ_d 0·x would be NaN there, is skipped), and
    x gets no gradient at all (None, not zeros)."""
    if backend != "torch":
        _skip_unless_available(backend)
    dev = DEVICE.get(backend, "cpu")
    x = torch.randn(4, 2, 5, device=dev)
    x[1, 0, 3] = bad
    logits = (torch.randn(2, 4, device=dev) * 2 - 3)
    got = []
    for b in (backend, "torch"):
        xg, lg = x.clone().requires_grad_(), logits.clone().requires_grad_()
        mim_fast.purify_gate(xg, lg, seed=5, backend=b).penalty.backward(torch.tensor(0.7, device=dev))
        assert xg.grad is None
        got.append(lg.grad)
    assert torch.isfinite(got[0]).all()
    torch.testing.assert_close(got[0], got[1], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("backend", ["torch"] + FUSED)
def test_outputs_require_grad_as_in_the_reference(backend):
    """Which outputs need a gradient depends on which inputs do, as in the reference: the penalty only on
    the logits (with x alone requiring grad, penalty.backward() raises rather than writing zeros into
    x.grad); noise is a constant (requiring grad, it makes no output require one)."""
    if backend != "torch":
        _skip_unless_available(backend)
    dev = DEVICE.get(backend, "cpu")
    x, logits = torch.randn(4, 2, 5, device=dev), torch.randn(2, 4, device=dev)
    noise = torch.rand(2, 4, device=dev).clamp(0.01, 0.99)
    out = mim_fast.purify_gate(x.requires_grad_(), logits, noise=noise, backend=backend)
    assert out.pooled.requires_grad and not out.penalty.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        out.penalty.backward()
    assert x.grad is None
    out = mim_fast.purify_gate(x.detach(), logits, noise=noise.requires_grad_(), backend=backend)
    assert not out.pooled.requires_grad and not out.penalty.requires_grad and noise.grad is None
    out = mim_fast.purify_gate(x.detach(), logits.requires_grad_(), noise=noise, backend=backend)
    assert out.pooled.requires_grad and out.penalty.requires_grad


@pytest.mark.parametrize("backend", FUSED)
def test_create_graph_raises(backend):
    """backward(create_graph=True) through the op raises: the fused backward has no derivative of its own,
    so a second derivative would be silently missing (None, or absent from a sum of terms); the reference,
    autograd's, has one. A plain backward is unaffected."""
    _skip_unless_available(backend)
    dev = DEVICE[backend]
    for requires in ("x", "logits"):
        x = torch.randn(5, 3, 4, device=dev, requires_grad=requires == "x")
        logits = torch.randn(3, 5, device=dev, requires_grad=requires == "logits")
        out = mim_fast.purify_gate(x, logits, seed=1, backend=backend)
        with pytest.raises(RuntimeError, match="create_graph=True is not supported.*backend='torch'"):
            torch.autograd.grad(out.pooled.sum() + out.penalty, x if requires == "x" else logits, create_graph=True)
        out = mim_fast.purify_gate(x, logits, seed=1, backend=backend)
        torch.autograd.grad(out.pooled.sum() + out.penalty, x if requires == "x" else logits)
    ref = reference.purify_gate(x, logits, seed=1)
    g, = torch.autograd.grad(ref.pooled.sum(), logits, create_graph=True)
    assert g.requires_grad  # the reference does differentiate twice


def test_a_torch_function_mode_sees_the_op_on_the_common_path():
    """A TorchFunctionMode (a tracer, a logger) sees only torch.ops calls: with one active, the eager common
    call hands over to the full path, whose op call it sees."""
    x, g = torch.randn(5, 3, 4), torch.randn(3, 5)
    with SeenFunctions() as mode:
        out = mim_fast.purify_gate(x, g, seed=1)
    assert any("purify_gate" in f for f in mode.funcs), mode.funcs
    assert torch.equal(out.pooled, mim_fast.purify_gate(x, g, seed=1).pooled)


def test_reference_empty_batch_penalty_is_zero():
    """The reference, as the op: B = 0 averages the penalty over no step, 0 (it was 0/0 = NaN)."""
    out = reference.purify_gate(torch.randn(5, 0, 3), torch.randn(0, 5), seed=1)
    assert float(out.penalty) == 0.0 and out.pooled.shape == (0, 3)
