"""Counter-based dropout (mim_fast.dropout, mim_fast.nn.Dropout) and the Transformer encoder that uses it:
the mask is the documented function of (seed, stream, global sample index, element), bit-identical on
every backend, independent of the batch a sample is in, keeps 1 − p of the elements (statistical tests
that fail for a wrong rate or correlated streams), saves no mask for the backward; the encoder computes
what torch's nn.TransformerEncoder computes."""
import random

import pytest
import torch

import mim_fast
from mim_fast import reference
from mim_fast.nn import Dropout, SequenceEncoder, TransformerEncoder, TransformerEncoderLayer, assign_streams
from mim_fast.ops import _backends

from _isa import saved_under_isa
from _modes import SeenFunctions

HAS_EXT = mim_fast.build_info() is not None
HAS_TRITON = _backends.triton_import_error() is None and (_backends.triton_interpreting() or torch.cuda.is_available())


def expected_mask(shape, p, seed, stream, index, batch_dim):
    """The documented mask, written out: u = word (j mod 4) of Philox4x32-10 with key dropout_key(seed,
    stream) at counter index[b]·⌈S/4⌉ + ⌊j/4⌋, made uniform as tl.rand makes its word."""
    moved = list(shape)
    B = moved.pop(batch_dim)
    S = 1
    for s in moved:
        S *= s
    j = torch.arange(S)
    n = index.to(torch.int64)[:, None] * ((S + 3) // 4) + j // 4
    key = mim_fast.dropout_key(seed, stream)
    m32 = 2**32 - 1
    words = torch.stack(reference.philox4x32_10(n & m32, n >> 32, n * 0, n * 0, key & m32, key >> 32))
    w = words.gather(0, (j % 4).expand(1, B, S)).squeeze(0)
    u = torch.where(w >= 2**31, m32 - w, w).to(torch.float32) * float.fromhex("0x1.fffffep-32")
    return (u >= p).reshape([B] + moved).movedim(0, batch_dim)


@pytest.mark.parametrize("batch_dim", [0, 1, -1])
def test_mask_is_the_documented_function_of_the_key(batch_dim):
    shape = (5, 7, 3)
    B = shape[batch_dim]
    x = torch.randn(shape)
    seed, stream, p = random.randrange(2**62), random.randrange(100), 0.3
    index = torch.randperm(1000)[:B]
    y = mim_fast.dropout(x, p, seed=seed, index=index, batch_dim=batch_dim, stream=stream, backend="torch")
    keep = expected_mask(shape, p, seed, stream, index, batch_dim % 3)
    assert torch.equal(y, x * keep.to(x.dtype) * (1 / (1 - p)))
    assert 0 < int(keep.sum()) < keep.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_bit_identical_on_every_backend(dtype):
    x = torch.randn(6, 4, 33).to(dtype)
    index = torch.randperm(500)[:4]
    seed = random.randrange(2**63)
    ref = mim_fast.dropout(x, 0.4, seed=seed, index=index, batch_dim=1, backend="torch")
    backends = ["cpu"] * HAS_EXT + ["triton"] * HAS_TRITON
    assert backends or pytest.skip("neither mim_fast._C nor Triton can run here")
    for backend in backends:
        out = mim_fast.dropout(x, 0.4, seed=seed, index=index, batch_dim=1, backend=backend)
        assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8)), backend


