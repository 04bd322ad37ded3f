"""``mim-fast bench``: every op of the library against the eager reference and torch.compile, side by side.

For each case (op, pass, shape, dtype) every provider that can run on the device is timed on the same
inputs in the same process, so the ratios are measured side by side:

  eager                  the published formulation in eager PyTorch (mim_fast.reference)
  compile                torch.compile of that same function (mode "default")
  compile-max-autotune   torch.compile(mode="max-autotune-no-cudagraphs") — on a GPU only
  cpu / triton / cuda    the fused backends, where they can serve the device and dtype

Cases (the minimal bytes each moves are in the kernels' docstrings and in :func:`minimal_bytes`):

  purify_gate fwd        SPEC §1 forward: x (T, B, D) read once, pooled (B, D) written
  purify_gate fwd+bwd    forward + backward of pooled and penalty: x read twice, ∂L/∂x written once
  purify_gate fwd+bwd-logits   the same with x frozen (MIM's mask-learner update needs ∂L/∂logits only):
                         x read twice, no ∂L/∂x (--gate-passes; not in the default sweeps)
  kgs_loss fwd+bwd       SPEC §2, M = 3: h (M, B, D) read once, ∂L/∂h written once
  train_step             MIM's whole training step (SPEC §3) at the paper's D = 80, T = 50; "eager" is the
                         model with the reference ops (backend "torch"), the fused rows use that backend;
                         torch.compile is not offered for it (two autograd.grad calls and two optimizers);
                         "cuda-graphs" is the fused step (backend auto) replayed as one CUDA graph
                         (mim_fast.graphs; CUDA only)

Timing: on a GPU ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls, warm-up; median and
p20/p80 over 50 ms (--quick) or 200 ms of calls); on a CPU a repeat-and-median timer that runs the
providers of a case round-robin, one call each per round (warm-up rounds, then at least 5 rounds and
0.2 s (--quick) or 1 s per provider), so that a slow phase of a shared machine hits all of them alike.
Peak memory is the most the step held at once of what it allocated itself, from the profiler's allocation
events (frees of older buffers, e.g. the previous step's gradients, are not subtracted). %BW is GB/s over
the device-to-device copy bandwidth measured at the start of the same run.

Output: a markdown table on stdout and in OUT/bench.md, OUT/bench.json (machine, GPU, versions, commit,
time, copy bandwidth, every row), and — when matplotlib is installed — OUT/time.png (median time vs size
per provider) and OUT/roofline.png (% of copy bandwidth vs size). An error in one provider is recorded in
its row and the run goes on; the command then exits with status 1.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
OPS = ("gate", "kgs", "train")
GATE_PASSES = ("fwd", "fwd+bwd", "fwd+bwd-logits")
KGS_M = 3

# Shape sweeps, per (device type, quick). Gate: (T, B, D); KGS: (B, D) with M = 3; train step: B.
# The CPU sweep holds the CPU targets of the kernel issues (gate T=50 B=256 D=768, KGS B=4096 D=768);
# the GPU sweep the H100 ones (gate T=50 B=2048 D=768, KGS B=4096 D=768 and B=65536).
SWEEPS = {
    ("cpu", True): {"gate": [(50, 16, 80), (50, 256, 768)], "kgs": [(16, 80), (4096, 768)], "train": [16]},
    ("cpu", False): {"gate": [(50, 16, 80), (50, 64, 768), (50, 256, 768), (50, 1024, 768)],
                     "kgs": [(16, 80), (256, 768), (4096, 768), (65536, 80)], "train": [16, 256]},
    ("cuda", True): {"gate": [(50, 256, 768), (50, 2048, 768)], "kgs": [(4096, 768), (65536, 80)],
                     "train": [16, 256]},
    ("cuda", False): {"gate": [(50, 16, 80), (50, 256, 768), (50, 2048, 768), (50, 8192, 768), (500, 64, 768)],
                      "kgs": [(16, 80), (256, 768), (4096, 768), (65536, 80), (65536, 768)], "train": [16, 256]},
}


@dataclass
class Row:
    """One measured (or skipped, or failed) provider on one case."""

    op: str
    pass_: str
    shape: Dict[str, int]
    dtype: str
    provider: str
    device: str
    size: int                       # elements of the big operand (x or h; B for the training step)
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    bytes: Optional[int] = None     # minimal bytes of the case (None for the training step)
    gbps: Optional[float] = None
    pct_copy_bw: Optional[float] = None
    peak_mem_bytes: Optional[int] = None
    vs_eager: Optional[float] = None
    vs_compile: Optional[float] = None
    load1: Optional[float] = None     # the machine's 1-minute load average while the case was timed (max)
    untrusted: Optional[str] = None   # why the figure is not trustworthy (wide spread, busy machine), or None
    skipped: Optional[str] = None
    error: Optional[str] = None
    traceback: Optional[str] = None  # of the error, in the JSON only
    extra: Dict[str, float] = field(default_factory=dict)

    @property
    def case(self) -> str:
        dims = " ".join("%s=%d" % kv for kv in self.shape.items())
        return "%s %s %s %s" % (self.op, self.pass_, dims, self.dtype)


# A figure is flagged as not trustworthy when its p20-p80 spread exceeds this share of its median (quiet
# runs of the CPU VM: 1-20% for the sub-millisecond cases, 1-5% for the large ones)...
SPREAD_LIMIT = 0.30


def untrusted_reason(row: "Row", cores: int) -> Optional[str]:
    """Why a measured row's median should not be quoted, or None: a p20-p80 spread over SPREAD_LIMIT of the
    median, or — on a CPU — a load average above the core count while it was timed (more runnable threads
    than cores: the times include waiting for a core; a busy 2-core VM timed the 0.52 ms gate at 52 ms)."""
    reasons = []
    if row.median_ms and row.p20_ms is not None and row.p80_ms is not None:
        spread = (row.p80_ms - row.p20_ms) / row.median_ms
        if spread > SPREAD_LIMIT:
            reasons.append("p20-p80 spread %.0f%% of the median" % (100 * spread))
    if row.device == "cpu" and row.load1 is not None and row.load1 > cores:
        reasons.append("load %.1f on %d cores" % (row.load1, cores))
    return "; ".join(reasons) or None


# ---------------------------------------------------------------------------------------------------- bytes

def minimal_bytes(op: str, pass_: str, shape: Dict[str, int], dtype: torch.dtype) -> Optional[int]:
    """The least traffic a kernel can get away with (what GB/s and % of bandwidth are computed from).

    Gate forward: x read once + pooled written; forward+backward: x read twice + ∂L/∂x written once (+ pooled);
    "fwd+bwd-logits" (x frozen, only ∂L/∂logits wanted): x read twice (+ pooled).
    KGS: h read once + ∂L/∂h written once. (B, T)- and (M, B)-sized traffic is ignored. None for the step.
    """
    e = torch.finfo(dtype).bits // 8
    if op == "purify_gate":
        T, B, D = shape["T"], shape["B"], shape["D"]
        passes = {"fwd": 1, "fwd+bwd": 3, "fwd+bwd-logits": 2}[pass_]
        return T * B * D * e * passes + B * D * e
    if op == "kgs_loss":
        return 2 * shape["M"] * shape["B"] * shape["D"] * e
    return None


# ---------------------------------------------------------------------------------------------------- timing

def copy_bandwidth(device: str, mib: int = 512, reps: int = 20) -> dict:
    """Measured device-memory copy bandwidth, (read + write bytes) / median time of ``dst.copy_(src)``."""
    n = mib * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up, and the first touch of dst's pages on a CPU
    if device == "cuda":  # ~0.3 s of copies first: a GPU fresh from idle has not raised its clocks yet
        torch.cuda.synchronize()
        t_end = time.perf_counter() + 0.3
        while time.perf_counter() < t_end:
            for _ in range(10):
                dst.copy_(src)
            torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (%d threads)" % torch.get_num_threads()
    return {"device": name, "bytes": 2 * n * 4, "median_s": med, "copy_GBps": 2 * n * 4 / med / 1e9}


def _quantiles(times: List[float]) -> Tuple[float, float, float]:
    s = sorted(times)
    q = lambda p: s[min(len(s) - 1, int(round(p * (len(s) - 1))))]  # noqa: E731
    return q(0.5), q(0.2), q(0.8)


def time_cpu(fn: Callable[[], None], *, min_reps: int = 5, max_reps: int = 200, min_time: float = 0.3,
             warmup: int = 2) -> Tuple[float, float, float]:
    """(median, p20, p80) seconds of fn() on the host clock, after ``warmup`` calls."""
    return time_cpu_interleaved([fn], min_reps=min_reps, max_reps=max_reps, min_time=min_time, warmup=warmup)[0]


def time_cuda(fn: Callable[[], None], *, rep_ms: int = 100) -> Tuple[float, float, float]:
    """(median, p20, p80) seconds of fn() on CUDA events (triton.testing.do_bench when Triton is there)."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        med, p20, p80 = do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return med / 1e3, p20 / 1e3, p80 / 1e3
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(max(10, rep_ms // 5)):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return _quantiles(times)


def peak_memory(fn: Callable[[], None], device: str) -> Optional[int]:
    """Most bytes fn() held at once on the device of what it allocated itself (torch allocations, from the
    profiler's allocation events; the same rule on a CPU and a GPU)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    # CPU activity suffices: the CUDA caching allocator's events are recorded on the host side too
    with native_stderr_filtered(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: List[Tuple[int, int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == device:
            events.append((e.start_time_ns, e.extra_fields.alloc_size, e.extra_fields.ptr))
        stack.extend(e.children)
    # Only memory allocated inside fn counts: a free of a buffer from before (e.g. the previous step's
    # .grad, dropped at the start of this one) is not subtracted — the profiler cannot size those for
    # torch's allocator, and counting them for some allocators only would make providers incomparable.
    live: Dict[int, int] = {}
    cur = peak = 0
    for _, size, ptr in sorted(events, key=lambda ev: (ev[0], ev[1] > 0)):  # a free before a same-time reuse
        if size > 0:
            live[ptr] = size
            cur += size
            peak = max(peak, cur)
        elif ptr in live:
            cur -= live.pop(ptr)
    return peak


# Lines the profiler's native code writes straight to file descriptor 2: libkineto on every profiler start and
# stop, whatever KINETO_LOG_LEVEL says, and once per run on a machine without a GPU driver; c10 when a buffer
# from before the profiled call is freed in it (peak_memory ignores such frees on purpose, see there).
_PROFILER_NOISE = re.compile(r"^(USDT|STAGE):\S+ \S+ \S+ \S+\.cpp:\d+\]|.*gpuGetDeviceCount failed with code|"
                             r".*Memory block of unknown size was allocated before the profiling started")


@contextlib.contextmanager
def native_stderr_filtered():
    """Capture what C++ code writes to stderr (fd 2) meanwhile and pass on every line but the profiler's
    runtime chatter (``USDT: ... profiler_start`` etc.), which would land between the rows of the table."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [ln for ln in tmp.read().decode("utf-8", "replace").splitlines() if not _PROFILER_NOISE.match(ln)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()


# ---------------------------------------------------------------------------------------------------- cases

def _compiled(fn: Callable, mode: str) -> Callable:
    """torch.compile of fn for one case, with static shapes (what a training loop at a fixed shape gets);
    run_group resets dynamo's caches per case, so no earlier case's recompiles send this one to eager."""
    return torch.compile(fn, mode=mode, dynamic=False)


def _gate_eager(x, logits, noise):
    from . import reference

    return reference.purify_gate(x, logits, noise=noise, exact_math=False)


def _kgs_eager(yk, yu, y, h):
    from . import reference

    return reference.kgs_loss(yk, yu, y, h)


def _provider_fn(op: str, provider: str) -> Callable:
    import mim_fast

    eager = {"purify_gate": _gate_eager, "kgs_loss": _kgs_eager}[op]
    if provider == "eager":
        return eager
    if provider == "compile":
        return _compiled(eager, "default")
    if provider == "compile-max-autotune":
        # without inductor's CUDA graphs: with them every call would also copy its (non-parameter) inputs
        # into the graph's static buffers, traffic the op does not need, and allocate nothing we could see
        return _compiled(eager, "max-autotune-no-cudagraphs")
    if op == "purify_gate":
        return lambda x, logits, noise: mim_fast.purify_gate(x, logits, noise=noise, backend=provider)
    return lambda *a: mim_fast.kgs_loss(*a, backend=provider)


def _gate_step(provider: str, shape, dtype, device, pass_: str) -> Callable[[], None]:
    T, B, D = shape
    gen = torch.Generator().manual_seed(T * 7919 + B * 31 + D)
    x = torch.randn(T, B, D, generator=gen).to(device, dtype)
    logits = (torch.randn(B, T, generator=gen) - 3.0).to(device)  # a = g + 3 around 0: a mix of open/closed
    noise = torch.rand(B, T, generator=gen).clamp(1e-6, 1 - 1e-6).to(device)
    G = torch.randn(B, D, generator=gen).to(device, dtype)
    one = torch.ones((), device=device)
    fn = _provider_fn("purify_gate", provider)
    if pass_ == "fwd":
        def step():
            with torch.no_grad():
                fn(x, logits, noise)
        return step
    x.requires_grad_(pass_ == "fwd+bwd")  # "fwd+bwd-logits": x frozen, ∂L/∂logits only
    logits.requires_grad_()

    def step():
        x.grad = None
        logits.grad = None
        out = fn(x, logits, noise)
        torch.autograd.backward([out.pooled, out.penalty], [G, one])
    return step


def _kgs_step(provider: str, shape, dtype, device) -> Callable[[], None]:
    B, D = shape
    gen = torch.Generator().manual_seed(B * 1000 + D)
    y = torch.empty(B).uniform_(-3, 3, generator=gen)
    yk = y + torch.randn(KGS_M, B, generator=gen)
    yu = y + torch.randn(KGS_M, B, generator=gen)
    h = 2 * torch.randn(KGS_M, B, D, generator=gen)
    ins = [t.to(device, dtype).requires_grad_() for t in (yk, yu, y, h)]
    fn = _provider_fn("kgs_loss", provider)

    def step():
        for t in ins:
            t.grad = None
        fn(*ins).loss.backward()
    return step


def train_step_fn(provider: str, batch_size: int, dtype, device: torch.device) -> Callable[[], None]:
    """One call = one MIM training step (SPEC §3) at the paper's dims (D=80, T=50; text 768-d, audio 74-d,
    vision 47-d; 3 audio/vision Transformer layers) on a fixed synthetic batch; ``provider`` "eager" uses
    the reference ops (backend "torch"), anything else is the backend name; dtype picks autocast."""
    from .profile import _config, _Run  # the training step `mim-fast profile` profiles, built the same way

    amp = {torch.float32: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
    if amp is None:
        raise ValueError("the training step runs in fp32, bf16 or fp16 (autocast), not %s" % dtype)
    backend = {"eager": "torch", "cuda-graphs": "auto"}.get(provider, provider)
    cfg = _config(backend, device, batch_size=batch_size, d_model=80, seq_len=50, heads=5, av_layers=3,
                  dims=(768, 74, 47), amp=amp, seed=0)
    return _Run(provider, cfg, device, graphs=provider == "cuda-graphs").step


# ---------------------------------------------------------------------------------------------------- runner

def _providers(op: str, device: str, dtype: torch.dtype, wanted: Optional[Sequence[str]]) -> List[Tuple[str, Optional[str]]]:
    """[(provider, reason it is skipped or None)] for an op on a device."""
    from .ops import _backends

    status = _backends.backend_status("purify_gate" if op == "train_step" else op, device, (dtype,))
    out: List[Tuple[str, Optional[str]]] = [("eager", None)]
    if op != "train_step":
        out.append(("compile", None))
        if device == "cuda":
            out.append(("compile-max-autotune", None))
    for backend in ("cpu", "triton", "cuda"):
        reason = status[backend]
        if op == "train_step" and reason is None:
            kgs = _backends.backend_status("kgs_loss", device, (torch.float32,))[backend]
            reason = kgs and "kgs_loss: " + kgs
        if backend == "triton" and reason is None and device == "cpu":
            reason = "Triton under the CPU interpreter is a test vehicle: its timings mean nothing"
        out.append((backend, reason))
    if op == "train_step":  # the fused step (backend auto) replayed as one CUDA graph
        out.append(("cuda-graphs", "CUDA graphs need a CUDA device" if device != "cuda" else
                    "the captured step refuses fp16 autocast (GradScaler reads its inf check on the host)"
                    if dtype == torch.float16 else None))
    if wanted:
        out = [(p, r) for p, r in out if p in wanted]
    return out


def _cases(sweep: dict, ops: Sequence[str], dtypes: Sequence[str]):
    for dname in dtypes:
        dtype = DTYPES[dname]
        if "gate" in ops:
            for pass_ in sweep.get("gate_passes", GATE_PASSES[:2]):
                for T, B, D in sweep["gate"]:
                    yield "purify_gate", pass_, {"T": T, "B": B, "D": D}, dname, dtype, T * B * D
        if "kgs" in ops:
            for B, D in sweep["kgs"]:
                yield "kgs_loss", "fwd+bwd", {"M": KGS_M, "B": B, "D": D}, dname, dtype, KGS_M * B * D
    if "train" in ops:
        for dname in dtypes:
            if dname in ("fp32", "bf16", "fp16"):
                for B in sweep["train"]:
                    yield "train_step", "step", {"B": B, "D": 80, "T": 50}, dname, DTYPES[dname], B


def _make_step(op, pass_, shape, dtype, provider, device):
    if op == "purify_gate":
        return _gate_step(provider, (shape["T"], shape["B"], shape["D"]), dtype, device, pass_)
    if op == "kgs_loss":
        return _kgs_step(provider, (shape["B"], shape["D"]), dtype, device)
    return train_step_fn(provider, shape["B"], dtype, torch.device(device))


def time_cpu_interleaved(fns: Sequence[Callable[[], None]], *, min_reps: int = 5, max_reps: int = 200,
                         min_time: float = 0.3, warmup: int = 2) -> List[Tuple[float, float, float]]:
    """(median, p20, p80) seconds per function, timed round-robin (one call of each per round) so that a
    slow phase of a shared machine hits every provider alike instead of whichever ran during it."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: List[List[float]] = [[] for _ in fns]
    start = time.perf_counter()
    rounds = 0
    while rounds < max_reps and (rounds < min_reps or time.perf_counter() - start < min_time * len(fns)):
        for k in range(len(fns)):  # the first provider rotates: none always follows the same one
            i = (rounds + k) % len(fns)
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t0)
        rounds += 1
    return [_quantiles(ts) for ts in times]


def _record_error(row: Row) -> None:
    exc = sys.exc_info()[1]
    row.error = "%s: %s" % (type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    row.traceback = traceback.format_exc()


def run_group(op, pass_, shape, dname, dtype, size, providers: Sequence[str], device, copy_gbps, *,
              quick: bool) -> List[Row]:
    """Every provider of one case: built and warmed up (compiled) one after the other, then timed — on a
    CPU round-robin, on a GPU one after the other with CUDA events — then their peak memory."""
    torch._dynamo.reset()  # a clean compile cache per case: no earlier case's recompiles count against it
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows, live = [], []
    for provider in providers:
        row = Row(op=op, pass_=pass_, shape=dict(shape), dtype=dname, provider=provider, device=device, size=size,
                  bytes=minimal_bytes(op, pass_, shape, dtype))
        rows.append(row)
        try:
            step = _make_step(op, pass_, shape, dtype, provider, device)

            def synced(step=step):
                step()
                sync()
            synced()  # compilation, autotuning, first touch of memory
            live.append((row, step, synced))
        except Exception:  # noqa: BLE001 — recorded in the row, reported, and the exit status
            _record_error(row)
    timed = []
    load_before = os.getloadavg()[0]
    if device == "cuda":
        for row, step, synced in live:
            try:
                timed.append((row, synced, time_cuda(step, rep_ms=50 if quick else 200)))
            except Exception:  # noqa: BLE001
                _record_error(row)
    elif live:
        slow = op == "train_step" and shape["B"] > 64
        # a training step (0.1-0.5 s here) met min_time in 5 rounds, and one slow phase of the machine then
        # moved its median by 20% between runs: 10 rounds at least (~4 s at B=16, ~9 s at B=64)
        min_reps = 3 if slow else (10 if op == "train_step" else 5)
        for attempt in range(2):
            try:
                stats = time_cpu_interleaved([f for _, _, f in live], min_reps=min_reps,
                                             min_time=0.2 if quick else 1.0, warmup=1 if slow else 2)
                timed = [(row, f, st) for (row, _, f), st in zip(live, stats)]
                break
            except Exception:  # noqa: BLE001 — find the provider that failed, then time the others again
                if attempt:  # a flaky failure that no single call reproduces: report it on every row
                    for row, _, _ in live:
                        _record_error(row)
                    live = []
                    break
                survivors = []
                for row, step, f in live:
                    try:
                        f()
                        survivors.append((row, step, f))
                    except Exception:  # noqa: BLE001
                        _record_error(row)
                live = survivors
    load = max(load_before, os.getloadavg()[0])
    for row, synced, (med, p20, p80) in timed:
        row.median_ms, row.p20_ms, row.p80_ms = med * 1e3, p20 * 1e3, p80 * 1e3
        row.load1 = round(load, 2)
        try:
            row.peak_mem_bytes = peak_memory(synced, device)
        except Exception:  # noqa: BLE001
            _record_error(row)
        if row.bytes:
            row.gbps = row.bytes / med / 1e9
            row.pct_copy_bw = 100.0 * row.gbps / copy_gbps if copy_gbps else None
    return rows


def _write(out: str, rows: List[Row], meta: dict, copy: dict, sweep: dict, ops: Sequence[str], quick: bool,
           t_start: float, *, complete: bool) -> str:
    """OUT/bench.md and OUT/bench.json for the rows so far (``"complete": false`` in the JSON, and a line in
    the table, until every case has run); returns the table. The JSON names the ops the run was asked for:
    its sweep also holds the default shapes of the others."""
    _ratios(rows)
    meta["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    table = markdown(rows, meta, copy)
    if not complete:
        table += "\nIncomplete: written before every case was measured (the run was stopped, or is still running).\n"
    for name, text in (("bench.md", table), ("bench.json", json.dumps(
            {"machine": meta, "copy_bandwidth": copy, "quick": quick, "ops": list(ops), "sweep": sweep,
             "complete": complete,
             "rows": [dict(asdict(r), case=r.case) for r in rows]}, indent=1))):
        tmp = os.path.join(out, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))  # never a half-written file, whenever the run is stopped
    return table


def _ratios(rows: List[Row]) -> None:
    by_case: Dict[str, Dict[str, Row]] = {}
    for r in rows:
        by_case.setdefault(r.case, {})[r.provider] = r
    for provs in by_case.values():
        eager, comp = provs.get("eager"), provs.get("compile")
        for r in provs.values():
            if r.median_ms is None:
                continue
            if eager is not None and eager.median_ms:
                r.vs_eager = eager.median_ms / r.median_ms
            if comp is not None and comp.median_ms:
                r.vs_compile = comp.median_ms / r.median_ms


def _git_commit() -> Optional[str]:
    from .runs import git_commit

    return git_commit()


def _cpu_name() -> str:
    from .runs import cpu_name

    return cpu_name()


def machine_info(device: str) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from . import __version__

    return {
        "node": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
        "mim_fast": __version__, "commit": _git_commit(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _fmt(v, f="%.3f"):
    return "–" if v is None else f % v


def markdown(rows: List[Row], meta: dict, copy: dict) -> str:
    lines = ["mim-fast bench — %s; %s; torch %s, triton %s, CUDA %s; commit %s; %s" % (
        meta["gpu"] or meta["cpu"], "%d threads" % meta["torch_threads"], meta["torch"], meta["triton"],
        meta["cuda"], (meta["commit"] or "?")[:12], meta["time"]),
        "copy bandwidth (%s): %.1f GB/s" % (copy["device"], copy["copy_GBps"]), "",
        "| case | provider | median ms | p20–p80 ms | vs eager | vs compile | GB/s | % copy BW | peak MiB | trust |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    errors, skipped = [], {}
    for r in rows:
        if r.error:
            errors.append("- ERROR %s · %s: %s" % (r.case, r.provider, r.error))
            continue
        if r.skipped:
            skipped.setdefault((r.provider, r.skipped), []).append(r.case)
            continue
        lines.append("| %s | %s | %s | %s–%s | %s | %s | %s | %s | %s | %s |" % (
            r.case, r.provider, _fmt(r.median_ms), _fmt(r.p20_ms), _fmt(r.p80_ms),
            _fmt(r.vs_eager, "%.2f×"), _fmt(r.vs_compile, "%.2f×"), _fmt(r.gbps, "%.1f"),
            _fmt(r.pct_copy_bw, "%.0f%%"), _fmt(None if r.peak_mem_bytes is None else r.peak_mem_bytes / 2**20, "%.1f"),
            "ok" if r.untrusted is None else "⚠ " + r.untrusted))
    warning = trust_warning(rows)
    if warning:
        lines += ["", warning]
    if errors or skipped:
        lines += ["", "Not measured:"] + errors + [
            "- %s (%d case%s): %s" % (prov, len(cases), "" if len(cases) == 1 else "s", reason)
            for (prov, reason), cases in skipped.items()]
    return "\n".join(lines) + "\n"


def trust_warning(rows: List[Row]) -> Optional[str]:
    """One paragraph when some measured rows are not trustworthy (see :func:`untrusted_reason`), else None."""
    measured = [r for r in rows if r.median_ms is not None]
    bad = [r for r in measured if r.untrusted]
    if not bad:
        return None
    why = []
    spread = sum("spread" in r.untrusted for r in bad)
    busy = sum("load" in r.untrusted for r in bad)
    if spread:
        why.append("%d with a p20-p80 spread over %d%% of the median" % (spread, round(100 * SPREAD_LIMIT)))
    if busy:
        why.append("%d timed while the load average exceeded the core count" % busy)
    return ("WARNING: %d of %d figures are not trustworthy (⚠ in the trust column): %s. Rerun on an idle machine "
            "before quoting them." % (len(bad), len(measured), ", ".join(why)))


# Fixed colours and markers per provider: the same provider looks the same in every panel and plot.
PROVIDER_STYLE = {"eager": ("tab:blue", "o"), "compile": ("tab:orange", "s"), "compile-max-autotune": ("tab:brown", "D"),
                  "cpu": ("tab:green", "^"), "triton": ("tab:purple", "v"), "cuda": ("tab:red", "P"),
                  "cuda-graphs": ("tab:pink", "*")}


def _si(n: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return ("%.3g" % (n / div)) + suffix
    return "%g" % n


def plots(rows: List[Row], out_dir: str) -> List[str]:
    """time.png (median vs size per provider) and roofline.png (% of copy bandwidth); [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.ticker import NullLocator
    except ImportError:
        return []
    written = []
    panels: Dict[str, Dict[str, List[Row]]] = {}
    for r in rows:
        if r.median_ms is not None:
            panels.setdefault("%s %s %s" % (r.op, r.pass_, r.dtype), {}).setdefault(r.provider, []).append(r)
    for name, key, ylabel in (("time.png", "median_ms", "median time per call (ms)"),
                              ("roofline.png", "pct_copy_bw", "% of measured copy bandwidth")):
        items = [(p, provs) for p, provs in panels.items()
                 if any(getattr(r, key) is not None for rs in provs.values() for r in rs)]
        if not items:
            continue
        cols = min(3, len(items))
        nrows = (len(items) + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False)
        seen = {}
        any_untrusted = False
        for ax, (panel, provs) in zip(axes.flat, items):
            sizes = set()
            for prov in sorted(provs, key=lambda p: list(PROVIDER_STYLE).index(p) if p in PROVIDER_STYLE else 99):
                rs = sorted((r for r in provs[prov] if getattr(r, key) is not None), key=lambda r: r.size)
                if not rs:
                    continue
                colour, marker = PROVIDER_STYLE.get(prov, ("black", "x"))
                xs, ys = [r.size for r in rs], [getattr(r, key) for r in rs]
                sizes.update(xs)
                seen[prov] = ax.plot(xs, ys, color=colour, marker=marker, label=prov)[0]
                bad = [(x, y) for x, y, r in zip(xs, ys, rs) if r.untrusted]
                if bad:  # an untrustworthy figure: a hollow marker
                    any_untrusted = True
                    ax.plot(*zip(*bad), ls="none", marker=marker, ms=11, mfc="white", mec=colour, zorder=3)
            train = panel.startswith("train_step")
            ax.set_xscale("log")
            if key == "median_ms" and not train:
                ax.set_yscale("log")
            ticks = sorted(sizes)
            ax.set_xticks(ticks)
            ax.set_xticklabels([("B=%d" % t) if train else _si(t) for t in ticks], fontsize=8)
            ax.xaxis.set_minor_locator(NullLocator())
            if train:  # few points, linear time axis from 0 with room above the highest marker
                top = max(getattr(r, key) for rs in provs.values() for r in rs if getattr(r, key) is not None)
                ax.set_ylim(0, 1.15 * top)
                if len(ticks) == 1:
                    ax.set_xlim(ticks[0] / 2, ticks[0] * 2)
            ax.set_title(panel, fontsize=9)
            ax.set_xlabel("batch size B (D=80, T=50)" if train else "elements of x (gate) or h (KGS)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="major", alpha=0.3)
        for ax in list(axes.flat)[len(items):]:
            ax.axis("off")
        handles = list(seen.values())
        labels = list(seen)
        if any_untrusted:
            handles.append(Line2D([], [], ls="none", marker="o", ms=9, mfc="white", mec="black"))
            labels.append("hollow: not trustworthy (see the trust column)")
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.06 if nrows == 1 else 0.035, 1, 1))
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def add_arguments(p) -> None:
    """The options of ``mim-fast bench``."""
    p.add_argument("--quick", action="store_true", help="a short sweep (a few minutes on 2 CPU cores)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    p.add_argument("--ops", default="gate,kgs,train", help="comma-separated subset of gate,kgs,train")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of %s" % ",".join(DTYPES))
    p.add_argument("--providers", help="comma-separated subset of eager,compile,compile-max-autotune,cpu,triton,cuda,"
                                       "cuda-graphs (the training step only)")
    p.add_argument("--gate-shapes", metavar="TxBxD,...", help="gate shapes instead of the sweep's, e.g. 50x256x768")
    p.add_argument("--kgs-shapes", metavar="BxD,...", help="KGS shapes (M = 3) instead of the sweep's, e.g. 4096x768")
    p.add_argument("--train-batches", metavar="B,...", help="training-step batch sizes instead of the sweep's")
    p.add_argument("--gate-passes", metavar="P,...", help="gate passes, a subset of %s (default: fwd,fwd+bwd)"
                   % ",".join(GATE_PASSES))
    p.add_argument("--out", default="runs/bench", help="folder for bench.md, bench.json and the plots")
    p.add_argument("--no-plots", action="store_true")


def _split(value: str, allowed: Sequence[str], name: str) -> List[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise ValueError("--%s: %r is not one of %s" % (name, bad[0] if bad else value, ", ".join(allowed)))
    return items


def _shapes(value: str, n: int, name: str) -> list:
    """'50x16x80,50x256x768' → [(50, 16, 80), (50, 256, 768)] (n numbers each, all ≥ 1)."""
    out = []
    for item in value.split(","):
        try:
            dims = tuple(int(v) for v in item.strip().lower().split("x"))
        except ValueError:
            dims = ()
        if len(dims) != n or min(dims) < 1:
            raise ValueError("--%s: %r is not %d positive integers joined by 'x'" % (name, item, n))
        out.append(dims if n > 1 else dims[0])
    return out


def main(args) -> int:
    try:
        ops = _split(args.ops, OPS, "ops")
        dtypes = _split(args.dtypes, list(DTYPES), "dtypes")
        providers = (_split(args.providers, ["eager", "compile", "compile-max-autotune", "cpu", "triton", "cuda",
                                             "cuda-graphs"],
                            "providers") if args.providers else None)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        sweep = dict(SWEEPS[(device, args.quick)])
        if args.gate_shapes:
            sweep["gate"] = _shapes(args.gate_shapes, 3, "gate-shapes")
        if args.kgs_shapes:
            sweep["kgs"] = _shapes(args.kgs_shapes, 2, "kgs-shapes")
        if args.train_batches:
            sweep["train"] = _shapes(args.train_batches, 1, "train-batches")
        if args.gate_passes:
            sweep["gate_passes"] = _split(args.gate_passes, list(GATE_PASSES), "gate-passes")
    except ValueError as exc:
        print("mim-fast bench: error: %s" % exc, file=sys.stderr)
        return 2
    if device == "cuda" and not torch.cuda.is_available():
        print("mim-fast bench: error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    # inductor imports cpp_extension, which warns "No CUDA runtime is found, using CUDA_HOME=..." on a machine
    # without a GPU driver: irrelevant to the timings, and it would land between the rows
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    meta = machine_info(device)
    copy = copy_bandwidth(device)
    print("copy bandwidth (%s): %.1f GB/s" % (copy["device"], copy["copy_GBps"]), flush=True)
    rows: List[Row] = []
    t_start = time.perf_counter()
    for op, pass_, shape, dname, dtype, size in _cases(sweep, ops, dtypes):
        runnable = []
        for provider, reason in _providers(op, device, dtype, providers):
            if reason:
                rows.append(Row(op=op, pass_=pass_, shape=dict(shape), dtype=dname, provider=provider, device=device,
                                size=size, skipped=reason))
            else:
                runnable.append(provider)
        for row in run_group(op, pass_, shape, dname, dtype, size, runnable, device, copy["copy_GBps"],
                             quick=args.quick):
            rows.append(row)
            if row.median_ms is not None:
                row.untrusted = untrusted_reason(row, os.cpu_count() or 1)
            print("  %-44s %-21s %s" % (row.case, row.provider, "ERROR " + row.error if row.error else
                                        "%10.3f ms%s" % (row.median_ms, "  ⚠ " + row.untrusted if row.untrusted
                                                         else "")), flush=True)
        # after every case, so a run stopped by a time limit (benchmarks/gpu_check.sh) keeps what it measured
        _write(args.out, rows, meta, copy, sweep, ops, args.quick, t_start, complete=False)
    table = _write(args.out, rows, meta, copy, sweep, ops, args.quick, t_start, complete=True)
    print()
    print(table)
    warning = trust_warning(rows)
    if warning:
        print(warning, file=sys.stderr)
    written = [] if args.no_plots else plots(rows, args.out)
    print("wrote %s" % ", ".join([os.path.join(args.out, "bench.md"), os.path.join(args.out, "bench.json")] + written))
    return 1 if any(r.error for r in rows) else 0
