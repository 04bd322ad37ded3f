"""Compile every Triton kernel specialization of mim_fast for sm_90 (the H200), on a machine with no GPU.

The CPU tests run the Triton kernels under the interpreter, which accepts code that the real compiler
rejects (and uses other tile sizes). This script drives the real launchers (mim_fast/triton/*.py) with
fake CUDA tensors (FakeTensorMode: shapes, strides and dtypes, no memory) over the shapes, dtypes and
options the GPU tests and benchmarks use, with a stand-in Triton driver that reports an sm_90 device and
turns every launch into a compile (``warmup``): Triton's own front end, LLVM and its bundled ptxas build
each cubin, nothing runs. Registers, shared memory, stack frame and spills of each come from ptxas's own
-v log of that compile.

    python benchmarks/triton_compile_sm90.py [--out DIR] [--quick]

Writes DIR/triton_sm90.md and DIR/triton_sm90.json; exit 1 if any specialization fails to compile (or
ptxas's log could not be read), 2 if Triton is missing. Spills are reported, per specialization, not
failed: the CUDA kernels are held to no spill (benchmarks/ptxas_report.py), the Triton backend is the
portable fallback and its tile sizes are tuned on the GPU.
"""
import os

import tempfile  # noqa: E402

os.environ["TRITON_INTERPRET"] = "0"  # the real compiler, before triton is imported
# A cache of its own: a kernel found in the cache is not compiled, and ptxas's log (registers, spills)
# comes only from a compile.
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="mim_fast_triton_sm90_")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402

TARGET = (90, 32)  # compute capability 9.0, warp size 32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _install_stand_in_driver():
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime.driver import driver

    class StandInSM90(DriverBase):
        """Answers what the JIT asks before compiling (device 0, stream 0, target sm_90); launches never
        reach it (every run is a warmup)."""

        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError("the stand-in driver builds no launcher")

        def get_current_target(self):
            return GPUTarget("cuda", *TARGET)

        def get_active_torch_device(self):
            return torch.device("cuda", 0)

        def get_benchmarker(self):
            raise NotImplementedError("nothing runs on the stand-in driver")

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    driver.set_active(StandInSM90())