@pytest.mark.skipif(not HAS_EXT, reason="no _C")
@pytest.mark.parametrize("isa", ["default", "widest"])
def test_cpu_kernel_is_bit_identical_across_isas_and_long_counters(isa):
    """The CPU kernel draws Philox one block at a time (baseline ISA) or 8 blocks side by side (AVX2 and
    AVX-512 builds): both give the reference's bits, including rows of several 256-element chunks, groups
    of 8 blocks that straddle a row's end, and counters whose low 32-bit word wraps inside a group (the
    samples' indices put index·⌈S/4⌉ across 2^32 and 2^33)."""
    code = ("import sys, torch, mim_fast\n"
            "res = []\n"
            "for shape, bd, first in (((3, 5, 1031), 1, 5549051), ((2, 9, 77), 0, 2**40 - 3), ((700, 3), 1, 49085339)):\n"
            "    g = torch.Generator().manual_seed(sum(shape))\n"
            "    x = torch.randn(shape, generator=g)\n"
            "    B = shape[bd]\n"
            "    index = first + torch.arange(B)\n"
            "    for p in (0.3, 0.9):\n"
            "        res.append(mim_fast.dropout(x, p, seed=2**61 + 17, index=index, batch_dim=bd, backend=BACKEND))\n"
            "torch.save(res, sys.argv[1])\n")
    got = saved_under_isa(code.replace("BACKEND", "'cpu'"), isa if isa == "default" else None, "dropout")
    scope = {}
    exec(code.replace("BACKEND", "'torch'").replace("torch.save(res, sys.argv[1])", "want = res"), scope)
    assert len(got) == len(scope["want"]) == 6
    for a, b in zip(got, scope["want"]):
        assert torch.equal(a, b)
        assert 0 < int((a == 0).sum()) < a.numel()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_cuda_masks_are_the_cpu_masks(backend):
    if _backends.backend_status("philox_uniform", "cuda", (torch.float32,))[backend]:
        pytest.skip(_backends.backend_status("philox_uniform", "cuda", (torch.float32,))[backend])
    x = torch.randn(6, 4, 33)
    index = torch.randperm(500)[:4]
    seed = random.randrange(2**63)
    ref = mim_fast.dropout(x, 0.4, seed=seed, index=index, batch_dim=1, backend="torch")
    out = mim_fast.dropout(x.cuda(), 0.4, seed=seed, index=index.cuda(), batch_dim=1, backend=backend)
    assert torch.equal(out.cpu().view(torch.int32), ref.view(torch.int32))


def test_a_sample_is_dropped_the_same_way_in_any_batch():
    """World-size invariance in one line: a sample's mask depends on its global index, not on the batch."""
    seed, p = random.randrange(2**62), 0.5
    rows = torch.randn(10, 6, 8)  # sample i's features: rows[i]
    full = mim_fast.dropout(rows.transpose(0, 1), p, seed=seed, index=torch.arange(10), batch_dim=1)  # (6, 10, 8)
    for part in (torch.tensor([3, 7]), torch.tensor([9, 0, 4, 5]), torch.randperm(10)):
        sub = mim_fast.dropout(rows[part].transpose(0, 1), p, seed=seed, index=part, batch_dim=1)
        assert torch.equal(sub, full[:, part])
    # a different seed, stream or index draws another mask
    other = [mim_fast.dropout(rows, p, seed=seed + 1, index=torch.arange(10)),
             mim_fast.dropout(rows, p, seed=seed, index=torch.arange(10), stream=1),
             mim_fast.dropout(rows, p, seed=seed, index=torch.arange(10, 20))]
    base = mim_fast.dropout(rows, p, seed=seed, index=torch.arange(10))
    for o in other:
        assert not torch.equal(o, base)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_keep_probability_and_independence(p):
    """Over n elements the kept count is Binomial(n, 1 − p): within 5σ (a swapped p and 1 − p, or a
    u > p instead of u ≥ p off by more than noise, fails). Two streams of one seed and two neighbouring
    samples agree as independent masks do, p² + (1 − p)², within 5σ; the mean of the output is the input's
    (the 1/(1 − p) scale)."""
    n_samples, per = 400, 500
    seed = random.randrange(2**62)
    ones = torch.ones(n_samples, per, dtype=torch.float64)
    y0 = mim_fast.dropout(ones, p, seed=seed, index=torch.arange(n_samples), stream=0)
    y1 = mim_fast.dropout(ones, p, seed=seed, index=torch.arange(n_samples), stream=1)
    k0, k1 = y0 != 0, y1 != 0
    n = k0.numel()
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(int(k0.sum()) - n * (1 - p)) < 5 * sigma
    agree = p * p + (1 - p) ** 2
    tol = 5 * (agree * (1 - agree) / n) ** 0.5
    assert abs(float((k0 == k1).double().mean()) - agree) < tol  # streams independent
    assert abs(float((k0[1:] == k0[:-1]).double().mean()) - agree) < tol  # neighbouring samples independent
    assert abs(float(y0.mean()) - 1.0) < 5 * (p / (1 - p) / n) ** 0.5
    # every position within a sample keeps at the same rate: chi-square over 10 groups of 50 positions
    groups = k0.double().reshape(n_samples, 10, per // 10).sum(dim=(0, 2))
    expected = n / 10 * (1 - p)
    chi2 = float((((groups - expected) ** 2) / (n / 10 * p * (1 - p))).sum())
    assert chi2 < 29.6  # the 0.9995 quantile of chi-square with 10 degrees of freedom


def test_backward_regenerates_the_mask_and_saves_no_mask():
    x = torch.randn(8, 3, 16, requires_grad=True)
    index = torch.arange(20, 23)
    seed = random.randrange(2**62)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = mim_fast.dropout(x, 0.25, seed=seed, index=index, batch_dim=1)
    assert all(t.numel() == 3 and t.dtype == torch.int64 for t in saved), [tuple(t.shape) for t in saved]
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    keep = expected_mask(x.shape, 0.25, seed, 0, index, 1)
    assert torch.equal(gx, g * keep.to(g.dtype) * (1 / 0.75))
    xd = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: mim_fast.dropout(v, 0.5, seed=seed), (xd,))


