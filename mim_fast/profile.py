"""``mim-fast profile``: torch.profiler traces of MIM's training step, eager vs fused.

For each mode ("eager": backend="torch", the reference ops; "fused": backend="auto"; or any explicit
backend) this builds the model and optimizers of :mod:`mim_fast.train` on a synthetic batch, runs
``--warmup`` steps, times ``--steps`` unprofiled steps (the modes alternate step by step, so that load on a
shared machine hits both alike), then profiles ``--steps`` more with the named ranges of
:mod:`mim_fast.profiling` on (and NVTX on CUDA). It writes ``trace_<mode>.json`` (Chrome trace: open in
https://ui.perfetto.dev or chrome://tracing) and ``summary.json`` to ``--out``, and prints per mode:

* the top ops by self time: CPU operators on a CPU run, CUDA kernels on a GPU run;
* the time per named range, with each backward autograd node charged to the forward range whose op
  created it (matched by the autograd sequence number), so "mim/gate/text" is the gate's forward and
  backward;
* launches per step: on CUDA the kernel-launch API calls (cudaLaunchKernel, cuLaunchKernel, ...) and the
  kernels that ran; on CPU, where nothing is launched, the operator calls (aten::, mim_fast::) as the
  analogue — all of them, and the leaves (those that call no other operator);
* the share of the step spent in the two ops mim_fast fuses (gate and KGS loss) and the Amdahl bound on
  the whole step's speed-up if they took no time at all;

and a side-by-side line, eager vs fused. The step is :func:`mim_fast.train.train_step` itself.
"""
import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections import defaultdict
from typing import Dict, List, Optional

import torch

from . import profiling
from . import train as train_lib

__all__ = ["add_arguments", "main", "profile", "summarize_events", "MODES"]

# mode label -> backend
MODES = {"eager": "torch", "fused": "auto", "torch": "torch", "cpu": "cpu", "cuda": "cuda", "triton": "triton",
         "auto": "auto"}
