"""The CUDA code paths of every op, traced on this machine without a GPU.

Fake CUDA tensors (``FakeTensorMode``: metadata only, no device memory, no driver) go through the same
Python that real CUDA tensors take: argument checks, backend dispatch, the torch.library fakes and the
autograd glue. So a branch that only CUDA inputs reach — a call that breaks torch.compile's graph, a
host sync, a CPU tensor handed to a GPU launcher — fails here, in CI, instead of on the rare GPU run.

* torch.compile: ``torch._dynamo.export`` (dynamo's own tracer, the one ``torch.compile`` uses) must
  capture each public op whole (a graph break is an error), with static and with dynamic shapes.
* eager: the same calls run under the fake mode outside torch.compile, and the fused backward ops run
  on fake CUDA tensors (autograd's engine itself needs a driver for CUDA tensors).
* the reference: on CUDA, ATen divides a tensor by a host scalar as a multiply by the reciprocal; the
  reference must not, or it differs from the kernels (and from itself on CPU) in the last bit.
"""
import contextlib
from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import mim_fast
from mim_fast import reference
from mim_fast.ops import _backends

FUSED_OP = {"purify_gate": {"cuda": "purify_gate_forward", "triton": "purify_gate_forward_triton"},
            "kgs_loss": {"cuda": "kgs_loss_forward", "triton": "kgs_loss_forward_triton"},
            "kgs_loss_with_heads": {"cuda": "kgs_loss_heads_forward", "triton": "kgs_loss_heads_forward_triton"}}


def _usable(op, backend):
    """The backends that would serve CUDA tensors here if a GPU were present (the status check itself
    only looks at what is built and installed)."""
    reason = _backends.backend_status(op, "cuda", (torch.float32,))[backend]
    if reason:
        pytest.skip(reason)


def _fake_cuda(*shapes, requires_grad=False, dtype=torch.float32, mode=None):
    """Fake CUDA float tensors of these shapes (one FakeTensorMode per traced call: modes do not mix)."""
    with mode or FakeTensorMode():
        return [torch.empty(s, device="cuda", dtype=dtype, requires_grad=requires_grad) for s in shapes]


def _targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def _export(fn, args, dynamic):
    """dynamo's capture of fn(*args) as one graph (raises on any graph break)."""
    gm, _ = torch._dynamo.export(fn, assume_static_by_default=not dynamic)(*args)
    return gm


@contextlib.contextmanager
def _no_capture_query():
    # Outside torch.compile the op asks the CUDA runtime whether a graph is being captured; without a
    # driver that call fails, so the eager runs here answer "no" for it.
    with mock.patch.object(torch.cuda, "is_current_stream_capturing", lambda: False):
        yield


GATE_CASES = {
    "seed": dict(seed=5, offset=3),
    "noise": dict(noise=True),
    "expected-lengths-cuda": dict(mode="expected", lengths="cuda"),
    "seed-lengths-cpu-batch-first": dict(seed=1, lengths="cpu", batch_first=True),
    "relu-threshold": dict(seed=2, activation="relu", penalty="threshold"),
}


def _gate_call(backend, case):
    T, B, D = 7, 3, 5
    opts = dict(GATE_CASES[case])
    batch_first = opts.get("batch_first", False)
    mode = FakeTensorMode()
    x, logits, noise = _fake_cuda((B, T, D) if batch_first else (T, B, D), (B, T), (B, T), requires_grad=True,
                                  mode=mode)
    if opts.pop("noise", False):
        opts["noise"] = noise.detach()
    where = opts.pop("lengths", None)
    if where == "cuda":
        with mode:
            opts["lengths"] = torch.full((B,), T, dtype=torch.int64, device="cuda")
    elif where == "cpu":
        opts["lengths"] = torch.tensor([T, 0, 2])

    def fn(x, logits):
        out = mim_fast.purify_gate(x, logits, backend=backend, **opts)
        return out.pooled.sum() + out.penalty, out.gate

    return fn, (x, logits)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("case", list(GATE_CASES))
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_purify_gate_cuda_path_compiles_without_graph_break(backend, case, dynamic):
    _usable("purify_gate", backend)
    fn, args = _gate_call(backend, case)
    targets = _targets(_export(fn, args, dynamic))
    if backend != "torch":
        assert any(FUSED_OP["purify_gate"][backend] in t for t in targets), targets