def test_opcheck_and_compile_do_not_recompile_for_a_new_seed():
    x, index = torch.randn(4, 6), torch.arange(4)
    for args in ((x, index, 5, 0, 0.3, 0, "auto"), (x.double().requires_grad_(), index, 7, 2, 0.5, 0, "torch")):
        torch.library.opcheck(torch.ops.mim_fast.dropout.default, args)
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    fn = torch.compile(lambda v, s: mim_fast.dropout(v, 0.3, seed=s, index=index) * 2, backend=counter,
                       fullgraph=True)
    for s in (11, 12, 13, 14):
        assert torch.equal(fn(x, s), mim_fast.dropout(x, 0.3, seed=s, index=index) * 2)
    assert counter.frame_count <= 2  # the first seed, then one dynamic graph for every later one


def test_edges_and_errors():
    x = torch.randn(3, 4)
    assert mim_fast.dropout(x, 0.0, seed=1) is x
    assert mim_fast.dropout(x, 0.7, seed=1, training=False) is x
    assert torch.equal(mim_fast.dropout(x, 1.0, seed=1), torch.zeros_like(x))
    torch.manual_seed(3)
    a = mim_fast.dropout(x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(a, mim_fast.dropout(x, 0.5))  # seed=None: drawn from torch's generator
    for kwargs, exc, match in [
        (dict(p=1.5), ValueError, r"p must be a drop probability in \[0, 1\]"),
        (dict(p=-0.1), ValueError, "p must be a finite number >= 0"),
        (dict(p=0.5, seed=-1), ValueError, "seed must be in"),
        (dict(p=0.5, batch_dim=2), ValueError, "batch_dim must be an int in"),
        (dict(p=0.5, index=torch.arange(4)), ValueError, r"index must have shape \(3,\)"),
        (dict(p=0.5, index=torch.tensor([0.0, 1, 2])), TypeError, "index must be an integer tensor"),
        (dict(p=0.5, index=torch.tensor([0, -1, 2])), ValueError, "index must lie in"),
        (dict(p=0.5, backend="fast"), ValueError, "backend must be"),
    ]:
        with pytest.raises(exc, match=match):
            mim_fast.dropout(x, **kwargs)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        mim_fast.dropout(torch.arange(4), 0.5, seed=1)


def test_module_streams_and_eval():
    enc = SequenceEncoder(5, 10, layers=2, heads=2)
    streams = [m.stream for m in enc.modules() if isinstance(m, Dropout)]
    assert streams == list(range(1 + 2 * 4))  # embedding + 4 per layer, all distinct
    d = Dropout(0.5, batch_dim=1)
    x = torch.randn(3, 4, 5)
    assert torch.equal(d(x, 9, torch.arange(4)), mim_fast.dropout(x, 0.5, seed=9, index=torch.arange(4), batch_dim=1))
    d.stream = 3
    assert torch.equal(d(x, 9), mim_fast.dropout(x, 0.5, seed=9, batch_dim=1, stream=3))
    d.eval()
    assert d(x, 9) is x
    wrapper = torch.nn.Sequential(Dropout(0.1), torch.nn.Linear(2, 2), Dropout(0.2))
    assign_streams(wrapper)
    assert [wrapper[0].stream, wrapper[2].stream] == [0, 1]


def test_transformer_encoder_computes_what_torchs_computes():
    """Same RNG state → the same initial weights and state_dict keys as torch's pre-norm encoder; in eval
    (no dropout) the same outputs, with and without padding."""
    D, H, L = 12, 3, 2
    torch.manual_seed(7)
    ours = TransformerEncoder(TransformerEncoderLayer(D, H, 4 * D, dropout=0.3), L, torch.nn.LayerNorm(D))
    torch.manual_seed(7)
    theirs = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(D, H, 4 * D, dropout=0.3, activation="relu", norm_first=True), L,
        norm=torch.nn.LayerNorm(D), enable_nested_tensor=False)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for m in (ours, theirs):
        with torch.no_grad():
            for prm in m.parameters():
                prm.add_(0.1 * torch.randn_like(prm))  # away from the init's zero biases and unit norms
    theirs.load_state_dict(ours.state_dict())
    ours.eval(), theirs.eval()
    x = torch.randn(9, 4, D)
    pad = torch.arange(9)[None, :] >= torch.tensor([9, 5, 1, 7])[:, None]
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(x, pad), theirs(x, src_key_padding_mask=pad), rtol=1e-5, atol=1e-5)
    ours.train()
    y = ours(x, pad, seed=5, index=torch.arange(4))
    assert not torch.allclose(y, ours.eval()(x, pad))  # training mode drops


