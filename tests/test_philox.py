"""Counter-based noise: the torch reference, the C++ (shared header) kernel, Triton's tl.rand and our
Triton kernel must give bit-identical float32 values."""
import random

import pytest
import torch

import mim_fast
from mim_fast import reference
from mim_fast.ops import _backends

HAS_TRITON = _backends.triton_import_error() is None
needs_ext = pytest.mark.skipif(mim_fast.build_info() is None, reason="mim_fast._C not built")


def _u32(t):
    return [int(v) & 0xFFFFFFFF for v in t]


# Known-answer vectors of Philox4x32-10 from Random123 (kat_vectors): counter, key -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_reference_philox_known_answers(counter, key, expected):
    c = [torch.tensor([v], dtype=torch.int64) for v in counter]
    out = reference.philox4x32_10(*c, *key)
    assert _u32(torch.cat(out)) == list(expected)


def _random_counters(n):
    """Counters below and above 2^32, including the 32-bit boundary."""
    lo = torch.randint(0, 2**32, (n,), dtype=torch.int64)
    hi = torch.randint(0, 2**20, (n,), dtype=torch.int64)
    edge = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**62 + 12345], dtype=torch.int64)
    return torch.cat([lo, lo + (hi << 32), edge])


def test_uniform_range_and_moments():
    u = mim_fast.philox_uniform(random.randrange(2**62), random.randrange(2**40), (200_000,), backend="torch")
    assert u.dtype == torch.float32
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 5 * (1 / 12) ** 0.5 / 200_000**0.5
    assert abs(float(u.var()) - 1 / 12) < 2e-3
    # the largest possible value (v = 2^31 - 1) stays below 1
    assert float(torch.tensor(2**31 - 1, dtype=torch.float32) * reference._UNIFORM_SCALE) < 1.0


def test_uniform_shape_offset_and_row_major_counters():
    seed = random.randrange(2**63)
    off = random.randrange(2**40)
    u = mim_fast.philox_uniform(seed, off, (3, 5, 7), backend="torch")
    flat = mim_fast.philox_uniform(seed, off, (105,), backend="torch")
    assert u.shape == (3, 5, 7)
    assert torch.equal(u.reshape(-1), flat)
    shifted = mim_fast.philox_uniform(seed, off + 10, (95,), backend="torch")
    assert torch.equal(flat[10:], shifted)
    other_seed = mim_fast.philox_uniform(seed ^ 1, off, (105,), backend="torch")
    assert not torch.equal(flat, other_seed)


@needs_ext
def test_cpu_kernel_bit_identical_to_reference():
    counters = _random_counters(5000)
    for seed in (0, 1, random.randrange(2**32), random.randrange(2**32, 2**63)):
        ref = reference.philox_uniform_counters(seed, counters)
        out = torch.ops.mim_fast.philox_uniform(counters, seed)
        assert torch.equal(out.view(torch.int32), ref.view(torch.int32)), seed


@needs_ext
def test_cpu_backend_public_api_matches_reference():
    seed, off = random.randrange(2**63), random.randrange(2**50)
    a = mim_fast.philox_uniform(seed, off, (17, 29), backend="cpu")
    b = mim_fast.philox_uniform(seed, off, (17, 29), backend="torch")
    assert torch.equal(a, b)


@needs_ext
def test_cpu_kernel_noncontiguous_and_empty():
    counters = _random_counters(64).view(8, 17)[:, ::2]  # non-contiguous view
    seed = random.randrange(2**63)
    assert torch.equal(torch.ops.mim_fast.philox_uniform(counters, seed),
                       reference.philox_uniform_counters(seed, counters))
    assert torch.ops.mim_fast.philox_uniform(torch.empty(0, dtype=torch.int64), 3).shape == (0,)


@needs_ext
def test_opcheck_philox_uniform():
    for shape in [(1,), (7, 3), (0,), (4097,)]:
        counters = torch.randint(0, 2**40, shape, dtype=torch.int64)
        torch.library.opcheck(torch.ops.mim_fast.philox_uniform.default, (counters, random.randrange(2**63)))


@needs_ext
def test_cpu_kernel_rejects_bad_counters():
    with pytest.raises(RuntimeError, match="counters must be int64"):
        torch.ops.mim_fast.philox_uniform(torch.zeros(3, dtype=torch.int32), 1)