@pytest.mark.parametrize("case", [c for c in GATE_CASES if "lengths-cpu" not in c])  # (needs real values)
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_purify_gate_cuda_path_runs_eagerly(backend, case):
    """The same call outside torch.compile, forward and backward, as a user's eager step takes it."""
    _usable("purify_gate", backend)
    fn, (x, logits) = _gate_call(backend, case)
    with _no_capture_query(), x.fake_mode:
        loss, gate = fn(x, logits)
        assert loss.device.type == "cuda" and gate.device.type == "cuda" and gate.shape == logits.shape
        if backend != "torch":  # (autograd's engine needs a CUDA driver; the fused backward is called directly)
            fwd = getattr(torch.ops.mim_fast, FUSED_OP["purify_gate"][backend])
            bwd = getattr(torch.ops.mim_fast, FUSED_OP["purify_gate"][backend].replace("forward", "backward"))
            out = fwd(x, logits, None, None, 1, 0, "sample", "tanh", 3.0, 1 / 3, 1.2, -0.2, 0.6, -0.5)
            for needs_x in (True, False):
                gx, glogits = bwd(out[0], out[1], x, out[2], out[3], out[4], out[5], None, "tanh", needs_x)
                assert gx.shape == (x.shape if needs_x else (0,)) and glogits.shape == logits.shape
                assert gx.device.type == "cuda" and glogits.device.type == "cuda"


def _kgs_args(op):
    M, B, D = 3, 4, 6
    if op == "kgs_loss":
        return _fake_cuda((M, B), (M, B), (B,), (M, B, D), requires_grad=True)
    mode = FakeTensorMode()
    hm, hu, w, b = _fake_cuda((M, B, D), (M, B, D), (M, D), (M,), requires_grad=True, mode=mode)
    (y,) = _fake_cuda((B,), mode=mode)
    return [hm, hu, w, b, y]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("per_sample,reduction", [(True, "mean"), (False, "none")])
@pytest.mark.parametrize("op", ["kgs_loss", "kgs_loss_with_heads"])
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_kgs_loss_cuda_path_compiles_without_graph_break(backend, op, per_sample, reduction, dynamic):
    _usable(op, backend)
    args = _kgs_args(op)
    fn_op = getattr(mim_fast, op)

    def fn(*args):
        out = fn_op(*args, per_sample=per_sample, reduction=reduction, backend=backend)
        return out.loss.sum() + out.inter.sum(), out.teacher

    targets = _targets(_export(fn, args, dynamic))
    if backend != "torch":
        assert any(FUSED_OP[op][backend] in t for t in targets), targets


@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_philox_cuda_path_compiles(backend):
    _usable("philox_uniform", backend)
    (seeded,) = _fake_cuda((4,))

    def fn(t):
        return t + mim_fast.philox_uniform(7, 11, (4,), device="cuda", backend=backend)

    _export(fn, (seeded,), dynamic=False)


def test_gate_modules_cuda_path_compiles():
    gate = mim_fast.nn.PurificationGate()
    kgs = mim_fast.nn.KGSLoss()
    x, logits, yk, yu, y, h = _fake_cuda((6, 2, 5), (2, 6), (3, 2), (3, 2), (2,), (3, 2, 5))

    def fn(x, logits, yk, yu, y, h):
        out = gate(x, logits, seed=3)
        return out.pooled.sum() + kgs(yk, yu, y, h).loss

    _export(fn, (x, logits, yk, yu, y, h), dynamic=False)


