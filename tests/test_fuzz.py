"""Fuzzing: many random legal calls of each op, every fused backend against the reference.

Each case draws its own shapes (1 and primes among them), layout (contiguous, batch-first, strided
views), options, hyper-parameters, dtype and occasional non-finite values and exact ties, from a seed
derived from the session's base seed (printed in the header and at the end) and the case number. A
failure names both, so one case can be replayed:

    MIM_FAST_TEST_SEED=<base> MIM_FAST_FUZZ_CASE=<n> pytest tests/test_fuzz.py -k <test>

Checked per case: no exception; inputs never mutated; the gate bit-identical to the reference and the
KGS routing (teacher) identical; every output and gradient within the tolerances of the per-op tests
(float32/float64), or by the accuracy rule (2× the same-precision torch error) for float16/bfloat16; NaN
exactly where the reference has NaN (the NaN policy). MIM_FAST_FUZZ_CASES sets the count (default 1000
per op on the cpu and torch backends, 40 on Triton under the interpreter).
"""
import math
import os
import random
import zlib

import pytest
import torch

import mim_fast
from mim_fast import KGSLossOutput
from mim_fast.ops import _backends

import conftest
import test_kgs_loss as K
import test_purify_gate as G

EPS32 = torch.finfo(torch.float32).eps
CASES = int(os.environ.get("MIM_FAST_FUZZ_CASES", "1000"))
TRITON_CASES = int(os.environ.get("MIM_FAST_FUZZ_TRITON_CASES", "40"))
ONLY = os.environ.get("MIM_FAST_FUZZ_CASE")


def _cases(name, n):
    """(case number, a random.Random seeded by (base seed, name, case)), torch seeded alike."""
    for i in ([int(ONLY)] if ONLY is not None else range(n)):
        seed = zlib.crc32(("%d/%s/%d" % (conftest.BASE_SEED, name, i)).encode())
        torch.manual_seed(seed)
        yield i, random.Random(seed)


def _replay(name, i):
    return "fuzz case %d of %s: replay with MIM_FAST_TEST_SEED=%d MIM_FAST_FUZZ_CASE=%d" % (
        i, name, conftest.BASE_SEED, i)


def _backend_or_skip(op, backend, device):
    reason = _backends.backend_status(op, device, (torch.float32,))[backend]
    if reason:
        pytest.skip(reason)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    """A leaf copy of t that keeps t's strides, dense or not (Tensor.clone makes a non-dense view
    contiguous, and the strided layouts are part of what is fuzzed)."""
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
    with torch.no_grad():
        out.copy_(t)
    return out.requires_grad_(t.is_floating_point())


def _unchanged(before, after):
    return before.shape == after.shape and bool(((before == after) | (before.isnan() & after.isnan())).all())


def _run_gate(backend, x, logits, Gr, w, **opts):
    """(pooled, penalty, gate, dx, dlogits) of purify_gate on backend, x and logits as strided as given."""
    xg, lg = _leaf(x), _leaf(logits)
    out = mim_fast.purify_gate(xg, lg, backend=backend, **opts)
    torch.autograd.backward([out.pooled, out.penalty],
                            [Gr.to(out.pooled.dtype), torch.tensor(w, dtype=out.penalty.dtype, device=x.device)])
    return out.pooled.detach(), out.penalty.detach(), out.gate.detach(), xg.grad, lg.grad


def _run_kgs(backend, yk, yu, y, h, grad_out, terms, **opts):
    ins = [_leaf(t) for t in (yk, yu, y, h)]
    out = mim_fast.kgs_loss(*ins, backend=backend, **opts)
    torch.autograd.backward([getattr(out, k) for k in terms], [grad_out[k].to(getattr(out, k).dtype) for k in terms])
    return KGSLossOutput(*(t.detach() for t in out)), [t.grad for t in ins]


def _same_nan_and_close(got, want, rtol, atol, what):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), "%s: NaN where the reference has none (or not)" % what
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: "%s: %s" % (what, m))