# The two ops mim_fast fuses: their ranges, forward and backward, are what fusing can speed up.
FUSED_RANGES = ("mim/gate/", "mim/kgs_loss")
_UNRANGED_BACKWARD = "(backward of unranged ops)"
_BACKWARD_NODE = "autograd::engine::evaluate_function: "
_STEP = "ProfilerStep"  # "ProfilerStep*" in prof.events(), "ProfilerStep#<n>" in the trace
# Host-side calls that put work on a CUDA stream (runtime and driver API; Triton uses the driver's).
_LAUNCH_PREFIXES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchCooperativeKernel", "cudaGraphLaunch",
                    "cudaLaunchHostFunc")


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("must be an integer >= %d; got %r" % (minimum, text)) from None
        if value < minimum:
            raise argparse.ArgumentTypeError("must be an integer >= %d; got %r" % (minimum, text))
        return value
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``mim-fast profile``."""
    p.add_argument("--backend", nargs="+", default=["eager", "fused"], choices=list(MODES), metavar="MODE",
                   help="modes to profile: eager (backend torch, the reference ops), fused (backend auto), or "
                        "an explicit backend (torch, cpu, cuda, triton, auto); default: eager fused")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when present)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=16, help="B (default 16, as MIM)")
    p.add_argument("--steps", type=_int_at_least(1), default=5, help="profiled steps, and as many timed ones "
                                                                      "without the profiler (default 5)")
    p.add_argument("--warmup", type=_int_at_least(0), default=3, help="steps before timing (default 3)")
    p.add_argument("--d-model", type=_int_at_least(2), default=80, help="D (default 80, as MIM)")
    p.add_argument("--seq-len", type=_int_at_least(1), default=50, help="T of every modality (default 50, as MIM)")
    p.add_argument("--heads", type=_int_at_least(1), default=5, help="attention heads (default 5)")
    p.add_argument("--av-layers", type=_int_at_least(0), default=3,
                   help="Transformer layers of the audio/vision encoders (default 3, as MIM)")
    p.add_argument("--dims", type=_int_at_least(1), nargs=3, default=[768, 74, 47], metavar=("TEXT", "AUDIO", "VISION"),
                   help="input feature widths (default 768 74 47: MOSI with BERT features)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_int_at_least(1),
                   help="CPU threads (torch.set_num_threads; default: torch's). On a loaded machine 1 thread "
                        "avoids OpenMP threads waiting on each other")
    p.add_argument("--top", type=_int_at_least(1), default=15, help="rows of the top-ops table (default 15)")
    p.add_argument("--out", default="runs/profile",
                   help="folder for trace_<mode>.json and summary.json (existing files are replaced)")


def main(args) -> int:
    """Run ``mim-fast profile`` from parsed arguments; returns the exit status."""
    prog = "mim-fast profile"
    try:
        device = train_lib._device(args.device)
    except RuntimeError as exc:
        print("%s: error: argument --device: %s" % (prog, exc), file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("%s: error: argument --device: %r: CUDA is not available here" % (prog, args.device), file=sys.stderr)
        return 2
    modes = list(dict.fromkeys(args.backend))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        summary = profile(modes, device=device, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                          d_model=args.d_model, seq_len=args.seq_len, heads=args.heads, av_layers=args.av_layers,
                          dims=args.dims, amp=args.amp, seed=args.seed, out=args.out)
    except (ValueError, TypeError, RuntimeError) as exc:  # bad dims, an unavailable backend, ...
        print("%s: error: %s" % (prog, exc), file=sys.stderr)
        return 2
    print(report(summary, top=args.top))
    return 0


def _config(backend: str, device: torch.device, *, batch_size, d_model, seq_len, heads, av_layers, dims, amp, seed):
    # MIM's published step (its routing, penalty, mask_ratio, ...) at the requested dims. The eager mode
    # (backend "torch") is what a user of the published code runs: the reference ops, torch's dropout and
    # torch's default Adam; every other mode the fused ops, the fused counter-based dropout and fused Adam.
    return train_lib.TrainConfig(
        preset="mim", out="", seed=seed, batch_size=batch_size, d_model=d_model, heads=heads, av_layers=av_layers, text_layers=0,
        amp=amp, device=str(device), backend=backend, dropout="torch" if backend == "torch" else "keyed",
        adam="default" if backend == "torch" else "fused",
        synthetic={"n_train": batch_size, "n_dev": 1, "n_test": 1, "T": seq_len, "dims": list(dims)})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Run:
    """One mode's model, optimizers and batch, from the same seed as every other mode's."""

    def __init__(self, label: str, config: train_lib.TrainConfig, device: torch.device, *, graphs: bool = False):
        """``graphs``: the step captured as a CUDA graph (:class:`mim_fast.graphs.CapturedStep`; the first
        call captures it, after its warm-up steps)."""
        self.label, self.config, self.device = label, config, device
        data = train_lib.load_for_training(config)
        torch.manual_seed(config.seed)
        self.model = train_lib.build_model(data, config).to(device)
        self.opt = train_lib.Optimizers(self.model, config, device, capturable=graphs)
        self.batch = next(train_lib.batches(data.train, config.batch_size, shuffle=False, device=device))
        self.noise_seed = config.seed + 1
        self.step_ms: List[float] = []
        self.captured = None
        if graphs:
            from .graphs import CapturedStep

            self.captured = CapturedStep(self.model, self.opt, config, device)

    def step(self) -> None:
        if self.captured is not None:
            self.captured(self.batch, self.noise_seed)
            return
        train_lib.train_step(self.model, self.opt, self.batch, self.config, self.noise_seed, self.device)

    def timed_step(self) -> None:
        _sync(self.device)
        t0 = time.perf_counter()
        self.step()
        _sync(self.device)
        self.step_ms.append(1e3 * (time.perf_counter() - t0))


def profile(modes, *, device: torch.device, batch_size: int = 16, steps: int = 5, warmup: int = 3, d_model: int = 80,
            seq_len: int = 50, heads: int = 5, av_layers: int = 3, dims=(768, 74, 47), amp: str = "none",
            seed: int = 0, out: Optional[str] = "runs/profile") -> dict:
    """Profile the training step in each mode (labels of :data:`MODES`); writes the traces and summary.json
    to ``out`` (when not None) and returns the summary."""
    for m in modes:
        if m not in MODES:
            raise ValueError("unknown mode %r: choose from %s" % (m, ", ".join(MODES)))
    dims = tuple(int(d) for d in dims)
    shape = dict(batch_size=batch_size, d_model=d_model, seq_len=seq_len, heads=heads, av_layers=av_layers,
                 dims=dims, amp=amp, seed=seed)
    runs = [_Run(m, _config(MODES[m], device, **shape), device) for m in modes]
    if out is not None:
        os.makedirs(out, exist_ok=True)
    for _ in range(max(warmup - 1, 0)):  # the profiler's schedule takes the last warm-up step
        for r in runs:
            r.step()
    for _ in range(steps):  # interleaved, so that a shared machine's load falls on every mode alike
        for r in runs:
            r.timed_step()
    results = {}
    for r in runs:
        events, trace = _profile_run(r, steps, warmup > 0, out)
        res = summarize_events(events, steps, device.type)
        res.update(backend=r.config.backend, trace=trace, step_ms=statistics.median(r.step_ms),
                   step_ms_all=r.step_ms)
        results[r.label] = res
    summary = {
        "command": "mim-fast profile",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device) if device.type != "cuda" else "%s (%s)" % (device, torch.cuda.get_device_name(device)),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "config": {**shape, "dims": list(dims), "steps": steps, "warmup": warmup, "modes": list(modes),
                   "fusion": runs[0].config.fusion, "optimizer": runs[0].config.optimizer},
        "counter": _counter_label(device.type),
        "modes": results,
        "comparison": _comparison(results),
    }
    if out is not None:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _profile_run(run: _Run, steps: int, profiler_warmup: bool, out: Optional[str]):
    acts = [torch.profiler.ProfilerActivity.CPU]
    if run.device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    trace = os.path.join(out, "trace_%s.json" % run.label) if out is not None else None
    captured = {}

    def ready(prof):
        with warnings.catch_warnings():  # "Profiler clears events at the end of each cycle": one cycle here
            warnings.simplefilter("ignore")
            captured["events"] = list(prof.events())
        if trace is not None:
            prof.export_chrome_trace(trace)

    schedule = torch.profiler.schedule(wait=0, warmup=1 if profiler_warmup else 0, active=steps, repeat=1)
    with profiling.enabled(nvtx=run.device.type == "cuda"), \
            torch.profiler.profile(activities=acts, schedule=schedule, on_trace_ready=ready) as prof:
        for _ in range(steps + (1 if profiler_warmup else 0)):
            run.step()
            prof.step()
    return captured["events"], trace


def _counter_label(device_type: str) -> str:
    if device_type == "cuda":
        return "kernel launches per step (cudaLaunchKernel, cuLaunchKernel, ... API calls)"
    return "operator calls per step (CPU analogue of kernel launches: aten::/mim_fast:: ops, nested included)"


def _device_us(e) -> float:
    if hasattr(e, "device_time_total"):
        return float(e.device_time_total)
    return float(getattr(e, "cuda_time_total", 0.0))  # torch < 2.4


def _is_annotation(e) -> bool:
    return e.name.startswith(profiling.RANGE_PREFIX) or e.name.startswith(_STEP) or \
        bool(getattr(e, "is_user_annotation", False))


def _enclosing_range(e) -> Optional[str]:
    p = e.cpu_parent
    while p is not None:
        if p.name.startswith(profiling.RANGE_PREFIX):
            return p.name
        p = p.cpu_parent
    return None


def summarize_events(events, steps: int, device_type: str) -> dict:
    """Per-step figures from a profile's FunctionEvents (``prof.events()``) of ``steps`` training steps:
    step time, time per named range (forward and attributed backward), top ops, launch / op-call counts."""
    cuda_t = torch.autograd.DeviceType.CUDA
    host = [e for e in events if e.device_type != cuda_t]
    device_events = [e for e in events if e.device_type == cuda_t and not _is_annotation(e)]
    n = float(steps)
    step_events = [e for e in host if e.name.startswith(_STEP)]
    step_ms = sum(e.cpu_time_total for e in step_events) / 1e3 / max(len(step_events), 1)
    on_gpu = device_type == "cuda"

    def cost(e) -> float:  # µs: device time of its kernels on a GPU run, host time on a CPU run
        return _device_us(e) if on_gpu else float(e.cpu_time_total)

    # Named ranges (host events; on a GPU run their device time is that of the kernels launched inside).
    ranges: Dict[str, Dict[str, float]] = defaultdict(lambda: {"forward_ms": 0.0, "backward_ms": 0.0, "calls": 0})
    for e in host:
        if e.name.startswith(profiling.RANGE_PREFIX):
            r = ranges[e.name]
            r["forward_ms"] += cost(e) / 1e3 / n
            r["calls"] += 1
            if on_gpu:
                r["host_ms"] = r.get("host_ms", 0.0) + e.cpu_time_total / 1e3 / n

    # Backward: charge each autograd node to the forward range of the op that created it. An op that
    # creates node N is the last one recorded with sequence number N (ops that create none record the
    # counter's next value), and only forward ops count (not those under mim/backward or mim/optimizer).
    creator = {}
    for e in host:
        seq = getattr(e, "sequence_nr", -1)
        if seq is None or seq < 0 or _is_annotation(e) or e.name.startswith(_BACKWARD_NODE):
            continue
        where = _enclosing_range(e)
        if where in ("mim/backward", "mim/optimizer"):
            continue
        key = (getattr(e, "thread", 0), seq)
        start = e.time_range.start
        if key not in creator or start >= creator[key][0]:
            creator[key] = (start, where)
    attributed = 0.0
    for e in host:
        if not e.name.startswith(_BACKWARD_NODE):
            continue
        p = e.cpu_parent
        while p is not None and not p.name.startswith(_BACKWARD_NODE):
            p = p.cpu_parent
        if p is not None:  # nested in another node: counted with it
            continue
        fwd = creator.get((getattr(e, "fwd_thread", getattr(e, "thread", 0)), e.sequence_nr))
        if fwd is None:  # no forward op (AccumulateGrad, ...): left in mim/backward as the engine's work
            continue
        name = fwd[1] if fwd[1] is not None else _UNRANGED_BACKWARD
        ms = cost(e) / 1e3 / n
        ranges[name]["backward_ms"] += ms
        if name != "mim/backward":
            attributed += ms
    if "mim/backward" in ranges:  # what is left of the backward range: the engine's own work
        b = ranges["mim/backward"]
        b["backward_ms"] = max(b["forward_ms"] - attributed, 0.0)
        b["forward_ms"] = 0.0
    for r in ranges.values():
        r["total_ms"] = r["forward_ms"] + r["backward_ms"]
        r["calls"] = r["calls"] / n

    # Top ops: CUDA kernels by device time on a GPU run, CPU operators by self time otherwise.
    top = defaultdict(lambda: [0.0, 0])
    if on_gpu:
        for e in device_events:
            if e.name.startswith("Memcpy") or e.name.startswith("Memset"):
                continue
            t = top[e.name]
            t[0] += e.time_range.elapsed_us()
            t[1] += 1
    else:
        for e in host:
            if _is_annotation(e) or e.name.startswith(_BACKWARD_NODE):
                continue
            t = top[e.name]
            t[0] += e.self_cpu_time_total
            t[1] += 1
    top_total_ms = sum(v[0] for v in top.values()) / 1e3 / n
    top_ops = [{"name": k, "self_ms": v[0] / 1e3 / n, "calls": v[1] / n}
               for k, v in sorted(top.items(), key=lambda kv: -kv[1][0])]

    res = {"profiled_step_ms": step_ms, "steps_profiled": len(step_events), "ranges": dict(ranges),
           "top_ops": top_ops[:50], "top_ops_total_ms": top_total_ms}
    if on_gpu:
        launches = [e for e in host if e.name.startswith(_LAUNCH_PREFIXES)]
        kernels = [e for e in device_events if not e.name.startswith(("Memcpy", "Memset"))]
        res["launches_per_step"] = len(launches) / n
        res["kernels_per_step"] = len(kernels) / n
        res["memcpy_memset_per_step"] = (len(device_events) - len(kernels)) / n
        res["device_ms_per_step"] = sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / n
        res["counter_per_step"] = res["launches_per_step"]
        base = res["device_ms_per_step"]
    else:
        ops = [e for e in host if not _is_annotation(e) and not e.name.startswith(_BACKWARD_NODE)
               and "::" in e.name]
        res["op_calls_per_step"] = len(ops) / n
        res["leaf_op_calls_per_step"] = sum(1 for e in ops if not any(
            "::" in c.name and not c.name.startswith(_BACKWARD_NODE) for c in e.cpu_children)) / n
        res["counter_per_step"] = res["op_calls_per_step"]
        base = step_ms
    for o in top_ops:  # of the kernel time on a GPU run, of the (profiled) step on a CPU run
        o["share"] = o["self_ms"] / base if base > 0 else 0.0
    for r in ranges.values():
        r["share"] = r["total_ms"] / base if base > 0 else 0.0
    fused = sum(r["total_ms"] for k, r in ranges.items() if k.startswith(FUSED_RANGES))
    res["fused_ops_ms"] = fused
    res["fused_ops_share"] = fused / base if base > 0 else 0.0
    res["amdahl_bound"] = 1.0 / (1.0 - res["fused_ops_share"]) if res["fused_ops_share"] < 1 else math.inf
    return res


def _comparison(results: dict) -> Optional[dict]:
    if "eager" not in results or "fused" not in results:
        return None
    e, f = results["eager"], results["fused"]
    return {"step_ms": [e["step_ms"], f["step_ms"]], "speedup": e["step_ms"] / f["step_ms"],
            "counter_per_step": [e["counter_per_step"], f["counter_per_step"]],
            "fused_ops_ms": [e["fused_ops_ms"], f["fused_ops_ms"]],
            "fused_ops_speedup": e["fused_ops_ms"] / f["fused_ops_ms"] if f["fused_ops_ms"] > 0 else None,
            "amdahl_bound_eager": e["amdahl_bound"]}


def _range_order(name: str):
    order = ["mim/gate_noise", "mim/encoder/", "mim/mask_learner/", "mim/gate/", "mim/heads", "mim/fusion",
             "mim/kgs_loss", "mim/task_loss", "mim/backward", "mim/optimizer"]
    for i, prefix in enumerate(order):
        if name.startswith(prefix):
            return (i, name)
    return (len(order), name)


def report(summary: dict, top: int = 15) -> str:
    """The printed report of a :func:`profile` summary."""
    cfg = summary["config"]
    on_gpu = summary["device"].startswith("cuda")
    lines = ["mim-fast profile: %s, torch %s, %d threads; B=%d D=%d T=%d, dims %s, %d audio/vision layers, amp %s; "
             "%d warm-up + %d timed + %d profiled steps per mode"
             % (summary["device"], summary["torch"], summary["threads"], cfg["batch_size"], cfg["d_model"],
                cfg["seq_len"], "/".join(map(str, cfg["dims"])), cfg["av_layers"], cfg["amp"], cfg["warmup"],
                cfg["steps"], cfg["steps"])]
    unit = "device ms" if on_gpu else "ms"
    for label, r in summary["modes"].items():
        lines += ["", "== %s (backend=%r) ==" % (label, r["backend"]),
                  "step: %.2f ms unprofiled (median of %d), %.2f ms profiled%s"
                  % (r["step_ms"], len(r["step_ms_all"]), r["profiled_step_ms"],
                     ", %.2f ms of kernels" % r["device_ms_per_step"] if on_gpu else "")]
        if on_gpu:
            lines.append("kernel launches per step: %.0f launch API calls, %.0f kernels, %.0f memcpy/memset"
                         % (r["launches_per_step"], r["kernels_per_step"], r["memcpy_memset_per_step"]))
        else:
            lines.append("operator calls per step (CPU analogue of kernel launches): %.0f (%.0f leaf operators)"
                         % (r["op_calls_per_step"], r["leaf_op_calls_per_step"]))
        lines.append("top %d %s by self time, per step:" % (top, "CUDA kernels" if on_gpu else "CPU ops"))
        lines.append("  %9s %6s %7s  %s" % ("self ms", "share", "calls", "name"))
        for o in r["top_ops"][:top]:
            lines.append("  %9.3f %5.1f%% %7.1f  %s" % (o["self_ms"], 100 * o["share"], o["calls"], _short(o["name"])))
        lines.append("named ranges, per step (backward: the autograd nodes of the range's ops; %s):" % unit)
        lines.append("  %-28s %9s %9s %9s %6s" % ("range", "forward", "backward", "total", "share"))
        base = r["device_ms_per_step"] if on_gpu else r["profiled_step_ms"]
        for name in sorted(r["ranges"], key=_range_order):
            g = r["ranges"][name]
            shown = "mim/backward (engine, rest)" if name == "mim/backward" else name
            lines.append("  %-28s %9.3f %9.3f %9.3f %5.1f%%" % (shown, g["forward_ms"], g["backward_ms"], g["total_ms"],
                                                             100 * g["total_ms"] / base if base else 0.0))
        covered = sum(g["total_ms"] for g in r["ranges"].values())
        if not on_gpu:
            lines.append("  %-28s %29.3f %5.1f%%" % ("(outside the ranges)", base - covered,
                                                      100 * (base - covered) / base if base else 0.0))
        lines.append("gate + KGS loss (the fused ops), forward + backward: %.3f %s = %.1f%% of the step; Amdahl "
                     "bound on the step's speed-up if they took no time: %.2fx"
                     % (r["fused_ops_ms"], unit, 100 * r["fused_ops_share"], r["amdahl_bound"]))
    c = summary.get("comparison")
    if c:
        lines += ["", "eager vs fused: step %.2f ms vs %.2f ms (%.2fx); %s: %.0f vs %.0f; gate + KGS loss %.3f vs "
                  "%.3f %s (%s)"
                  % (c["step_ms"][0], c["step_ms"][1], c["speedup"],
                     "launches/step" if on_gpu else "op calls/step", c["counter_per_step"][0],
                     c["counter_per_step"][1], c["fused_ops_ms"][0], c["fused_ops_ms"][1], unit,
                     "%.2fx" % c["fused_ops_speedup"] if c["fused_ops_speedup"] else "n/a")]
    return "\n".join(lines)


def _short(name: str, width: int = 90) -> str:
    return name if len(name) <= width else name[:width - 3] + "..."
