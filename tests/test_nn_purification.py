"""mim_fast.nn.PurificationGate and MaskLearner: the modules against the op they wrap, against a
transcription of the published MaskLearner (github zengy268/MIM, modules/model.py) in float64, loading a
state_dict built with the published attribute names, layouts, and argument checking."""
import itertools
import math

import pytest
import torch
from torch import nn

import mim_fast
from mim_fast.nn import MaskLearner, MaskLearnerOutput, PurificationGate

DS, BS, TS = (2, 7, 80), (1, 3), (5, 50)
SHAPES = list(itertools.product(DS, BS, TS))
SHAPE_IDS = ["d%d-B%d-T%d" % s for s in SHAPES]
CUSTOM_HP = dict(beta=0.5, gamma=-0.1, zeta=1.1, loc_bias=1.5, threshold=0.4, activation="relu",
                 penalty="threshold")


def make_noise(B, T, dtype=torch.float64):
    # Away from the op's clamp to [1e-6, 1 - 1e-6], so both sides of a comparison see the same u.
    return torch.rand(B, T, dtype=dtype).clamp(1e-3, 1 - 1e-3)


# ----------------------------------------------------------------------------------------------------------
# The published mask learner, transcribed: parameters under the published names, forward with the
# hard-concrete noise u given instead of drawn (u ~ U(1e-6, 1 - 1e-6) in the published code).
# ----------------------------------------------------------------------------------------------------------
class PublishedMaskLearner(nn.Module):
    """Published parameter tree (nn.Module attributes lstm, pooler2, pooler3, imp_ratio; the published
    pooler, tanh and HardConcrete have no parameters). ``pooler3_in`` is d in the published code; it only
    runs where that equals the BiLSTM's output width 2·(d//2), i.e. for even d."""

    def __init__(self, d, seq_len, ratio=5, pooler3_in=None):
        super().__init__()
        self.lstm = nn.LSTM(input_size=d, hidden_size=d // 2, num_layers=1, bidirectional=True)
        self.pooler2 = nn.Linear(d, 1)
        self.pooler3 = nn.Sequential(nn.Linear(d if pooler3_in is None else pooler3_in, d // 2), nn.ReLU(),
                                     nn.Linear(d // 2, 1), nn.ReLU())
        self.imp_ratio = nn.Sequential(nn.Linear(seq_len, seq_len // ratio), nn.ReLU(),
                                       nn.Linear(seq_len // ratio, seq_len))

    def forward(self, x, u, beta=1 / 3, gamma=-0.2, zeta=1.0, loc_bias=3.0):
        feats, _ = self.lstm(x)  # (T, B, 2·(d//2))
        scores = self.pooler3(feats.transpose(0, 1)).squeeze(2)  # (B, T)
        g = self.imp_ratio(scores)  # (B, T)
        a = g + loc_bias
        s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + a) / beta)
        penalty = torch.sigmoid(a - beta * math.log(-gamma / zeta)).mean()
        c = (s * (zeta - gamma) + gamma).clamp(0, 1)
        hard = (c > 0.6).to(c.dtype)
        z = c + (hard - c).detach()
        gated = x * z.transpose(0, 1).unsqueeze(2)  # (T, B, d)
        pooled = nn.AdaptiveAvgPool1d(1)(torch.tanh(gated.permute(1, 2, 0))).squeeze(2)  # (B, d)
        return pooled, penalty, hard, g


def published_tree(d, T, dtype=torch.float64):
    """A runnable published tree with random weights that keep the ReLUs alive and the gates mixed."""
    ref = PublishedMaskLearner(d, T, pooler3_in=2 * (d // 2)).to(dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(0.5 * torch.randn_like(p))
        ref.pooler3[2].bias.add_(1.0)  # the final ReLU of pooler3 mostly open
        ref.imp_ratio[0].bias.add_(1.0)  # the bottleneck ReLU mostly open
        ref.imp_ratio[2].bias.sub_(3.0)  # a = g + 3 around 0: a mix of open and closed gates
    return ref


# ----------------------------------------------------------------------------------------------------------
# PurificationGate
# ----------------------------------------------------------------------------------------------------------
def gate_inputs(T, B, D, dtype=torch.float64, batch_first=False):
    x = torch.randn(B, T, D, dtype=dtype) if batch_first else torch.randn(T, B, D, dtype=dtype)
    logits = 2.0 * torch.randn(B, T, dtype=dtype) - 3.0
    return x, logits


def run_with_grads(fn, x, logits):
    xg, lg = x.clone().requires_grad_(), logits.clone().requires_grad_()
    out = fn(xg, lg)
    (out.pooled.sum() + out.penalty).backward()
    return out, xg.grad, lg.grad


def assert_same(a, b, grads_a=(), grads_b=()):
    for u, v in zip(a, b):
        assert torch.equal(u.detach(), v.detach())
    for u, v in zip(grads_a, grads_b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("hp", [{}, CUSTOM_HP], ids=["default", "custom"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["sf", "bf"])
@pytest.mark.parametrize("shape", [(5, 1, 2), (50, 3, 7), (5, 3, 80)], ids=lambda s: "T%d-B%d-D%d" % s)
def test_gate_train_mode_is_the_sampled_op(shape, batch_first, hp):
    T, B, D = shape
    x, logits = gate_inputs(T, B, D, batch_first=batch_first)
    gate = PurificationGate(batch_first=batch_first, **hp)
    assert gate.training and gate.mode == "sample"
    opts = dict(mode="sample", batch_first=batch_first, **hp)
    seed, offset = int(torch.randint(0, 2**62, ())), int(torch.randint(0, 2**40, ()))
    noise = make_noise(B, T)
    lens = torch.randint(0, T + 1, (B,))
    for kw in (dict(seed=seed, offset=offset), dict(noise=noise), dict(seed=seed, lengths=lens)):
        got = run_with_grads(lambda x_, g_: gate(x_, g_, **kw), x, logits)
        want = run_with_grads(lambda x_, g_: mim_fast.purify_gate(x_, g_, **kw, **opts), x, logits)
        assert_same(got[0], want[0], got[1:], want[1:])
        assert torch.isfinite(got[1]).all() and torch.isfinite(got[2]).all()
        # Gradients reach x through the open gates (tanh'(y) > 0) and the logits through the penalty.
        if "lengths" not in kw:
            assert bool((got[2] != 0).all())
            if not hp:
                open_steps = got[0].gate.t() if not batch_first else got[0].gate  # layout of x's first dims
                assert torch.equal((got[1] != 0).any(-1), open_steps.bool())
    # With neither noise nor seed the op takes its seed from torch's default generator.
    torch.manual_seed(1234)
    got = gate(x, logits)
    torch.manual_seed(1234)
    assert_same(got, mim_fast.purify_gate(x, logits, **opts))


@pytest.mark.parametrize("hp", [{}, CUSTOM_HP], ids=["default", "custom"])
def test_gate_eval_mode(hp):
    T, B, D = 50, 3, 7
    x, logits = gate_inputs(T, B, D)
    seed = int(torch.randint(0, 2**62, ()))
    gate = PurificationGate(**hp).eval()
    assert gate.mode == "expected"
    expected = run_with_grads(lambda x_, g_: mim_fast.purify_gate(x_, g_, mode="expected", **hp), x, logits)
    for kw in ({}, dict(seed=seed), dict(noise=make_noise(B, T))):  # noise and seed are ignored
        got = run_with_grads(lambda x_, g_: gate(x_, g_, **kw), x, logits)
        assert_same(got[0], expected[0], got[1:], expected[1:])

    sampling = PurificationGate(eval_mode="sample", **hp).eval()
    assert sampling.mode == "sample"
    got = run_with_grads(lambda x_, g_: sampling(x_, g_, seed=seed, offset=7), x, logits)
    want = run_with_grads(lambda x_, g_: mim_fast.purify_gate(x_, g_, seed=seed, offset=7, mode="sample", **hp),
                          x, logits)
    assert_same(got[0], want[0], got[1:], want[1:])
    sampling.train()
    assert sampling.mode == "sample"


def test_gate_has_no_parameters_and_shows_its_hyperparameters():
    gate = PurificationGate(**CUSTOM_HP, batch_first=True, backend="torch", eval_mode="sample")
    assert list(gate.parameters()) == [] and list(gate.buffers()) == [] and gate.state_dict() == {}
    text = repr(gate)
    for piece in ("beta=0.5", "gamma=-0.1", "zeta=1.1", "loc_bias=1.5", "threshold=0.4", "activation='relu'",
                  "penalty='threshold'", "batch_first=True", "backend='torch'", "eval_mode='sample'"):
        assert piece in text, (piece, text)
    assert "beta=0.333333" in repr(PurificationGate())


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(beta=0.0), ValueError, "beta"),
    (dict(beta="1"), TypeError, "beta"),
    (dict(gamma=0.1), ValueError, "gamma"),
    (dict(zeta=-1.0), ValueError, "zeta"),
    (dict(loc_bias=float("nan")), ValueError, "loc_bias"),
    (dict(threshold=1.0), ValueError, "threshold"),
    (dict(threshold=0.5, zeta=0.4), ValueError, "threshold"),
    (dict(activation="sigmoid"), ValueError, "activation"),
    (dict(penalty="l0"), ValueError, "penalty"),
    (dict(batch_first=1), TypeError, "batch_first"),
    (dict(backend="gpu"), ValueError, "backend"),
    (dict(eval_mode="train"), ValueError, "eval_mode"),
])
def test_gate_rejects_bad_hyperparameters(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PurificationGate(**kwargs)


def test_gate_hyperparameters_are_keyword_only():
    # The published HardConcrete's positional order (beta, gamma, zeta, fix_temp, loc_bias) differs.
    with pytest.raises(TypeError):
        PurificationGate(1 / 3, -0.2)


def test_gate_forward_argument_errors_come_from_the_op():
    gate = PurificationGate()
    x, logits = gate_inputs(5, 3, 4)
    with pytest.raises(ValueError, match="logits"):
        gate(x, logits[:, :4])
    with pytest.raises(ValueError, match="noise"):
        gate(x, logits, noise=make_noise(3, 4))
    with pytest.raises(ValueError, match="lengths"):
        gate(x, logits, torch.tensor([1, 2, 6]))
    with pytest.raises(ValueError, match="either noise or seed"):
        gate(x, logits, noise=make_noise(3, 5), seed=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_gate_unavailable_backend_raises_at_call():
    gate = PurificationGate(backend="cuda")
    x, logits = gate_inputs(5, 2, 3)
    with pytest.raises(mim_fast.BackendUnavailableError):
        gate(x, logits, seed=0)


def test_gate_does_not_mutate_inputs():
    x, logits = gate_inputs(6, 3, 5)
    noise, lens = make_noise(3, 6), torch.tensor([6, 0, 3])
    saved = [t.clone() for t in (x, logits, noise, lens)]
    xg, lg = x.requires_grad_(), logits.requires_grad_()
    out = PurificationGate()(xg, lg, lens, noise=noise)
    (out.pooled.sum() + out.penalty).backward()
    for before, after in zip(saved, (x, logits, noise, lens)):
        assert torch.equal(before, after.detach())


# ----------------------------------------------------------------------------------------------------------
# MaskLearner
# ----------------------------------------------------------------------------------------------------------
def learner_from(ref, d, T, **kwargs):
    m = MaskLearner(d, T, **kwargs).to(torch.float64)
    m.load_state_dict(ref.state_dict(), strict=True)
    return m


@pytest.mark.parametrize("d,B,T", SHAPES, ids=SHAPE_IDS)
def test_mask_learner_matches_published_computation(d, B, T):
    """Forward and every parameter's gradient of pooled.sum() + penalty, float64, same noise u."""
    ref = published_tree(d, T)
    mine = learner_from(ref, d, T)
    x = torch.randn(T, B, d, dtype=torch.float64)
    u = make_noise(B, T)

    xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    pooled_r, penalty_r, hard_r, g_r = ref(xr, u)
    out = mine(xm, noise=u)
    assert isinstance(out, MaskLearnerOutput)
    assert out.pooled.shape == (B, d) and out.penalty.shape == () and out.gate.shape == (B, T)
    torch.testing.assert_close(out.logits, g_r, rtol=1e-12, atol=1e-12)
    assert torch.equal(out.gate, hard_r)
    torch.testing.assert_close(out.pooled, pooled_r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.penalty, penalty_r, rtol=1e-10, atol=1e-12)

    (pooled_r.sum() + penalty_r).backward()
    (out.pooled.sum() + out.penalty).backward()
    torch.testing.assert_close(xm.grad, xr.grad, rtol=1e-10, atol=1e-12)
    ref_params = dict(ref.named_parameters())
    mine_params = dict(mine.named_parameters())
    assert mine_params.keys() == ref_params.keys()
    for name, p in mine_params.items():
        q = ref_params[name]
        if name.startswith("pooler2."):  # unused in the forward, in both
            assert p.grad is None and q.grad is None
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)
    # Not vacuous: the logits (hence the whole mask learner) receive gradient.
    assert sum(float(p.grad.abs().sum()) for n, p in mine_params.items() if n.startswith("imp_ratio.")) > 0


@pytest.mark.parametrize("d", [2, 80])
@pytest.mark.parametrize("T", TS)
def test_published_state_dict_loads_strictly(d, T):
    ref = PublishedMaskLearner(d, T)  # exactly the published shapes (pooler3 takes d inputs)
    sd = ref.state_dict()
    mine = MaskLearner(d, T)
    assert set(mine.state_dict().keys()) == set(sd.keys())
    result = mine.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in mine.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # And back: our state_dict loads into the published tree.
    PublishedMaskLearner(d, T).load_state_dict(MaskLearner(d, T).state_dict(), strict=True)


def test_odd_width_published_tree_cannot_load():
    """For odd d the published pooler3 declares d inputs while the BiLSTM yields d − 1 (the published
    forward fails there); MaskLearner sizes pooler3 by the BiLSTM, so such a tree is a size mismatch."""
    with pytest.raises(RuntimeError, match="pooler3"):
        MaskLearner(7, 50).load_state_dict(PublishedMaskLearner(7, 50).state_dict(), strict=True)


@pytest.mark.parametrize("batch_first", [False, True])
def test_same_seed_gives_the_published_initialisation(batch_first):
    torch.manual_seed(99)
    ref = PublishedMaskLearner(80, 50)
    torch.manual_seed(99)
    mine = MaskLearner(80, 50, batch_first=batch_first)
    for k, v in ref.state_dict().items():
        assert torch.equal(mine.state_dict()[k], v), k


@pytest.mark.parametrize("d,B,T", [(7, 3, 50), (2, 1, 5), (80, 3, 5)], ids=lambda v: str(v))
def test_mask_learner_batch_first(d, B, T):
    ref = published_tree(d, T)
    sf, bf = learner_from(ref, d, T), learner_from(ref, d, T, batch_first=True)
    assert bf.lstm.batch_first and bf.mask.batch_first
    x = torch.randn(T, B, d, dtype=torch.float64)
    u = make_noise(B, T)
    lens = torch.randint(0, T + 1, (B,))
    xs, xb = x.clone().requires_grad_(), x.transpose(0, 1).contiguous().requires_grad_()
    a = sf(xs, lens, noise=u)
    b = bf(xb, lens, noise=u)
    for name, u_, v_ in zip(a._fields, a, b):
        torch.testing.assert_close(v_, u_, rtol=1e-12, atol=1e-12, msg=name)
    (a.pooled.sum() + a.penalty).backward()
    (b.pooled.sum() + b.penalty).backward()
    torch.testing.assert_close(xb.grad, xs.grad.transpose(0, 1), rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(sf.named_parameters(), bf.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-12, msg=name)
    # A strided (B, T, d) view works too.
    c = bf(x.transpose(0, 1), lens, noise=u)
    torch.testing.assert_close(c.pooled, a.pooled, rtol=1e-12, atol=1e-12)


def test_mask_learner_modes_lengths_and_options():
    d, B, T = 7, 3, 50
    ref = published_tree(d, T)
    m = learner_from(ref, d, T, **CUSTOM_HP)
    x = torch.randn(T, B, d, dtype=torch.float64)
    lens = torch.tensor([50, 0, 17])
    seed = int(torch.randint(0, 2**62, ()))
    g = m.gate_logits(x)
    assert torch.equal(m(x).logits, g)
    # Training: the sampled op on the learner's logits, with every option passed through.
    out = m(x, lens, seed=seed, offset=3)
    want = mim_fast.purify_gate(x, g, lengths=lens, seed=seed, offset=3, mode="sample", **CUSTOM_HP)
    assert_same(out[:3], want)
    # Eval: expected by default (deterministic), sampled with eval_mode="sample".
    m.eval()
    want = mim_fast.purify_gate(x, g, lengths=lens, mode="expected", **CUSTOM_HP)
    assert_same(m(x, lens)[:3], want)
    assert_same(m(x, lens, seed=seed)[:3], want)
    ms = learner_from(ref, d, T, eval_mode="sample").eval()
    want = mim_fast.purify_gate(x, g, seed=seed, mode="sample")
    assert_same(ms(x, seed=seed)[:3], want)
    assert ms.mask.eval_mode == "sample" and not ms.mask.training


def test_mask_learner_float32_and_default_seed():
    m = MaskLearner(80, 50)
    x = torch.randn(50, 3, 80)
    torch.manual_seed(5)
    a = m(x)
    torch.manual_seed(5)
    b = m(x)
    assert a.pooled.dtype == torch.float32 and a.penalty.dtype == torch.float32
    assert_same(a, b)
    (a.pooled.sum() + a.penalty).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for n, p in m.named_parameters() if not n.startswith("pooler2."))


def test_mask_learner_does_not_mutate_inputs():
    d, B, T = 7, 3, 5
    m = learner_from(published_tree(d, T), d, T)
    x, u, lens = torch.randn(T, B, d, dtype=torch.float64), make_noise(B, T), torch.tensor([5, 2, 0])
    saved = [t.clone() for t in (x, u, lens)]
    out = m(x.requires_grad_(), lens, noise=u)
    (out.pooled.sum() + out.penalty).backward()
    for before, after in zip(saved, (x, u, lens)):
        assert torch.equal(before, after.detach())


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((1,), {}, ValueError, "d_model"),
    ((0,), {}, ValueError, "d_model"),
    ((80.0,), {}, TypeError, "d_model"),
    ((True,), {}, TypeError, "d_model"),
    ((80, 4), {}, ValueError, "seq_len"),
    ((80, 0), {}, ValueError, "seq_len"),
    ((80, 50, 0), {}, ValueError, "ratio"),
    ((80, 50, 2.5), {}, TypeError, "ratio"),
    ((80,), dict(activation="gelu"), ValueError, "activation"),
    ((80,), dict(eval_mode="none"), ValueError, "eval_mode"),
    ((80,), dict(threshold=-0.5), ValueError, "threshold"),
    ((80,), dict(batch_first="yes"), TypeError, "batch_first"),
])
def test_mask_learner_rejects_bad_constructor_arguments(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MaskLearner(*args, **kwargs)


def test_mask_learner_rejects_bad_inputs():
    m = MaskLearner(8, 10)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        m([[0.0]])
    with pytest.raises(ValueError, match=r"x must be 3-D \(T, B, d_model\)"):
        m(torch.randn(10, 8))
    with pytest.raises(ValueError, match=r"\(T, B, d_model\) = \(10, B, 8\).*seq_len"):
        m(torch.randn(9, 2, 8))
    with pytest.raises(ValueError, match=r"\(10, B, 8\)"):
        m(torch.randn(10, 2, 7))
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, d_model\) = \(B, 10, 8\)"):
        MaskLearner(8, 10, batch_first=True)(torch.randn(10, 2, 8))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.zeros(10, 2, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="dtype torch.float64.*float32"):
        m(torch.randn(10, 2, 8, dtype=torch.float64))
    x = torch.randn(10, 2, 8)
    with pytest.raises(ValueError, match="noise"):
        m(x, noise=make_noise(2, 9, torch.float32))
    with pytest.raises(ValueError, match="noise"):
        m(x, noise=torch.zeros(2, 10))
    with pytest.raises(ValueError, match="lengths"):
        m(x, torch.tensor([3, 11]))
    with pytest.raises(TypeError, match="lengths"):
        m(x, torch.tensor([3.0, 1.0]))


# ----------------------------------------------------------------------------------------------------------
# Pooling over the open steps (the demo's pool_norm="open"), composed on the op's outputs
# ----------------------------------------------------------------------------------------------------------
def open_mean_transcribed(x, logits, u, lengths, mode, activation, beta=1 / 3, gamma=-0.2, zeta=1.0, loc_bias=3.0,
                          threshold=0.6):
    """Σ_t φ(x_t·z_t) / max(Σ_t z_t, 1) written out from SPEC §1's gate (z = h + c − sg(c)), in float64."""
    T, B, _ = x.shape
    a = logits + loc_bias
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + a) / beta) if mode == "sample" else torch.sigmoid(a)
    s_bar = (zeta - gamma) * s + gamma
    c = torch.where((s_bar >= 0) & (s_bar <= 1), s_bar, s_bar.detach().clamp(0, 1))  # gradient on [0, 1], closed
    h = (c > threshold).to(c.dtype)
    z = h + (c - c.detach())
    if lengths is not None:
        valid = torch.arange(T)[None, :] < lengths[:, None]
        z = torch.where(valid, z, torch.zeros_like(z))
    phi = {"tanh": torch.tanh, "relu": torch.relu, "identity": lambda v: v}[activation]
    total = phi(x * z.t()[..., None]).sum(0)  # (B, D)
    n = z.sum(1)
    return total / torch.where(n >= 1, n, n.detach().clamp(min=1))[:, None], h  # n's gradient at n = 1 too


@pytest.mark.parametrize("mode", ["sample", "expected"])
@pytest.mark.parametrize("activation", ["tanh", "identity"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["all-T", "lengths"])
def test_pool_over_open_steps_is_the_mean_over_open_steps_with_its_straight_through_gradient(mode, activation,
                                                                                           with_lengths):
    T, B, D = 9, 4, 5
    gate = PurificationGate(activation=activation, eval_mode=mode)
    gate.train(mode == "sample")
    x = torch.randn(T, B, D, dtype=torch.float64)
    logits = 2.0 * torch.randn(B, T, dtype=torch.float64) - 2.0
    logits[0] = -20.0  # every gate of sample 0 closed: pools to 0, no NaN
    u = make_noise(B, T)
    lens = torch.tensor([9, 0, 4, 7]) if with_lengths else None
    xg, lg = x.clone().requires_grad_(), logits.clone().requires_grad_()
    out = gate(xg, lg, lens, noise=u)
    got = gate.pool_over_open_steps(out.pooled, out.gate, lg, u, lens)
    w = torch.randn(B, D, dtype=torch.float64)
    (got * w).sum().backward()
    xw, lw = x.clone().requires_grad_(), logits.clone().requires_grad_()
    want, h = open_mean_transcribed(xw, lw, u, lens, mode, activation)
    (want * w).sum().backward()
    assert torch.equal(out.gate, h if lens is None else h * (torch.arange(T)[None, :] < lens[:, None]))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xg.grad, xw.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lg.grad, lw.grad, rtol=1e-10, atol=1e-12)
    assert torch.equal(got[0], torch.zeros(D, dtype=torch.float64))
    # the forward value is the plain mean of φ(x_t) over the open steps
    phi = torch.tanh if activation == "tanh" else (lambda v: v)
    n = out.gate.sum(1)
    for b in range(1, B):
        if n[b] > 0:
            open_ = out.gate[b].bool()
            want_b = phi(x[open_.nonzero()[:, 0], b]).mean(0)
            torch.testing.assert_close(got[b].detach(), want_b, rtol=1e-12, atol=1e-12)
    # Steps that all carry the same features: over the open steps the result does not depend on the gates,
    # so no gate gets a gradient; over T, closing any step shrinks the result, so every gate is pushed.
    if activation == "identity" and not with_lengths:
        same = torch.randn(1, B, D, dtype=torch.float64).expand(T, B, D)
        lg = logits.clone().requires_grad_()
        out = gate(same, lg, noise=u)
        (gate.pool_over_open_steps(out.pooled, out.gate, lg, u) * w).sum().backward()
        assert lg.grad[1:].abs().max() < 1e-15  # (rounding only; sample 0: all closed, n clamped)
        lg.grad = None
        (gate(same, lg, noise=u).pooled * w).sum().backward()
        assert lg.grad.abs().max() > 1e-3


def test_mim_model_pool_norm_and_no_upn():
    from mim_fast.nn import MIM, ModalitySpec

    specs = [ModalitySpec("text", "features", 6, 10), ModalitySpec("audio", "features", 5, 10)]
    inputs = {"text": torch.randn(3, 10, 6), "audio": torch.randn(3, 10, 5)}
    torch.manual_seed(0)
    t_model = MIM(specs, d_model=6, heads=2)
    torch.manual_seed(0)
    o_model = MIM(specs, d_model=6, heads=2, pool_norm="open")
    for mode in ("train", "eval"):
        getattr(t_model, mode)()
        getattr(o_model, mode)()
        torch.manual_seed(1)
        a = t_model(inputs, seed=7)
        torch.manual_seed(1)
        b = o_model(inputs, seed=7)  # the same seeded noise: the same gates, the pooled rescaled by T/n
        for ga, gb in zip(a.gates, b.gates):
            assert torch.equal(ga, gb)
        n = torch.stack(a.gates).sum(-1).clamp(min=1)  # (M, B)
        torch.testing.assert_close(b.purified, a.purified * (10 / n)[..., None], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.unpurified, a.unpurified)
    none = MIM(specs, d_model=6, heads=2, upn=False)
    assert not none.upn_parameters() and len(none.masks) == 0
    out = none(inputs, {"audio": torch.tensor([10, 3, 0])})
    assert torch.equal(out.purified, out.unpurified) and torch.equal(out.yk, out.yu)
    assert torch.equal(out.penalty, torch.zeros(2))
    assert torch.equal(out.gates[0], torch.ones(3, 10)) and out.gates[1].sum(1).tolist() == [10, 3, 0]
    with pytest.raises(ValueError, match="pool_norm"):
        MIM(specs, d_model=6, heads=2, pool_norm="mean")


def test_mask_learner_linear_score_and_skip_connection():
    """score_relu=False drops the ReLU that ends pooler3, residual=True adds the scores to imp_ratio's
    output; neither changes a parameter, so the published tree still loads."""
    d, B, T = 6, 3, 10
    ref = PublishedMaskLearner(d, T)
    x = torch.randn(T, B, d)
    for score_relu, residual in itertools.product((True, False), repeat=2):
        m = MaskLearner(d, T, score_relu=score_relu, residual=residual)
        m.load_state_dict(ref.state_dict(), strict=True)
        h, _ = ref.lstm(x)
        pre = ref.pooler3[:3](h.transpose(0, 1))[..., 0]  # (B, T): the score before its final ReLU
        scores = torch.relu(pre) if score_relu else pre
        want = ref.imp_ratio(scores) + (scores if residual else 0)
        torch.testing.assert_close(m.gate_logits(x), want, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        ref.pooler3[2].bias.fill_(-100.0)  # a dead score unit: with the ReLU the logits ignore the input
        # every hidden unit live (|W·h| ≤ 6·0.41 < 3 for LSTM outputs in (−1, 1)): without the final ReLU the
        # score then still depends on the input (with all three hidden ReLUs dead for some inits, it did not)
        ref.pooler3[0].bias.fill_(3.0)
    dead = MaskLearner(d, T)
    dead.load_state_dict(ref.state_dict())
    logits = dead.gate_logits(x)
    assert torch.equal(logits, logits[:1].expand_as(logits))
    linear = MaskLearner(d, T, score_relu=False, residual=True)
    linear.load_state_dict(ref.state_dict())
    logits = linear.gate_logits(x)
    assert not torch.equal(logits, logits[:1].expand_as(logits))
    with pytest.raises(TypeError, match="residual must be a bool"):
        MaskLearner(d, T, residual=1)


def test_pool_over_open_steps_with_exactly_one_open_step_passes_the_count_gradient():
    """n = 1 (one open step) is a value, not the floor of an empty sample: its straight-through gradient
    passes (torch 2.14's clamp(min=1) passes none at its bound, and the gradient over the open steps of
    identical features, which must cancel to 0, did not)."""
    T, B, D = 6, 2, 3
    gate = PurificationGate(activation="identity", eval_mode="expected").eval()
    logits = torch.full((B, T), -20.0, dtype=torch.float64)
    logits[:, 2] = 10.0  # one open step per sample
    logits[1, 4] = 10.0  # and a second in sample 1
    same = torch.randn(1, B, D, dtype=torch.float64).expand(T, B, D)
    lg = logits.clone().requires_grad_()
    out = gate(same, lg)
    assert out.gate.sum(1).tolist() == [1.0, 2.0]
    (gate.pool_over_open_steps(out.pooled, out.gate, lg) * torch.randn(B, D, dtype=torch.float64)).sum().backward()
    assert lg.grad.abs().max() < 1e-15