class _HostScalarDivisions(TorchDispatchMode):
    """Records every aten.div whose divisor is a host scalar: a Python number, or a CPU tensor dividing a
    CUDA one. ATen computes those on CUDA as dividend · (1/divisor), not as the IEEE quotient."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.div, torch.ops.aten.div_) and len(args) >= 2:
            num, den = args[0], args[1]
            if isinstance(num, torch.Tensor) and (not isinstance(den, torch.Tensor) or
                                                  (den.device.type == "cpu" and num.device.type != "cpu")):
                self.found.append("%s(%s on %s, %r)" % (func, tuple(num.shape), num.device,
                                                        den if not isinstance(den, torch.Tensor) else den.device))
        return func(*args, **(kwargs or {}))


def _gate_opts(mode, lengths, device):
    opts = dict(mode=mode, seed=3)
    if lengths:
        opts["lengths"] = torch.full((3,), 4, dtype=torch.int64, device=device)
    return opts


@pytest.mark.parametrize("lengths", [False, True], ids=["all-steps", "lengths"])
@pytest.mark.parametrize("mode", ["sample", "expected"])
def test_reference_gate_divides_exactly(mode, lengths):
    """Every division of the reference gate, forward and backward, is an IEEE quotient on every device.
    Forward on fake CUDA tensors (devices visible); forward + backward on CPU (autograd's engine needs a
    driver for CUDA tensors), where a division by a Python number is what would become a reciprocal."""
    fake = FakeTensorMode()
    x, logits = _fake_cuda((7, 3, 5), (3, 7), mode=fake)
    with fake:
        opts = _gate_opts(mode, lengths, "cuda")
        with _HostScalarDivisions() as rec:
            reference.purify_gate(x, logits, **opts)
    assert not rec.found, "forward divisions by a host scalar (a reciprocal multiply on CUDA): %s" % rec.found

    x, logits = torch.randn(7, 3, 5, requires_grad=True), torch.randn(3, 7, requires_grad=True)
    opts = _gate_opts(mode, lengths, "cpu")
    with _HostScalarDivisions() as rec:
        out = reference.purify_gate(x, logits, **opts)
        torch.autograd.grad(out.pooled.sum() + out.penalty, [x, logits])
    assert not rec.found, "divisions by a host scalar (a reciprocal multiply on CUDA): %s" % rec.found


def test_host_scalar_division_detector_finds_one():
    """The detector above is not vacuous: x / 3.0 is flagged, on CUDA and on CPU, and so is a CPU 0-dim
    divisor of a CUDA tensor; a same-device 0-dim tensor divisor is not."""
    fake = FakeTensorMode()
    (x,) = _fake_cuda((4,), mode=fake)
    cases = [(lambda t: t / 3.0, 1), (lambda t: t / torch.full((), 3.0, device=t.device), 0)]
    for fn, expected in cases:
        with fake, _HostScalarDivisions() as rec:
            fn(x)
        assert len(rec.found) == expected
    with fake:
        cpu_divisor = torch.full((), 3.0)
        with _HostScalarDivisions() as rec:
            x / cpu_divisor
    assert len(rec.found) == 1
    with _HostScalarDivisions() as rec:
        torch.randn(4) / 3.0
    assert len(rec.found) == 1


@pytest.mark.triton
def test_triton_launchers_refuse_tensors_they_cannot_address(monkeypatch):
    """A compiled Triton kernel given a CPU pointer (or one of another device) aborts the process with an
    illegal address; the launchers refuse such calls with a message before launching anything."""
    if _backends.triton_import_error():
        pytest.skip(_backends.triton_import_error())
    from mim_fast.triton import _launch, kgs_loss as tk, philox as tp, purify_gate as tg

    x, logits = torch.randn(4, 2, 3), torch.randn(2, 4)
    monkeypatch.setattr(_backends, "triton_interpreting", lambda: False)  # as on a GPU machine
    calls = [
        lambda: tg.purify_gate_forward(x, logits, None, None, 1, 0, "sample", "tanh", 3.0, 1 / 3, 1.2, -0.2, 0.6, 0.0),
        lambda: tk.kgs_loss_forward(torch.randn(3, 2), torch.randn(3, 2), torch.randn(2), torch.randn(3, 2, 4), True,
                                    10.0, False, [1.0] * 4, "mean", 1e-12, False, False),
        lambda: tp.philox_uniform_counters(torch.arange(5), 3),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="compiled Triton kernels take CUDA tensors"):
            call()
    with pytest.raises(ValueError, match="every tensor must be on one device; got cpu and meta"):
        _launch.check_tensors("op", x, torch.empty(2, device="meta"))


def test_triton_device_guard_selects_the_tensors_device():
    """Launches happen with the tensors' device current (the C++ ops use CUDAGuard): tensors on cuda:1
    while cuda:0 is current would otherwise be launched through the wrong context."""
    if _backends.triton_import_error():
        pytest.skip(_backends.triton_import_error())
    from mim_fast.triton._launch import device_guard

    guard = device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(device_guard(torch.device("cpu")), torch.cuda.device)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_ops_on_a_device_that_is_not_current(backend):
    """Tensors on cuda:1 while cuda:0 is current: every kernel must launch on cuda:1."""
    dev = torch.device("cuda", 1)
    x, logits = torch.randn(9, 4, 33, device=dev), torch.randn(4, 9, device=dev)
    yk, yu, y, h = torch.randn(3, 5, device=dev), torch.randn(3, 5, device=dev), torch.randn(5, device=dev), \
        torch.randn(3, 5, 17, device=dev)
    with torch.cuda.device(0):
        xg, lg, hg = x.clone().requires_grad_(), logits.clone().requires_grad_(), h.clone().requires_grad_()
        out = mim_fast.purify_gate(xg, lg, seed=5, backend=backend)
        (out.pooled.sum() + out.penalty).backward()
        kgs = mim_fast.kgs_loss(yk, yu, y, hg, backend=backend)
        kgs.loss.backward()
        u = mim_fast.philox_uniform(3, 0, (100,), device=dev, backend=backend)
        torch.cuda.synchronize(dev)
    ref = mim_fast.purify_gate(x.cpu(), logits.cpu(), seed=5, backend="torch")
    assert torch.equal(out.gate.cpu(), ref.gate)
    torch.testing.assert_close(out.pooled.cpu(), ref.pooled, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kgs.loss.cpu(), mim_fast.kgs_loss(yk.cpu(), yu.cpu(), y.cpu(), h.cpu(),
                                                                 backend="torch").loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(u.cpu(), mim_fast.philox_uniform(3, 0, (100,), backend="torch"))
    assert xg.grad.device == dev and hg.grad.device == dev
