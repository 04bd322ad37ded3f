"""The float32 gate math (kernels/mim_math.h) is implemented three times — C++/CUDA, Triton, torch —
as the same sequence of IEEE operations. Here: bit-identity between them and accuracy against float64."""
import numpy as np
import pytest
import torch

import mim_fast
from mim_fast import reference
from mim_fast.ops import _backends

FNS = {"exp": reference.exp32, "log": reference.log32, "sigmoid": reference.sigmoid32, "tanh": reference.tanh32}
TRUE = {"exp": torch.exp, "log": torch.log, "sigmoid": torch.sigmoid, "tanh": torch.tanh}
MAX_ULP = {"exp": 1.5, "log": 2.0, "sigmoid": 3.0, "tanh": 2.0}
SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.55, -0.55, 1e-6, 1 - 1e-6, 87.0, -87.0, 88.0, -88.0, 88.5, -87.5, 1e-30, 1e30,
           -1e30, float("inf"), -float("inf"), float("nan"), 3.4e38, 1.17549435e-38]


def _inputs(fn):
    if fn == "log":
        pos = torch.cat([torch.rand(100_000) * (1 - 2e-6) + 1e-6, torch.logspace(-37, 38, 20_000)])
        return torch.cat([pos, torch.tensor(SPECIAL)]).float()
    r = torch.cat([torch.randn(50_000) * 4, (torch.rand(50_000) - 0.5) * 200, torch.randn(10_000) * 1e-3])
    return torch.cat([r, torch.tensor(SPECIAL)]).float()


def _same_bits(a, b):
    # NaN payloads may differ; every other value must match bit for bit
    both_nan = torch.isnan(a) & torch.isnan(b)
    return bool(((a.view(torch.int32) == b.view(torch.int32)) | both_nan).all())


@pytest.mark.skipif(mim_fast.build_info() is None, reason="mim_fast._C not built")
@pytest.mark.parametrize("fn", list(FNS))
def test_cpp_math_bit_identical_to_torch(fn):
    x = _inputs(fn)
    assert _same_bits(torch.ops.mim_fast._math32(x, fn), FNS[fn](x))


try:
    import triton
    import triton.language as tl

    from mim_fast.triton import _math

    @triton.jit
    def _apply_kernel(x_ptr, out_ptr, n, FN: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        v = tl.load(x_ptr + i, mask=m, other=1.0)
        if FN == 0:
            r = _math.exp32(v)
        elif FN == 1:
            r = _math.log32(v)
        elif FN == 2:
            r = _math.sigmoid32(v)
        else:
            r = _math.tanh32(v)
        tl.store(out_ptr + i, r, mask=m)
except ImportError:  # triton is optional
    triton = None


@pytest.mark.triton
@pytest.mark.parametrize("fn", list(FNS))
def test_triton_math_bit_identical_to_torch(fn):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    reason = _backends.needs_triton(torch.device(dev), ())
    if reason:
        pytest.skip(reason)
    x = _inputs(fn).to(dev)
    out = torch.empty_like(x)
    block = 1024 if dev == "cuda" else 1 << 17
    _apply_kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), FN=list(FNS).index(fn), BLOCK=block,
                                                    enable_fp_fusion=False)
    assert _same_bits(out.cpu(), FNS[fn](x.cpu()))


@pytest.mark.cuda
def test_torch_math_bit_identical_on_cuda_and_cpu():
    for fn, f in FNS.items():
        x = _inputs(fn)
        assert _same_bits(f(x.cuda()).cpu(), f(x)), fn


@pytest.mark.parametrize("fn", list(FNS))
def test_accuracy_against_float64(fn):
    x = _inputs(fn)
    got = FNS[fn](x).double()
    true = TRUE[fn](x.double())
    finite = torch.isfinite(true) & (true.abs() > 1e-37)  # normal results (exp32 flushes below e^-87)
    if fn == "log":
        finite &= x >= 1.17549435e-38  # log32 takes normal inputs
    if fn == "exp":
        finite &= (x >= -87) & (x <= 88)
    ulp = torch.from_numpy(np.spacing(np.abs(true[finite].float().numpy()))).double()
    err = ((got[finite] - true[finite]).abs() / ulp).max()
    assert err <= MAX_ULP[fn], float(err)