# ---------------------------------------------------------------------------------------------------- gate
def _gate_case(rng: random.Random, device, allow_fp64: bool):
    T = rng.choice([1, 2, 3, 5, 7, 13, 31, 50, 61])
    B = rng.choice([1, 2, 3, 5, 11, 17])
    D = rng.choice([1, 2, 3, 7, 29, 80, 131, 257])
    dtype = rng.choices([torch.float32, torch.float64, torch.float16, torch.bfloat16],
                        weights=[6, 2 if allow_fp64 else 0, 1, 1])[0]
    layout = rng.choice(["contiguous", "batch_first", "strided"])
    if layout == "strided":  # every dimension but one non-contiguous
        x = torch.randn(T, 2 * B, 2 * D + 1, dtype=torch.float64)[:, ::2, 1::2]
    elif layout == "batch_first":
        x = torch.randn(B, T, D, dtype=torch.float64)
    else:
        x = torch.randn(T, B, D, dtype=torch.float64)
    x = (x * rng.choice([0.1, 1.0, 5.0])).to(dtype)
    logits = (rng.uniform(0.5, 4.0) * torch.randn(B, T) + rng.uniform(-6.0, 1.0)).to(
        torch.float64 if dtype == torch.float64 else torch.float32)
    if rng.random() < 0.3:  # a transposed (B, T) view
        logits = logits.t().contiguous().t()
    gamma = rng.uniform(-0.5, -0.01)
    zeta = rng.uniform(1.0, 1.5)
    opts = dict(mode=rng.choice(["sample", "expected"]), activation=rng.choice(["tanh", "relu", "identity"]),
                penalty=rng.choice(["mim", "threshold"]), batch_first=layout == "batch_first",
                beta=rng.uniform(0.1, 2.0), gamma=gamma, zeta=zeta, loc_bias=rng.uniform(-2.0, 4.0),
                threshold=rng.uniform(max(0.0, gamma) + 0.01, min(zeta, 1.0) - 0.01))
    if opts["mode"] == "sample":
        if rng.random() < 0.5:
            opts["noise"] = torch.rand(B, T, dtype=logits.dtype).clamp(1e-6, 1 - 1e-6)
        else:
            opts["seed"], opts["offset"] = rng.randrange(2**62), rng.randrange(2**40)
    if rng.random() < 0.5:
        lens = torch.randint(0, T + 1, (B,))
        lens[rng.randrange(B)] = rng.choice([0, T])
        opts["lengths"] = lens
    if rng.random() < 0.1 and dtype in (torch.float32, torch.float64):  # the NaN policy, at random places
        logits[rng.randrange(B), rng.randrange(T)] = float("nan")
    if rng.random() < 0.1 and dtype in (torch.float32, torch.float64):
        xs = x.transpose(0, 1) if opts["batch_first"] else x
        xs[rng.randrange(T), rng.randrange(B), rng.randrange(D)] = rng.choice([float("nan"), float("inf")])
    Gr = torch.randn(B, D, dtype=torch.float64).to(dtype)
    w = rng.uniform(-2.0, 2.0)
    moved = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in opts.items()}
    return x.to(device), logits.to(device), Gr.to(device), w, moved


def _check_gate(backend, device, x, logits, Gr, w, opts):
    inputs = (x, logits, Gr) + tuple(v for v in opts.values() if torch.is_tensor(v))
    before = [t.clone() for t in inputs]
    got = _run_gate(backend, x, logits, Gr, w, **opts)
    assert all(_unchanged(b, a) for b, a in zip(before, inputs)), "an input was modified"
    cpu = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in opts.items()}
    xc, lc, gc = x.cpu(), logits.cpu(), Gr.cpu()
    half = x.dtype in (torch.float16, torch.bfloat16)
    ref = _run_gate("torch", xc, lc, gc, w, **cpu)
    assert torch.equal(torch.isnan(got[2].cpu()), torch.isnan(ref[2])), "NaN gates differ"
    assert torch.equal(got[2].cpu().nan_to_num(7.0), ref[2].nan_to_num(7.0)), "gates differ from the reference"
    f64 = x.dtype == torch.float64 or logits.dtype == torch.float64
    rtol, atol = (1e-10, 1e-12) if f64 else (1e-5, 1e-6)
    if half:
        # pooled and ∂L/∂x are rounded to x's dtype: the accuracy rule against the same computation on
        # float32 features (torch's error is then its final rounding; the gates are the same, decided in
        # float32); the rest is float32 arithmetic on the same values, judged as float32 below
        exact = _run_gate("torch", xc.float(), lc, gc.float(), w, **cpu)
        for i, name in ((0, "pooled"), (3, "dx")):
            g, r, e = (t.double().cpu().nan_to_num(0.0, 0.0, 0.0) for t in (got[i], ref[i], exact[i]))
            err_fused, err_torch = float((g - e).abs().max()), float((r - e).abs().max())
            floor = torch.finfo(got[i].dtype).eps * float(e.abs().max() + 1e-3)
            assert err_fused <= 2 * err_torch + floor, (name, err_fused, err_torch, floor)
        checks = ((1, "penalty"),)
    else:
        checks = ((0, "pooled"), (1, "penalty"), (3, "dx"))
    for i, name in checks:
        _same_nan_and_close(got[i], ref[i], rtol, atol if i != 1 else atol / 10, name)
    # ∂L/∂logits sums D products that can cancel: tolerance from the same chain on magnitudes (as in
    # test_purify_gate.test_fused_backend_matches_reference)
    dl, rl = got[4].double().cpu(), ref[4].double()
    assert torch.equal(torch.isnan(dl), torch.isnan(rl)), "dlogits: NaN where the reference has none (or not)"
    finite = torch.isfinite(rl)
    if finite.any():
        abs_opts = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in cpu.items()}
        terms = _run_gate("torch", xc.abs().double().nan_to_num(0, 0, 0), lc.double().nan_to_num(0.0),
                          gc.abs().double(), abs(w), **abs_opts)[4].abs()
        D = x.shape[2]
        tol = (1e-10 if f64 else 1e-4) * rl.abs() + (1e-12 if f64 else 1e-5) * (float(rl[finite].abs().max()) + 1e-3) \
            + D ** 0.5 * (1e-13 if f64 else 1e-6) * terms
        err = (dl - rl).abs()
        assert bool((err[finite] <= tol[finite]).all()), ("dlogits", float((err - tol)[finite].max()))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_fuzz_purify_gate(backend):
    _backend_or_skip("purify_gate", backend, "cpu")
    for i, rng in _cases("gate-" + backend, CASES):
        case = _gate_case(rng, "cpu", allow_fp64=True)
        try:
            _check_gate(backend, "cpu", *case)
        except Exception as exc:
            raise AssertionError(_replay("test_fuzz_purify_gate[%s]" % backend, i)) from exc