def _triton_device() -> str:
    """Where Triton runs here: the GPU, or the CPU under TRITON_INTERPRET=1 (else the test is skipped)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reason = _backends.needs_triton(torch.device(device), ())
    if reason:
        pytest.skip(reason)
    return device


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_tl_rand_matches_reference():
    """Triton's own tl.rand(seed, offset) (32-bit offsets) against the torch Philox."""
    import triton
    import triton.language as tl

    @triton.jit
    def rand_kernel(out_ptr, seed, offset, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + idx, tl.rand(seed, offset + idx), mask=idx < n)

    device = _triton_device()
    n = 3000
    for seed, offset in [(0, 0), (random.randrange(2**31), random.randrange(2**30)),
                         (random.randrange(2**32, 2**63), random.randrange(2**30))]:
        out = torch.empty(n, dtype=torch.float32, device=device)
        rand_kernel[(triton.cdiv(n, 1024),)](out, seed, offset, n, BLOCK=1024)
        ref = reference.philox_uniform(seed, offset, (n,), device=device)
        assert torch.equal(out.cpu().view(torch.int32), ref.cpu().view(torch.int32)), (seed, offset)


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_backend_matches_reference_with_64bit_counters():
    device = _triton_device()
    for seed, offset in [(random.randrange(2**63), 2**32 - 1000), (random.randrange(2**63), random.randrange(2**60))]:
        out = mim_fast.philox_uniform(seed, offset, (37, 61), device=device, backend="triton")
        ref = reference.philox_uniform(seed, offset, (37, 61), device=device)
        assert torch.equal(out.cpu().view(torch.int32), ref.cpu().view(torch.int32))


@pytest.mark.cuda
def test_cuda_kernel_bit_identical_to_reference():
    counters = _random_counters(100_000).cuda()
    seed = random.randrange(2**63)
    ref = reference.philox_uniform_counters(seed, counters.cpu())
    got = torch.ops.mim_fast.philox_uniform(counters, seed).cpu()
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))
    a = mim_fast.philox_uniform(seed, 5, (300, 7), device="cuda", backend="cuda").cpu()
    assert torch.equal(a, reference.philox_uniform(seed, 5, (300, 7)))
    torch.library.opcheck(torch.ops.mim_fast.philox_uniform.default, (counters[:1000], seed))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(seed=-1, offset=0, shape=(3,)), ValueError, "seed must be in"),
    (dict(seed=2**63, offset=0, shape=(3,)), ValueError, "seed must be in"),
    (dict(seed=1.5, offset=0, shape=(3,)), TypeError, "seed must be a Python int"),
    (dict(seed=1, offset=-5, shape=(3,)), ValueError, "offset must be in"),
    (dict(seed=1, offset=2**63 - 2, shape=(3,)), ValueError, "offset \\+ numel"),
    (dict(seed=1, offset=0, shape=(3, -1)), ValueError, "shape must be"),
])
def test_philox_uniform_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        mim_fast.philox_uniform(**kwargs)


def test_explicit_backend_that_cannot_serve_says_why():
    with pytest.raises(mim_fast.BackendUnavailableError, match="'cuda' cannot run here"):
        mim_fast.philox_uniform(1, 0, (4,), device="cpu", backend="cuda")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        mim_fast.philox_uniform(1, 0, (4,), backend="fast")


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_ext)])
def test_gate_noise_is_keyed_by_sample_index(backend):
    seed, T = random.randrange(2**62), 7
    index = torch.randperm(50)[:13]
    u = mim_fast.gate_noise(seed, index, T, backend=backend)
    table = mim_fast.philox_uniform(seed, 0, (50, T), backend="torch")  # row i = sample i's noise
    assert u.shape == (13, T) and u.dtype == torch.float32
    assert torch.equal(u, table[index])
    # batch order does not matter: a shuffled batch draws the same per-sample noise
    perm = torch.randperm(13)
    assert torch.equal(mim_fast.gate_noise(seed, index[perm], T, backend=backend), u[perm])
    # and with consecutive indices it is the op's own seeded noise (offset = first index · T)
    x, logits = torch.randn(T, 4, 3), torch.randn(4, T) - 3
    a = mim_fast.purify_gate(x, logits, seed=seed, offset=10 * T)
    b = mim_fast.purify_gate(x, logits, noise=mim_fast.gate_noise(seed, torch.arange(10, 14), T, backend=backend))
    assert torch.equal(a.gate, b.gate) and torch.equal(a.pooled, b.pooled)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(seed=-1, index=torch.arange(3), T=2), ValueError, "seed must be in"),
    (dict(seed=1, index=torch.arange(3.0), T=2), TypeError, "index must be an integer tensor"),
    (dict(seed=1, index=torch.arange(6).view(2, 3), T=2), ValueError, r"index must be 1-D \(B,\)"),
    (dict(seed=1, index=torch.tensor([-1, 2]), T=2), ValueError, "index must lie in"),
    (dict(seed=1, index=torch.arange(3), T=0), ValueError, "T must be an int >= 1"),
    (dict(seed=1, index=torch.arange(3), T=2, backend="triton"), ValueError, "backend must be"),
])
def test_gate_noise_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        mim_fast.gate_noise(**kwargs)