def test_special_values():
    inf, nan = float("inf"), float("nan")
    e = reference.exp32(torch.tensor([nan, inf, -inf, 88.5, -90.0, 0.0]))
    assert torch.isnan(e[0]) and e[1] == inf and e[2] == 0 and e[3] == inf and e[4] == 0 and e[5] == 1
    lg = reference.log32(torch.tensor([nan, inf, 0.0, -1.0, 1.0]))
    assert torch.isnan(lg[0]) and lg[1] == inf and lg[2] == -inf and torch.isnan(lg[3]) and lg[4] == 0
    s = reference.sigmoid32(torch.tensor([inf, -inf, 0.0, nan]))
    assert s[0] == 1 and s[1] == 0 and s[2] == 0.5 and torch.isnan(s[3])
    t = reference.tanh32(torch.tensor([inf, -inf, 0.0, nan, 30.0, -30.0]))
    assert t[0] == 1 and t[1] == -1 and t[2] == 0 and torch.isnan(t[3]) and t[4] == 1 and t[5] == -1


@pytest.mark.skipif(mim_fast.build_info() is None, reason="mim_fast._C not built")
def test_cpu_feature_tanh_accuracy_and_special_values():
    """The CPU feature passes' tanh (mim_math.h tanh_rational32, not a gate function): within 7 ulp of
    float64 tanh (6.9 measured over every finite float, kernels/mim_math.h), on a sweep of every 2^12-th
    float32 of each sign plus random values; odd, ±0 and ±inf and NaN right."""
    bits = torch.arange(0, 0x7F800000, 4096, dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = torch.cat([bits, -bits, torch.randn(200_000) * 3, torch.tensor(SPECIAL, dtype=torch.float32)])
    got = torch.ops.mim_fast._math32(x, "tanh_features")
    true = torch.tanh(x.double())
    normal = true.abs() > 1.17549435e-38
    ulp = torch.from_numpy(np.spacing(np.abs(true[normal].float().numpy()))).double()
    err = ((got[normal].double() - true[normal]).abs() / ulp).max()
    assert err <= 7.0, float(err)
    assert _same_bits(got, -torch.ops.mim_fast._math32(-x, "tanh_features"))  # odd, bit for bit
    s = torch.ops.mim_fast._math32(torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan")]),
                                   "tanh_features")
    assert s[0] == 0 and not s[0].signbit() and s[1] == 0 and s[1].signbit()
    assert abs(float(s[2]) - 1) < 1e-6 and abs(float(s[3]) + 1) < 1e-6 and torch.isnan(s[4])


@pytest.mark.skipif(mim_fast.build_info() is None, reason="mim_fast._C not built")
def test_cpu_feature_tanh_grad_is_accurate_where_one_minus_tanh_squared_cancels():
    """φ' of the CPU feature passes (mim_math.h sech2_32): within 5 ulp of float64 sech² in *relative*
    terms at every |y| up to 43 (1 − tanh² in float32 loses them above |y| ≈ 2), exactly 1 at 0, exactly
    0 from |y| > 43 and at ±inf (so an infinite feature gives 0·inf = NaN where torch's 1 − tanh² does),
    NaN for NaN, even."""
    bits = torch.arange(0, 0x422C0000, 1024, dtype=torch.int64).to(torch.int32).view(torch.float32)  # [0, 43]
    x = torch.cat([bits, -bits, torch.randn(100_000) * 4])
    got = torch.ops.mim_fast._math32(x, "tanh_grad_features").double()
    true = 1 / torch.cosh(x.double()) ** 2
    normal = true > 1.17549435e-38
    ulp = torch.from_numpy(np.spacing(np.abs(true[normal].float().numpy()))).double()
    err = ((got[normal] - true[normal]).abs() / ulp).max()
    assert err <= 5.0, float(err)
    s = torch.ops.mim_fast._math32(torch.tensor([0.0, -0.0, 43.5, -60.0, float("inf"), -float("inf"), float("nan")]),
                                   "tanh_grad_features")
    assert s[0] == 1 and s[1] == 1 and (s[2:6] == 0).all() and torch.isnan(s[6])
