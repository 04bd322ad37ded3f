"""CUDA-graph capture of the fused ops (GPU only; run by benchmarks/gpu_check.sh).

A captured forward+backward must replay to the same values as an uncaptured call on the same inputs, for
every fused CUDA-side backend. Capture rules the ops must keep: no host syncs, no host→device copies, no
allocation outside the graph's pool, everything on the current stream.

Noise under a graph: a Python ``seed`` is a kernel argument, so it is frozen into the graph and every
replay draws the same gate noise (tested below, so the behaviour is pinned). For fresh noise per replay
draw it inside the graph with ``torch.rand`` (graph-safe: torch advances its Philox offset per replay)
and pass it as ``noise=``.
"""
import pytest
import torch

import mim_fast
from mim_fast.ops import _backends

from _params import assert_param_close

pytestmark = pytest.mark.cuda
BACKENDS = ["cuda", "triton"]


def _capture(step):
    """Warm up on a side stream (as torch.cuda.graphs' docs require), then capture step() once."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def _need(backend, op):
    reason = _backends.backend_status(op, "cuda", (torch.float32,))[backend]
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("backend", BACKENDS)
def test_purify_gate_forward_backward_replays(backend):
    _need(backend, "purify_gate")
    T, B, D = 37, 5, 131
    x = torch.randn(T, B, D, device="cuda", requires_grad=True)
    logits = (2 * torch.randn(B, T, device="cuda") - 3).requires_grad_()
    noise = torch.rand(B, T, device="cuda").clamp(1e-6, 1 - 1e-6)
    G = torch.randn(B, D, device="cuda")
    lengths = torch.randint(0, T + 1, (B,), device="cuda")

    def step():
        x.grad, logits.grad = None, None
        out = mim_fast.purify_gate(x, logits, noise=noise, lengths=lengths, backend=backend)
        torch.autograd.backward([out.pooled, out.penalty], [G, torch.ones((), device="cuda")])
        return out.pooled, out.penalty, out.gate, x.grad, logits.grad

    graph, static = _capture(step)
    for _ in range(2):  # new inputs, copied into the captured tensors, then replay
        with torch.no_grad():
            x.copy_(torch.randn_like(x))
            logits.copy_(2 * torch.randn_like(logits) - 3)
            noise.copy_(torch.rand_like(noise).clamp(1e-6, 1 - 1e-6))
            G.copy_(torch.randn_like(G))
        graph.replay()
        torch.cuda.synchronize()
        got = [t.clone() for t in static]
        want = step()
        # a replay runs the very kernels of an uncaptured call; only a reduction order (atomics) may differ
        for g, w, name in zip(got, want, ("pooled", "penalty", "gate", "grad x", "grad logits")):
            torch.testing.assert_close(g, w, msg=lambda m: "%s: %s" % (name, m))


@pytest.mark.parametrize("backend", BACKENDS)
def test_purify_gate_seed_is_frozen_in_the_graph_and_in_graph_rand_is_not(backend):
    _need(backend, "purify_gate")
    T, B, D = 50, 16, 80
    x = torch.randn(T, B, D, device="cuda")
    logits = torch.randn(B, T, device="cuda") - 3

    graph, gate_seeded = _capture(lambda: mim_fast.purify_gate(x, logits, seed=1234, backend=backend).gate)
    gates = []
    for _ in range(2):
        graph.replay()
        gates.append(gate_seeded.clone())
    torch.testing.assert_close(gates[0], gates[1], rtol=0, atol=0)
    torch.testing.assert_close(gates[0], mim_fast.purify_gate(x, logits, seed=1234, backend=backend).gate,
                               rtol=0, atol=0)

    def fresh():
        u = torch.rand(B, T, device="cuda").clamp_(1e-6, 1 - 1e-6)
        return u, mim_fast.purify_gate(x, logits, noise=u, backend=backend).gate

    graph, (u_static, gate_static) = _capture(fresh)
    seen = []
    for _ in range(2):
        graph.replay()
        seen.append((u_static.clone(), gate_static.clone()))
        ref = mim_fast.purify_gate(x, logits, noise=seen[-1][0], backend=backend).gate
        torch.testing.assert_close(seen[-1][1], ref, rtol=0, atol=0)
    assert not torch.equal(seen[0][0], seen[1][0]), "torch.rand inside the graph must advance per replay"


@pytest.mark.parametrize("backend", BACKENDS)
def test_kgs_loss_forward_backward_replays(backend):
    _need(backend, "kgs_loss")
    M, B, D = 3, 77, 80
    y = torch.empty(B, device="cuda").uniform_(-3, 3)
    yk = (y + torch.randn(M, B, device="cuda")).requires_grad_()
    yu = (y + torch.randn(M, B, device="cuda")).requires_grad_()
    h = (2 * torch.randn(M, B, D, device="cuda")).requires_grad_()
    ins = (yk, yu, y, h)

    def step():
        for t in (yk, yu, h):
            t.grad = None
        out = mim_fast.kgs_loss(*ins, backend=backend)
        out.loss.backward()
        return out.loss, out.teacher, out.alpha, yk.grad, yu.grad, h.grad

    graph, static = _capture(step)
    for _ in range(2):
        with torch.no_grad():
            y.uniform_(-3, 3)
            yk.copy_(y + torch.randn_like(yk))
            yu.copy_(y + torch.randn_like(yu))
            h.copy_(2 * torch.randn_like(h))
        graph.replay()
        torch.cuda.synchronize()
        got = [t.clone() for t in static]
        want = step()
        for g, w, name in zip(got, want, ("loss", "teacher", "alpha", "grad yk", "grad yu", "grad h")):
            torch.testing.assert_close(g, w, msg=lambda m: "%s: %s" % (name, m))


def test_capture_rejects_what_a_graph_would_freeze_or_cannot_copy():
    T, B, D = 7, 3, 5
    x = torch.randn(T, B, D, device="cuda")
    logits = torch.randn(B, T, device="cuda")
    lengths_cpu = torch.full((B,), T)
    mim_fast.purify_gate(x, logits, seed=1)  # warm-up outside capture
    for kwargs, message in (({}, "noise= drawn inside the graph"),
                            (dict(seed=1, lengths=lengths_cpu), "lengths must be on")):
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(ValueError, match=message):
            with torch.cuda.graph(graph):
                mim_fast.purify_gate(x, logits, **kwargs)


# ---- the whole training step (mim_fast.graphs, `mim-fast train --cuda-graphs`) ------------------------------

def _tiny_training(tmp_path, **kw):
    from mim_fast import train as T

    opts = dict(synthetic={"n_train": 88, "n_dev": 24, "n_test": 24, "T": 7, "dims": [9, 5, 3]}, d_model=10, heads=2,
                batch_size=16, epochs=2, lr=3e-3, device="cuda", drop_last=False, penalty_warmup=1.0)
    return T.TrainConfig(out=str(tmp_path / "run"), **{**opts, **kw})


# Five, to fit gpu_check.sh's time box: the default run (backend auto = cuda on a GPU, fused Adam), torch's
# default Adam, bf16 autocast, the Triton kernels (with drop_last: no eager batch) and the reference ops.
def _twins(tmp_path, **kw):
    """The tiny run's config, device and data, and two twin models on the GPU (the same initial parameters),
    each with its capturable Adam: (cfg, dev, data, (model, opt), (twin, twin_opt))."""
    from mim_fast import train as T

    cfg = _tiny_training(tmp_path, **kw)
    dev = torch.device("cuda")
    data = T.load_for_training(cfg)
    torch.manual_seed(1)
    model = T.build_model(data, cfg).to(dev)
    twin = T.build_model(data, cfg).to(dev)
    twin.load_state_dict(model.state_dict())
    return (cfg, dev, data, (model, T.Optimizers(model, cfg, dev, capturable=True)),
            (twin, T.Optimizers(twin, cfg, dev, capturable=True)))


CAPTURED_VARIANTS = {
    "default": dict(),
    "default-adam": dict(adam="default"),
    "bf16": dict(amp="bf16"),
    "triton-drop-last": dict(backend="triton", drop_last=True),
    "torch-ops": dict(backend="torch"),
}


@pytest.mark.parametrize("variant", sorted(CAPTURED_VARIANTS))
def test_captured_training_step_follows_the_eager_step(tmp_path, variant):
    """Two twin models on the GPU, both with capturable Adam: one stepped eagerly, one by CapturedStep
    (captured once per epoch, the last batch of 8 eagerly unless drop_last). The same kernels on the same
    values: losses and parameters agree to float32 rounding (a reduction's atomics may reorder; under bf16
    autocast, to bf16's). Adam's "capturable=True but running without capture" warning, which the warm-up and
    the eager last batch would raise by design, is not shown."""
    import warnings

    from mim_fast import graphs
    from mim_fast import train as T

    kw = CAPTURED_VARIANTS[variant]
    if "backend" in kw and kw["backend"] != "torch":
        _need(kw["backend"], "purify_gate")
        _need(kw["backend"], "kgs_loss")
    cfg, dev, data, (model, opt), (twin, twin_opt) = _twins(tmp_path, **kw)
    step = graphs.CapturedStep(twin, twin_opt, cfg, dev)
    bf16 = cfg.amp == "bf16"
    steps, seen = 0, []
    for epoch in (1, 2):
        seed = T._epoch_seed(0, epoch, 1)
        epoch_batches = list(T.batches(data.train, 16, shuffle=True, device=dev, seed=epoch, drop_last=cfg.drop_last))
        for i, batch in enumerate(epoch_batches):
            ramp = T.penalty_ramp(cfg, epoch, i, len(epoch_batches))
            with warnings.catch_warnings():  # the eager twin's Adam warns, as it should
                warnings.filterwarnings("ignore", message=graphs._ADAM_UNCAPTURED)
                want = T.train_step(model, opt, batch, cfg, seed, dev, ramp)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = step(batch, seed, ramp)
            seen += [str(w.message) for w in caught]
            steps += 1
            for k in T.LOGGED:
                torch.testing.assert_close(got[k], want[k], rtol=2e-2 if bf16 else 1e-4, atol=2e-3 if bf16 else 1e-5,
                                           msg=lambda m: "%d/%d %s: %s" % (epoch, i, k, m))
    assert not [m for m in seen if graphs._ADAM_UNCAPTURED in m], seen
    eager_steps = 0 if cfg.drop_last else 2
    assert (step.captures, step.replays, step.eager_steps) == (2, 10, eager_steps)
    # the key biases' exact gradient is 0: should a library pick another algorithm under capture, their
    # rounding noise becomes Adam steps of up to lr (tests/_params.py)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        if bf16:
            torch.testing.assert_close(a.double(), b.double(), rtol=2e-2, atol=steps * cfg.lr, msg=name)
        else:
            assert_param_close(name, a, b, key_bias_bound=steps * cfg.lr)


def test_a_replaced_parameter_is_captured_again_not_replayed_stale(tmp_path):
    """On a real graph: a parameter moved to new memory mid-epoch (p.data = ..., same values) makes the next
    call capture again, with a warning; the run then follows the eager twin. Without that, a replay would go
    on updating the old memory and the model would silently stop training."""
    import copy

    from mim_fast import graphs
    from mim_fast import train as T

    cfg, dev, data, (model, opt), (twin, twin_opt) = _twins(tmp_path, drop_last=True)
    step = graphs.CapturedStep(twin, twin_opt, cfg, dev)
    seed = T._epoch_seed(0, 1, 1)
    for i, batch in enumerate(T.batches(data.train, 16, shuffle=True, device=dev, seed=1, drop_last=True)):
        if i == 2:
            p = next(twin.parameters())
            p.data = p.data.clone()
            with pytest.warns(UserWarning, match="changed since the step was captured"):
                got = step(batch, seed)
        elif i == 3:
            for o in twin_opt.opts:
                o.load_state_dict(copy.deepcopy(o.state_dict()))
            with pytest.warns(UserWarning, match="optimizer 0's state changed"):
                got = step(batch, seed)
        else:
            got = step(batch, seed)
        want = T.train_step(model, opt, batch, cfg, seed, dev)
        for k in T.LOGGED:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=lambda m: "%d %s: %s" % (i, k, m))
    assert step.captures == 3
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert_param_close(name, a, b, key_bias_bound=5 * cfg.lr)


def test_resumed_run_with_cuda_graphs_matches_the_uninterrupted_one(tmp_path):
    """A --cuda-graphs run stopped mid-epoch and resumed with --cuda-graphs follows the uninterrupted
    --cuda-graphs run (the checkpoint's Adam is capturable again; the graph is captured anew)."""
    from mim_fast import train as T

    quiet = dict(progress=False, log=lambda *a: None, cuda_graphs=True)
    full = T.run(_tiny_training(tmp_path / "full", epochs=3), **quiet)
    cfg = _tiny_training(tmp_path / "part", epochs=3)
    partial = T.run(cfg, stop_after_steps=2 * 6 + 2, **quiet)
    assert partial["interrupted_at_epoch"] == 3
    resumed = T.resume(cfg.out, **quiet)
    assert resumed["sessions"][-1]["cuda_graphs"] is True
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    for a, b in zip(full["history"], resumed["history"]):
        for part in ("dev", "test"):
            assert abs(a[part]["l1"] - b[part]["l1"]) <= 1e-3 * (1 + abs(a[part]["l1"])), (a["epoch"], part)


def test_run_with_cuda_graphs_matches_the_eager_run(tmp_path):
    from mim_fast import train as T

    quiet = dict(progress=False, log=lambda *a: None)
    eager = T.run(_tiny_training(tmp_path / "eager"), **quiet)
    graphed = T.run(_tiny_training(tmp_path / "graphed"), cuda_graphs=True, **quiet)
    assert graphed["sessions"][-1]["cuda_graphs"] is True
    for a, b in zip(eager["history"], graphed["history"]):
        for part in ("dev", "test"):
            assert abs(a[part]["l1"] - b[part]["l1"]) <= 1e-3 * (1 + abs(a[part]["l1"])), (a["epoch"], part)