def _dropout_calls():
    """Calls of mim_fast.dropout, the common ones (what a training step makes) and odd ones: other dtypes,
    strided and batch_first views, index dtypes, out-of-range indices, p at the edges, bad arguments."""
    x = torch.randn(5, 4, 7)
    idx = torch.randperm(40)[:4]
    big = torch.tensor([0, 1, 2, 2**63 // 9 - 1])  # the largest valid index for S = 35 elements (9 blocks)
    calls = []
    for bd, t, i in ((1, x, idx), (0, x.transpose(0, 1), idx), (-2, x, idx), (1, x[:, :, ::2], idx),
                     (2, x.transpose(1, 2), idx), (1, x, big), (1, x, big + torch.tensor([0, 0, 0, 1])),
                     (1, x, idx - 5), (1, x, idx.int()), (1, x, idx.double()), (1, x, idx[:3]),
                     (1, x, idx[None]), (5, x, idx), (1.0, x, idx), (True, x, idx)):
        calls.append(dict(x=t, p=0.3, seed=random.randrange(2**63), index=i, batch_dim=bd, stream=3))
    for p in (0.0, 1.0, 1, 0.5, -0.1, 1.5, float("nan"), "0.3", 0.999999):
        calls.append(dict(x=x, p=p, seed=7, index=idx, batch_dim=1))
    for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.int64):
        calls.append(dict(x=x.to(dtype), p=0.3, seed=7, index=idx, batch_dim=1))
    for kw in (dict(seed=-1), dict(seed=2**63), dict(seed=2**63 - 1), dict(seed=3.0), dict(stream=-2),
               dict(stream=2**63 - 1), dict(training=False), dict(training=1), dict(backend="cpu"),
               dict(backend="torch"), dict(backend="cuda"), dict(backend="nope"), dict(index=None)):
        calls.append(dict(dict(x=x, p=0.3, seed=11, index=idx, batch_dim=1), **kw))
    calls.append(dict(x=torch.randn(3, 0, 2), p=0.3, seed=1, index=torch.arange(0), batch_dim=1))
    calls.append(dict(x=torch.randn(3, 2, 0), p=0.3, seed=1, index=torch.arange(2), batch_dim=1))
    return calls


def _dropout_outcome(kw):
    """(output, ∂L/∂x) of one call, or (error type, message)."""
    torch.manual_seed(0)  # a drawn seed (seed=None) is the same in both runs
    kw = dict(kw)
    x = kw.pop("x")
    if x.dtype.is_floating_point:
        x = x.detach().clone().requires_grad_()
    try:
        y = mim_fast.dropout(x, **kw)
        g = None
        if x.requires_grad and y.requires_grad:
            (y.double() * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
            g = x.grad
        return (y.detach(), g)
    except Exception as e:  # noqa: BLE001 — compared between the two paths
        return (type(e), str(e))


@pytest.mark.skipif(not HAS_EXT, reason="no _C")
def test_common_call_agrees_with_full_path(monkeypatch):
    """The fast path for the common call (ops/dropout.py::_common_call) accepts only what the full path
    accepts and returns what it returns: outputs and gradients bit for bit, the same error otherwise."""
    import importlib

    module = importlib.import_module("mim_fast.ops.dropout")
    calls = _dropout_calls()
    fast = [_dropout_outcome(kw) for kw in calls]
    monkeypatch.setattr(module, "_common_call", lambda *a: None)
    for kw, got in zip(calls, fast):
        want = _dropout_outcome(kw)
        what = {k: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        assert type(got[0]) is type(want[0]), (what, got, want)
        if isinstance(want[0], type):
            assert got == want, what
        else:
            for a, b in zip(got, want):
                assert (a is None) == (b is None), what
                if a is not None:
                    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), what
                    assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)), what