class _Pointer:
    """What Triton's argument specialization reads from a tensor: its dtype and its address (for the
    16-byte alignment specialization; a fake tensor's base is taken as aligned, its offset counts)."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._address = 0 if (t.storage_offset() * t.element_size()) % 16 == 0 else t.element_size()

    def data_ptr(self):
        return self._address


class Recorder:
    """Patches JITFunction.run: every launch compiles (once per specialization) and is recorded."""

    def __init__(self):
        self.kernels = {}   # (kernel name, cache key) -> record
        self.failures = []  # (kernel name, call description, traceback)
        self.context = ""

    @contextlib.contextmanager
    def patched(self):
        from triton.runtime.jit import JITFunction

        original = JITFunction.run
        recorder = self

        def run(jit, *args, grid, warmup, **kwargs):
            args = [_Pointer(a) if isinstance(a, torch.Tensor) else a for a in args]
            name = jit.fn.__name__
            t0 = time.perf_counter()
            log = io.StringIO()
            try:
                with contextlib.redirect_stdout(log):  # the ptxas -v log of a fresh compile
                    kernel = original(jit, *args, grid=grid, warmup=True, **kwargs)
            except Exception:  # noqa: BLE001 — a compile error is the finding; record and go on
                recorder.failures.append((name, recorder.context, traceback.format_exc()))
                raise _CompileFailed()
            key = (name, kernel.hash if hasattr(kernel, "hash") else id(kernel))
            if key not in recorder.kernels:
                constexprs = {k: v for k, v in kwargs.items() if k.isupper()}
                recorder.kernels[key] = {"kernel": name, "constexprs": constexprs, "compile_s": time.perf_counter() - t0,
                                         "first_call": recorder.context, **_resources(log.getvalue()),
                                         # Triton's shared memory is dynamic: its size is in the metadata
                                         "smem_bytes": getattr(kernel.metadata, "shared", None)}
            return kernel

        JITFunction.run = run
        try:
            yield
        finally:
            JITFunction.run = original


class _CompileFailed(Exception):
    pass


_USED = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _resources(ptxas_log: str) -> dict:
    """Registers, stack frame and spills from the ptxas -v log of one compile (Triton runs
    ptxas with -v itself and prints the log when knobs.nvidia.dump_ptxas_log is set)."""
    out = {"registers": None, "stack_bytes": None, "spill_stores": None, "spill_loads": None}
    m = _USED.search(ptxas_log)
    if m:
        out["registers"] = int(m.group(1))
    m = _FRAME.search(ptxas_log)
    if m:
        out["stack_bytes"], out["spill_stores"], out["spill_loads"] = map(int, m.groups())
    return out


# ---------------------------------------------------------------------------------------------------- the calls
# The shapes of the GPU tests (tests/test_purify_gate.py, test_kgs_loss.py, test_gpu_paths.py,
# test_cuda_graphs.py) and of the GPU benchmarks (mim_fast.bench's CUDA sweeps, gpu_check.sh).
GATE_SHAPES = [(1, 1, 1), (7, 3, 5), (50, 2, 129), (3, 2, 1030), (9, 4, 33), (11, 3, 70), (6, 3, 16), (50, 3, 264),
               (50, 16, 80), (50, 256, 768), (50, 2048, 768), (500, 64, 768)]
GATE_FULL = [(7, 3, 5), (50, 2048, 768)]  # every option combination on these
KGS_SHAPES = [(3, 4, 5), (3, 7, 19), (3, 64, 80), (2, 1, 1), (5, 17, 1030), (3, 6, 1500), (3, 5, 3000), (3, 16, 80),
              (3, 4096, 768), (3, 65536, 80)]
KGS_FULL = [(3, 7, 19), (3, 4096, 768)]


def _variations(base: dict, alternatives: dict):
    """The base option set, then each option changed alone to each other value (one factor at a time: every
    value of every option is compiled, without the full product — each option is its own constexpr branch)."""
    yield dict(base)
    for name, values in alternatives.items():
        for v in values:
            if v != base[name]:
                yield dict(base, **{name: v})


GATE_BASE = dict(mode="sample", noise=False, lengths=False, act="tanh", batch_first=False)
GATE_ALTERNATIVES = dict(mode=("expected",), noise=(True,), lengths=(True,), act=("relu", "identity"),
                         batch_first=(True,))


def gate_calls(quick: bool):
    from mim_fast.triton import purify_gate as tg

    shapes = GATE_FULL if quick else GATE_SHAPES
    for (T, B, D), dname in itertools.product(shapes, DTYPES):
        dtype = DTYPES[dname]
        variations = _variations(GATE_BASE, GATE_ALTERNATIVES) if (T, B, D) in GATE_FULL else [GATE_BASE]
        for o in variations:
            desc = "gate T%d B%d D%d %s %s" % (T, B, D, dname, " ".join("%s=%s" % kv for kv in o.items()))

            def call(T=T, B=B, D=D, dtype=dtype, o=o):
                x = torch.empty((B, T, D) if o["batch_first"] else (T, B, D), dtype=dtype, device="cuda")
                xs = x.transpose(0, 1) if o["batch_first"] else x
                logits = torch.empty(B, T, device="cuda")
                u = torch.empty(B, T, device="cuda") if o["noise"] else None
                lens = torch.empty(B, dtype=torch.int64, device="cuda") if o["lengths"] else None
                out = tg.purify_gate_forward(xs, logits, u, lens, 3, 0, o["mode"], o["act"], 3.0, 1 / 3, 1.2, -0.2,
                                             0.6, -0.5)
                for needs_x in (True, False):
                    tg.purify_gate_backward(torch.empty(B, D, dtype=dtype, device="cuda"), torch.empty((), device="cuda"),
                                            xs, out[2], out[3], out[4], out[5], lens, o["act"], needs_x)
            yield desc, call


KGS_BASE = dict(per_sample=True, reduction="mean", divide_T=False, grads=(True, True))
KGS_ALTERNATIVES = dict(per_sample=(False,), reduction=("sum", "none"), divide_T=(True,),
                        grads=((False, True), (True, False), (False, False)))
# which incoming gradients (loss, intra, inter, masked, unmasked) the backward sees
KGS_BACKWARD_PRESENT = ((True, False, False, False, False), (False, True, True, True, True),
                        (False, False, True, False, False), (True, True, True, True, True))


def kgs_calls(quick: bool):
    from mim_fast.triton import kgs_loss as tk

    shapes = KGS_FULL if quick else KGS_SHAPES
    for (M, B, D), dname in itertools.product(shapes, DTYPES):
        dtype = DTYPES[dname]
        full = (M, B, D) in KGS_FULL
        variations = _variations(KGS_BASE, KGS_ALTERNATIVES) if full else [KGS_BASE, dict(KGS_BASE, per_sample=False)]
        for o in variations:
            desc = "kgs M%d B%d D%d %s %s" % (M, B, D, dname, " ".join("%s=%s" % kv for kv in o.items()))

            def call(M=M, B=B, D=D, dtype=dtype, o=o, full=full):
                grad_preds, grad_h = o["grads"]
                yk, yu, y = (torch.empty(M, B, dtype=dtype, device="cuda"), torch.empty(M, B, dtype=dtype, device="cuda"),
                             torch.empty(B, dtype=dtype, device="cuda"))
                h = torch.empty(M, B, D, dtype=dtype, device="cuda")
                w = [1.0, 1.0, 1.0, 1.0]
                args = (o["per_sample"], 10.0, o["divide_T"], w, o["reduction"], 1e-12, grad_preds, grad_h)
                out = tk.kgs_loss_forward(yk, yu, y, h, *args)
                hm, hu = torch.empty(M, B, D, dtype=dtype, device="cuda"), torch.empty(M, B, D, dtype=dtype, device="cuda")
                weight, bias = torch.empty(M, D, dtype=dtype, device="cuda"), torch.empty(M, dtype=dtype, device="cuda")
                hout = tk.kgs_loss_heads_forward(hm, hu, weight, bias, y, *args)
                if not (grad_preds or grad_h):
                    return
                g = torch.empty(B, device="cuda") if o["reduction"] == "none" else torch.empty((), device="cuda")
                for present in (KGS_BACKWARD_PRESENT if full and o == KGS_BASE else KGS_BACKWARD_PRESENT[-1:]):
                    grads = [g if p else None for p in present]
                    tk.kgs_loss_backward(*grads, out[7], out[8], w, dtype, dtype, dtype)
                    needs = [grad_h, grad_preds, grad_preds, grad_preds, grad_preds]
                    tk.kgs_loss_heads_backward(*grads, hout[7], hout[8], hm, hu, weight, w, needs, dtype, dtype)
            yield desc, call
    # the chunked feature path at a test's own tile width (tests/test_kgs_loss.py, block_d=256)
    for M, B, D in ((3, 6, 1500), (3, 5, 700)):
        def call(M=M, B=B, D=D):
            t = [torch.empty(M, B, device="cuda"), torch.empty(M, B, device="cuda"), torch.empty(B, device="cuda"),
                 torch.empty(M, B, D, device="cuda")]
            tk.kgs_loss_forward(*t, True, 10.0, False, [1.0] * 4, "none", 1e-12, True, True, block_d=256)
            tk.kgs_loss_heads_forward(t[3], t[3], torch.empty(M, D, device="cuda"), torch.empty(M, device="cuda"), t[2],
                                      True, 10.0, False, [1.0] * 4, "none", 1e-12, False, False, block_d=256)
        yield "kgs M%d B%d D%d fp32 chunked block_d=256" % (M, B, D), call


def philox_calls(quick: bool):
    from mim_fast.triton import philox as tp

    for n in (1, 100, 3000, 1 << 20):
        yield "philox n=%d" % n, lambda n=n: tp.philox_uniform_counters(torch.empty(n, dtype=torch.int64, device="cuda"), 5)


def run(quick: bool):
    from torch._subclasses.fake_tensor import FakeTensorMode

    import mim_fast.triton.kgs_loss
    import mim_fast.triton.philox
    import mim_fast.triton.purify_gate

    for mod in (mim_fast.triton.kgs_loss, mim_fast.triton.philox, mim_fast.triton.purify_gate):
        mod.device_guard = lambda device: contextlib.nullcontext()  # torch.cuda.device needs a driver
    import triton

    _install_stand_in_driver()
    triton.knobs.nvidia.dump_ptxas_log = True
    rec = Recorder()
    calls = 0
    with rec.patched():
        for gen in (gate_calls, kgs_calls, philox_calls):
            for desc, call in gen(quick):
                rec.context = desc
                calls += 1
                try:
                    with FakeTensorMode():
                        call()
                except _CompileFailed:
                    pass
    return rec, calls


def markdown(rec: "Recorder", calls: int, elapsed: float) -> str:
    import triton

    rows = sorted(rec.kernels.values(), key=lambda r: (r["kernel"], -(r["registers"] or 0)))
    lines = ["Triton %s, target sm_%d: %d launcher calls, %d distinct specializations compiled in %.0f s, %d failed."
             % (triton.__version__, TARGET[0], calls, len(rows), elapsed, len(rec.failures)), "",
             "| kernel | specializations | registers (min–max) | max shared B | max stack B | max spill stores B |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, group in itertools.groupby(rows, key=lambda r: r["kernel"]):
        group = list(group)
        regs = [r["registers"] for r in group if r["registers"] is not None]
        lines.append("| `%s` | %d | %s | %s | %s | %s |" % (
            name, len(group), "%d–%d" % (min(regs), max(regs)) if regs else "?",
            max((r["smem_bytes"] or 0) for r in group), max((r["stack_bytes"] or 0) for r in group),
            max((r["spill_stores"] or 0) for r in group)))
    spilling = sorted((r for r in rows if r["spill_stores"] or r["spill_loads"]), key=lambda r: -r["spill_stores"])
    if spilling:
        lines += ["", "Specializations that spill (registers, spill stores/loads in bytes, first launched by):", "",
                  "| kernel | registers | spill stores B | spill loads B | first launched by |", "|---|---:|---:|---:|---|"]
        lines += ["| `%s` | %d | %d | %d | %s |" % (r["kernel"], r["registers"], r["spill_stores"], r["spill_loads"],
                                                    r["first_call"]) for r in spilling]
    for name, desc, tb in rec.failures:
        lines += ["", "FAILED `%s` (first seen in: %s):" % (name, desc), "```", tb.strip()[-3000:], "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "triton_sm90"))
    p.add_argument("--quick", action="store_true", help="only the fully-optioned shapes (a smoke run)")
    args = p.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton_compile_sm90: triton is not installed", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rec, calls = run(args.quick)
    elapsed = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    table = markdown(rec, calls, elapsed)
    with open(os.path.join(args.out, "triton_sm90.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "triton_sm90.json"), "w") as f:
        json.dump({"target": "sm_%d" % TARGET[0], "calls": calls, "elapsed_s": round(elapsed, 1),
                   "kernels": list(rec.kernels.values()),
                   "failures": [{"kernel": n, "call": d, "traceback": t} for n, d, t in rec.failures]}, f, indent=1,
                  default=str)
    print(table)
    unread = [r for r in rec.kernels.values() if r["registers"] is None]
    if unread:
        print("triton_compile_sm90: no ptxas log for %d specializations (e.g. %s)" % (len(unread), unread[0]["kernel"]),
              file=sys.stderr)
        return 1
    return 1 if rec.failures else 0


if __name__ == "__main__":
    sys.exit(main())