@pytest.mark.triton
def test_fuzz_purify_gate_triton():
    dev = G.DEVICE["triton"]
    _backend_or_skip("purify_gate", "triton", dev)
    for i, rng in _cases("gate-triton", TRITON_CASES):
        case = _gate_case(rng, dev, allow_fp64=False)
        try:
            _check_gate("triton", dev, *case)
        except Exception as exc:
            raise AssertionError(_replay("test_fuzz_purify_gate_triton", i)) from exc


# ---------------------------------------------------------------------------------------------------- KGS
def _kgs_case(rng: random.Random, allow_fp64: bool):
    M = rng.randint(2, 5)
    B = rng.choice([1, 2, 3, 5, 11, 17, 64])
    D = rng.choice([1, 2, 3, 7, 80, 131, 1030])
    dtype = rng.choices([torch.float32, torch.float64, torch.float16, torch.bfloat16],
                        weights=[6, 2 if allow_fp64 else 0, 1, 1])[0]
    per_sample = rng.random() < 0.6
    yk, yu, y, h = K.make_inputs(M, B, D, dtype=torch.float64)  # well-separated errors: no near-ties
    if per_sample and rng.random() < 0.3:
        # exact ties, which every precision and implementation sees alike per sample (not in batch means:
        # two equal rows can sum in different orders, e.g. by alignment, and the fused kernels sum in float64)
        yk[rng.randrange(M)] = yk[rng.randrange(M)]
        yu[rng.randrange(M), :] = yk[rng.randrange(M), :]
    h = h * rng.choice([0.1, 1.0, 4.0])
    if rng.random() < 0.3:  # strided views
        h = torch.randn(M, B, 2 * D, dtype=torch.float64)[:, :, ::2] * 2
        yk = yk.t().contiguous().t()
    weights = tuple(rng.choice([0.0, 1.0, rng.uniform(0.0, 3.0)]) for _ in range(4))
    opts = dict(per_sample=per_sample, kd_scale=rng.uniform(0.1, 10.0), kd_divide_T=rng.random() < 0.5,
                weights=weights, reduction=rng.choice(["mean", "sum", "none"]), eps=rng.choice([1e-12, 1e-6, 1e-3]))
    terms = tuple(sorted(rng.sample(K.TERMS, rng.randint(1, len(K.TERMS)))))
    return [t.to(dtype) for t in (yk, yu, y, h)], opts, terms