@pytest.mark.skipif(not HAS_EXT, reason="no _C")
def test_common_call_serves_the_training_step():
    """MIM's dropout sites take the fast path (a regression costs ~100 µs a call, 52 calls a step), and its
    graph node is C++ (no Python forward or back); a double backward works through it."""
    import importlib

    module = importlib.import_module("mim_fast.ops.dropout")
    for shape, bd in (((50, 16, 80), 1), ((16, 5, 50, 50), 0)):
        x = torch.randn(shape, requires_grad=True)
        index = torch.randperm(1000)[:shape[bd]]
        y = module._common_call(x, 0.3, 123, index, bd, 4, True, "auto")
        assert y is not None and "CppNode<mim_fast::" in y.grad_fn.name()
        site = Dropout(0.3, batch_dim=bd).train()
        assert torch.equal(site(x, 123, index), mim_fast.dropout(x, 0.3, seed=123, index=index, batch_dim=bd))
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    keep = (y != 0).to(x.dtype) / 0.7
    torch.testing.assert_close(gg, 2 * keep * keep)


@pytest.mark.skipif(not HAS_EXT, reason="no _C")
def test_index_range_check_matches_min_max():
    from mim_fast import _ext

    for t in (torch.tensor([0, 5, 9]), torch.tensor([-1, 5]), torch.tensor([3, 10]), torch.arange(0),
              torch.tensor([2**63 - 1]), torch.tensor([0, 4, 8, 12])[::2]):
        want = t.numel() == 0 or (int(t.min()) >= 0 and int(t.max()) <= 9)
        assert _ext.C.int64_in_range(t, 9) == want, t


def test_a_torch_function_mode_sees_the_python_op():
    """Found by a differential fuzzer: with a TorchFunctionMode active, the eager common call hands over to
    the full path, so the mode sees the op a compiled graph holds (mim_fast::dropout), not the kernel's."""
    x, index = torch.randn(6, 4, 5), torch.arange(4)
    with SeenFunctions() as mode:
        y = mim_fast.dropout(x, 0.3, seed=5, index=index, batch_dim=1)
    assert "mim_fast.dropout" in mode.funcs, [f for f in mode.funcs if "mim" in f]
    assert torch.equal(y, mim_fast.dropout(x, 0.3, seed=5, index=index, batch_dim=1))
