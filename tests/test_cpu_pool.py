"""The CPU kernels' pool of recycled large output buffers (csrc/cpu_memory.h): reuse must never hand out
memory a live tensor still owns, must keep empty_like's layout, must give the same values as fresh
memory, and must be bounded and switchable off."""
import os
import subprocess
import sys

import pytest
import torch

import mim_fast
from mim_fast import reference

pytestmark = pytest.mark.skipif(mim_fast.build_info() is None, reason="needs the compiled extension")

MIB = 2**20


def _gate_grads(x, logits, noise):
    x = x.detach().requires_grad_()
    logits = logits.detach().requires_grad_()
    out = mim_fast.purify_gate(x, logits, noise=noise, backend="cpu")
    G = torch.ones_like(out.pooled)
    torch.autograd.backward([out.pooled, out.penalty], [G, torch.ones(())])
    return x.grad, logits.grad


def _inputs(T=23, B=117, D=1001, batch_first=False):  # 10.8 MB of float32: above the pool's 8 MiB floor
    x = torch.randn(B, T, D) if batch_first else torch.randn(T, B, D)
    return x, 2 * torch.randn(B, T) - 3, torch.rand(B, T).clamp(1e-6, 1 - 1e-6)


def _reference_grad_x(x, logits, noise, batch_first=False):
    x = x.detach().double().requires_grad_()
    out = reference.purify_gate(x, logits.double(), noise=noise.double(), batch_first=batch_first)
    out.pooled.backward(torch.ones_like(out.pooled))  # the penalty does not reach x
    return x.grad.float()


def test_reuse_never_aliases_a_live_tensor_and_keeps_values():
    mim_fast.empty_cpu_cache()
    x, logits, noise = _inputs()
    want = _reference_grad_x(x, logits, noise)
    first, _ = _gate_grads(x, logits, noise)
    snapshot = first.clone()
    before = mim_fast.cpu_cache_info()
    x2, logits2, noise2 = _inputs()
    second, _ = _gate_grads(x2, logits2, noise2)  # `first` is alive: its buffer must not be reused
    assert second.data_ptr() != first.data_ptr()
    torch.testing.assert_close(first, snapshot, rtol=0, atol=0)
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second, _reference_grad_x(x2, logits2, noise2), rtol=1e-5, atol=1e-6)
    ptr = first.data_ptr()
    del first, snapshot
    assert mim_fast.cpu_cache_info()["idle_blocks"] >= 1
    third, _ = _gate_grads(x, logits, noise)  # same size: served from the freed buffer
    after = mim_fast.cpu_cache_info()
    assert third.data_ptr() == ptr and after["hits"] > before["hits"]
    torch.testing.assert_close(third, want, rtol=1e-5, atol=1e-6)  # fully overwritten, no stale values


def test_batch_first_gradient_keeps_the_input_layout():
    x, logits, noise = _inputs(batch_first=True)
    xt = x.transpose(0, 1)  # a (T, B, D) view of batch-first memory, as MIM's layout change gives
    gx, _ = _gate_grads(xt, logits, noise)
    assert gx.stride() == xt.stride()
    torch.testing.assert_close(gx, _reference_grad_x(xt, logits, noise), rtol=1e-5, atol=1e-6)


def test_pool_tensors_are_ordinary_storage():
    x, logits, noise = _inputs()
    gx, _ = _gate_grads(x, logits, noise)
    gx.resize_(gx.numel() + 12345)  # a resizable storage (the allocator is known), data kept
    gx[-1] = 3.0
    assert gx[-1].item() == 3.0
    y = gx.clone()
    assert y.data_ptr() != gx.data_ptr()


def test_kgs_loss_gradient_from_the_pool_matches_the_reference():
    M, B, D = 3, 1111, 1001  # 13 MB (M, B, D) buffers: saved h and ∂L/∂h both pooled
    y = torch.empty(B).uniform_(-3, 3)
    yk, yu = y + torch.randn(M, B), y + torch.randn(M, B)
    h = 2 * torch.randn(M, B, D)
    grads = []
    for backend in ("cpu", "torch", "cpu"):
        hh = h.clone().requires_grad_()
        mim_fast.kgs_loss(yk, yu, y, hh, backend=backend).loss.backward()
        grads.append(hh.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[2], grads[0], rtol=0, atol=0)  # a pooled buffer, the same result


def test_empty_cpu_cache_frees_idle_buffers():
    x, logits, noise = _inputs()
    gx, _ = _gate_grads(x, logits, noise)
    del gx
    idle = mim_fast.cpu_cache_info()["idle_bytes"]
    assert idle >= x.numel() * 4
    assert mim_fast.empty_cpu_cache() == idle
    assert mim_fast.cpu_cache_info()["idle_bytes"] == 0


@pytest.mark.parametrize("cap_mb, cached", [("0", False), ("9", False), ("64", True)])
def test_the_cap_bounds_what_is_kept(cap_mb, cached):
    # a fresh process: the cap is read once, at the pool's first use
    code = (
        "import torch, mim_fast\n"
        "x = torch.randn(23, 117, 1001, requires_grad=True)\n"  # ∂L/∂x: 10.8 MB, rounded to 12 MiB
        "g = (torch.randn(117, 23) - 3).requires_grad_()\n"
        "for _ in range(3):\n"
        "    x.grad = None\n"
        "    mim_fast.purify_gate(x, g, seed=1, backend='cpu').pooled.sum().backward()\n"
        "x.grad = None\n"
        "i = mim_fast.cpu_cache_info()\n"
        "print(i['cap_bytes'], i['idle_bytes'], i['hits'])\n")
    env = dict(os.environ, MIM_FAST_CPU_CACHE_MB=cap_mb)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    cap, idle, hits = (int(v) for v in out.stdout.split()[-3:])
    assert cap == int(cap_mb) * MIB
    if cached:
        assert idle == 12 * MIB and hits == 2
    else:
        assert idle == 0 and hits == 0


def test_the_profiler_sees_pooled_buffers():
    # peak-memory figures (mim-fast bench, torch.profiler's memory view) must count the pooled ∂L/∂x
    from mim_fast import bench

    x, logits, noise = _inputs()
    _gate_grads(x, logits, noise)  # warm: the next call is served from the pool
    peak = bench.peak_memory(lambda: _gate_grads(x, logits, noise), "cpu")
    assert peak >= x.numel() * 4


def _child_uses_pool(queue):
    torch.set_num_threads(1)
    x, logits, noise = _inputs()
    gx, _ = _gate_grads(x, logits, noise)
    queue.put(bool(torch.isfinite(gx).all()))


def test_a_forked_child_can_use_the_pool():
    import multiprocessing

    x, logits, noise = _inputs()
    held, _ = _gate_grads(x, logits, noise)  # the parent has used the pool (and holds a pooled buffer)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_uses_pool, args=(queue,))
    child.start()
    child.join(120)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung (a lock inherited in a locked state?)")
    assert child.exitcode == 0 and queue.get(timeout=5) is True
    assert torch.isfinite(held).all()