def _check_kgs(backend, device, ins, opts, terms):
    before = [t.clone() for t in ins]
    go = K._random_grad_out(ins[0].shape[1], opts["reduction"], "cpu")
    dev_ins = [t.to(device) for t in ins]
    got, ggot = _run_kgs(backend, *dev_ins, {k: v.to(device) for k, v in go.items()}, terms, **opts)
    assert all(_unchanged(b.to(device), a) for b, a in zip(before, dev_ins)), "an input was modified"
    ref, gref = _run_kgs("torch", *ins, go, terms, **opts)
    if any(t.dtype == torch.float64 for t in ins):
        K._check_outputs(got, ggot, ref, gref, None, None, ("yk", "yu", "y", "h"), 1e-10)
        return
    # the accuracy rule against float64 on the same (rounded) inputs, as in test_kgs_loss; make_inputs'
    # separated errors keep the routing identical across precisions
    exact, gexact = _run_kgs("torch", *(t.double() for t in ins), go, terms, **opts)
    assert torch.equal(got.teacher.cpu(), ref.teacher) and torch.equal(ref.teacher, exact.teacher), "teachers differ"
    kl_bound = _kl_error_bound(ins, opts)
    for k in K.TERMS + ("alpha",):
        a, b, e = getattr(got, k), getattr(ref, k), getattr(exact, k)
        assert a.dtype == b.dtype and a.shape == b.shape, k
        if k in ("inter", "loss"):
            bound = kl_bound * (opts["weights"][1] if k == "loss" else 1.0)
            g, r, ex = (t.detach().double().cpu() for t in (a, b, e))
            err_fused, err_torch = (g - ex).abs(), (r - ex).abs()
            allowed = 2 * err_torch.max() + 1e-5 * ex.abs().max() + bound + torch.finfo(a.dtype).eps * ex.abs()
            assert bool((err_fused <= allowed).all()), (k, float(err_fused.max()), float(err_torch.max()),
                                                        float(bound.max()))
        else:
            K._accurate(a, b, e, k)
    for name, a, b, e in zip(("yk", "yu", "y", "h"), ggot, gref, gexact):
        assert (a is None) == (b is None), name
        if b is not None:
            K._accurate(a, b, e, "grad " + name)


def _kl_error_bound(ins, opts) -> torch.Tensor:
    """The float32 error the KL term can carry whatever the implementation: each log-softmax is off by
    ~ε·(max|h/s| + ln D) (the log-sum-exp), so KL_{m,i} by twice that, and inter_i by
    ½T_i²·Σ_{m≠t} of it — an absolute error that does not shrink with the KL itself (two nearly equal
    distributions: the relative error of ``inter`` is unbounded). Four times that, per sample, reduced
    as the loss is."""
    yk, yu, y, h = (t.double() for t in ins)
    M, B, D = h.shape
    r = mim_fast.reference.kgs_routing(yk, yu, y, per_sample=opts["per_sample"], kd_scale=opts["kd_scale"],
                                       kd_divide_T=opts["kd_divide_T"], eps=opts["eps"])
    scale = h.abs().amax(dim=(0, 2)) / r.kd_s + math.log(D) + 1.0
    per_sample = torch.where(r.teacher >= 0, 4 * 2 * EPS32 * 0.5 * r.kd_T ** 2 * (M - 1) * scale,
                             torch.zeros(B, dtype=torch.float64))
    return {"none": per_sample, "sum": per_sample.sum(), "mean": per_sample.mean()}[opts["reduction"]]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_fuzz_kgs_loss(backend):
    _backend_or_skip("kgs_loss", backend, "cpu")
    for i, rng in _cases("kgs-" + backend, CASES):
        case = _kgs_case(rng, allow_fp64=True)
        try:
            _check_kgs(backend, "cpu", *case)
        except Exception as exc:
            raise AssertionError(_replay("test_fuzz_kgs_loss[%s]" % backend, i)) from exc


@pytest.mark.triton
def test_fuzz_kgs_loss_triton():
    dev = K.DEVICE["triton"]
    _backend_or_skip("kgs_loss", "triton", dev)
    for i, rng in _cases("kgs-triton", TRITON_CASES):
        case = _kgs_case(rng, allow_fp64=False)
        try:
            _check_kgs("triton", dev, *case)
        except Exception as exc:
            raise AssertionError(_replay("test_fuzz_kgs_loss_triton", i)) from exc


def test_fuzz_replay_message_names_the_case():
    """A failure must be replayable: the message carries the base seed and the case number."""
    msg = _replay("test_x", 17)
    assert "MIM_FAST_TEST_SEED=%d" % conftest.BASE_SEED in msg and "MIM_FAST_FUZZ_CASE=17" in msg
    first = [(i, rng.random()) for i, rng in _cases("x", 3)]
    assert first == [(i, rng.random()) for i, rng in _cases("x", 3)]  # the same seed gives the same case
