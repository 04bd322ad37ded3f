"""`mim-fast profile` and the named ranges of mim_fast.profiling."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mim_fast import cli, profiling
from mim_fast import train as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--batch-size", "4", "--d-model", "10", "--heads", "2", "--seq-len", "8", "--dims", "8", "6", "5",
        "--av-layers", "1", "--steps", "2", "--warmup", "1", "--top", "5", "--threads", "1"]
MODALITIES = ("text", "audio", "vision")
RANGES = (["mim/gate_noise", "mim/heads", "mim/fusion", "mim/kgs_loss", "mim/task_loss", "mim/backward",
           "mim/optimizer"] + ["mim/%s/%s" % (part, m) for part in ("encoder", "mask_learner", "gate")
                               for m in MODALITIES])


def _run_cli(args, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "mim_fast", "profile"] + args, capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def test_cli_writes_traces_and_summary_for_eager_and_fused(tmp_path):
    out = tmp_path / "prof"
    res = _run_cli(TINY + ["--out", str(out)])
    assert res.returncode == 0, res.stderr
    for text in ("== eager (backend='torch') ==", "== fused (backend='auto') ==", "eager vs fused: step",
                 "operator calls per step", "top 5 CPU ops", "mim/gate/audio", "gate + KGS loss"):
        assert text in res.stdout, text

    names = {}
    for mode in ("eager", "fused"):
        with open(out / ("trace_%s.json" % mode)) as f:
            trace = json.load(f)  # valid Chrome-trace JSON
        events = trace["traceEvents"]
        names[mode] = {e.get("name", "") for e in events}
        assert set(RANGES) <= names[mode], set(RANGES) - names[mode]
        assert sum(e.get("name", "").startswith("ProfilerStep#") for e in events) == 2  # the profiled steps
        ranges = [e for e in events if e.get("name") == "mim/encoder/text"]
        assert len(ranges) == 2 and all(e["ph"] == "X" and e["dur"] > 0 for e in ranges)
    # the fused run calls the extension's ops, the eager run does not
    assert any(n.startswith("mim_fast::purify_gate") for n in names["fused"])
    assert any(n.startswith("mim_fast::kgs_loss") for n in names["fused"])
    assert not any(n.startswith(("mim_fast::purify_gate", "mim_fast::kgs_loss")) for n in names["eager"])

    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert {"device", "torch", "threads", "config", "counter", "modes", "comparison"} <= set(summary)
    assert summary["config"]["batch_size"] == 4 and summary["config"]["modes"] == ["eager", "fused"]
    assert summary["threads"] == 1
    eager, fused = summary["modes"]["eager"], summary["modes"]["fused"]
    assert eager["backend"] == "torch" and fused["backend"] == "auto"
    for r in (eager, fused):
        assert {"step_ms", "profiled_step_ms", "ranges", "top_ops", "op_calls_per_step", "leaf_op_calls_per_step",
                "fused_ops_share", "amdahl_bound", "trace"} <= set(r)
        assert r["steps_profiled"] == 2 and len(r["step_ms_all"]) == 2 and r["step_ms"] > 0
        assert set(RANGES) <= set(r["ranges"])
        for m in MODALITIES:  # backward charged to the forward ranges whose ops it differentiates
            assert r["ranges"]["mim/gate/" + m]["backward_ms"] > 0
            assert r["ranges"]["mim/mask_learner/" + m]["backward_ms"] > 0
        assert r["ranges"]["mim/kgs_loss"]["backward_ms"] > 0
        assert r["ranges"]["mim/optimizer"]["backward_ms"] == 0
        assert r["ranges"]["mim/gate/text"]["calls"] == 1 and r["ranges"]["mim/heads"]["calls"] == 4
        assert 0 < r["fused_ops_share"] < 1 and r["amdahl_bound"] > 1
        assert r["leaf_op_calls_per_step"] < r["op_calls_per_step"]
    # the reference ops dispatch many more operators than the two fused ones (a count, not a timing)
    assert eager["op_calls_per_step"] > fused["op_calls_per_step"] + 500
    comp = summary["comparison"]
    assert comp["counter_per_step"] == [eager["op_calls_per_step"], fused["op_calls_per_step"]]
    assert comp["speedup"] == pytest.approx(eager["step_ms"] / fused["step_ms"])


@pytest.mark.parametrize("args, name", [(["--steps", "0"], "--steps"), (["--batch-size", "x"], "--batch-size"),
                                        (["--backend", "fast"], "--backend"), (["--amp", "fp8"], "--amp"),
                                        (["--dims", "8", "6"], "--dims")])
def test_cli_bad_argument(args, name, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["profile"] + args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "mim-fast profile: error: argument %s" % name in err


def test_cli_bad_device_and_bad_model(tmp_path, capsys):
    tiny = TINY[:-2]  # in this process: leave its thread count alone
    if not torch.cuda.is_available():
        assert cli.main(["profile", "--device", "cuda", "--out", str(tmp_path)] + tiny) == 2
        err = capsys.readouterr().err
        assert "argument --device" in err and "CUDA is not available" in err
    # d_model not divisible by heads: the model's own error, as a CLI error
    assert cli.main(["profile", "--out", str(tmp_path)] + tiny + ["--d-model", "9"]) == 2
    assert "mim-fast profile: error: d_model must be divisible by heads" in capsys.readouterr().err


def _tiny_step():
    cfg = T.TrainConfig(d_model=10, heads=2, batch_size=4, av_layers=1,
                        synthetic={"n_train": 4, "n_dev": 1, "n_test": 1, "T": 8, "dims": [8, 6, 5]})
    data = T.load_for_training(cfg)
    model = T.build_model(data, cfg)
    opt = T.Optimizers(model, cfg, torch.device("cpu"))
    batch = next(T.batches(data.train, 4, shuffle=False, device=torch.device("cpu")))
    return lambda: T.train_step(model, opt, batch, cfg, 3, torch.device("cpu"))


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 threads on a loaded 2-core machine wait on each other 100x longer
    yield
    torch.set_num_threads(threads)


def test_training_emits_ranges_only_when_profiling(monkeypatch, one_thread):
    recorded = []
    real = torch.profiler.record_function

    def spy(name, *a, **k):
        recorded.append(name)
        return real(name, *a, **k)

    monkeypatch.setattr(torch.profiler, "record_function", spy)
    step = _tiny_step()
    step()
    assert recorded == []  # no profiler running, not enabled: not even a record_function object
    assert not profiling.is_enabled()
    with profiling.enabled():
        assert profiling.is_enabled()
        step()
    assert not profiling.is_enabled()
    assert sorted(set(recorded)) == sorted(RANGES)
    assert recorded.count("mim/heads") == 4 and recorded.count("mim/gate/text") == 1
    recorded.clear()
    with torch.profiler.profile() as prof:  # a running torch profiler turns them on too
        step()
    assert sorted(set(recorded)) == sorted(RANGES)
    assert {e.name for e in prof.events()} >= set(RANGES)


def test_named_ranges_do_not_break_compiled_graphs():
    torch._dynamo.reset()

    def f(x):
        with profiling.named_range("mim/test"):
            y = torch.tanh(x) * 2
        return y.sum()

    x = torch.randn(5)
    with profiling.enabled():
        compiled = torch.compile(f, fullgraph=True, backend="eager")  # dynamo is what would graph-break
        torch.testing.assert_close(compiled(x), f(x))
    torch.testing.assert_close(compiled(x), f(x))  # recompiled on the flag's guard, still one graph


def _event(i, name, thread, start, end, parent=None, seq=-1, fwd_thread=None, device=False, annotation=False):
    from torch.autograd.profiler_util import FunctionEvent

    kind = torch.autograd.DeviceType.CUDA if device else torch.autograd.DeviceType.CPU
    e = FunctionEvent(i, name, thread, start, end, fwd_thread=fwd_thread, use_device="cuda", sequence_nr=seq,
                      device_type=kind, is_user_annotation=annotation)
    if parent is not None:
        e.set_cpu_parent(parent)
        parent.append_cpu_child(e)
    return e


def test_summary_of_a_gpu_profile():
    """The CUDA path of the summary, on hand-made events (one step): kernels and launch calls counted,
    device time charged to the ranges, the backward node (on the autograd device thread) to its forward."""
    from mim_fast.profile import report, summarize_events

    step = _event(0, "ProfilerStep*", 1, 0, 1000, annotation=True)
    gate = _event(1, "mim/gate/text", 1, 10, 100, step, annotation=True)
    op = _event(2, "mim_fast::purify_gate_forward", 1, 20, 90, gate, seq=7)
    launch = _event(3, "cudaLaunchKernel", 1, 30, 40, op)
    op.append_kernel("purify_gate_fwd_kernel", 0, 50.0)
    enc = _event(4, "mim/encoder/text", 1, 100, 300, step, annotation=True)
    mm = _event(5, "aten::mm", 1, 110, 290, enc, seq=6)
    launch2 = _event(6, "cuLaunchKernel", 1, 120, 130, mm)
    mm.append_kernel("gemm_kernel", 0, 200.0)
    bwd_range = _event(7, "mim/backward", 1, 300, 900, step, annotation=True)
    node = _event(8, "autograd::engine::evaluate_function: PurifyGateBackward", 2, 400, 800, seq=7, fwd_thread=1)
    bop = _event(9, "mim_fast::purify_gate_backward", 2, 410, 790, node)
    launch3 = _event(10, "cudaLaunchKernel", 2, 420, 430, bop)
    bop.append_kernel("purify_gate_bwd_kernel", 0, 100.0)
    kernels = [_event(11, "purify_gate_fwd_kernel", 7, 40, 90, device=True),
               _event(12, "gemm_kernel", 7, 130, 330, device=True),
               _event(13, "purify_gate_bwd_kernel", 7, 430, 530, device=True),
               _event(14, "Memcpy HtoD (Pageable -> Device)", 7, 600, 610, device=True),
               _event(15, "mim/gate/text", 7, 40, 90, device=True)]  # a GPU-side annotation: not a kernel
    events = [step, gate, op, launch, enc, mm, launch2, bwd_range, node, bop, launch3] + kernels
    r = summarize_events(events, 1, "cuda")
    assert r["launches_per_step"] == 3 and r["kernels_per_step"] == 3 and r["memcpy_memset_per_step"] == 1
    assert r["device_ms_per_step"] == pytest.approx(0.35)
    assert [o["name"] for o in r["top_ops"]] == ["gemm_kernel", "purify_gate_bwd_kernel", "purify_gate_fwd_kernel"]
    g = r["ranges"]["mim/gate/text"]
    assert g["forward_ms"] == pytest.approx(0.05) and g["backward_ms"] == pytest.approx(0.1)
    assert r["ranges"]["mim/encoder/text"]["total_ms"] == pytest.approx(0.2)
    assert r["fused_ops_share"] == pytest.approx(0.15 / 0.35) and r["amdahl_bound"] == pytest.approx(0.35 / 0.2)
    summary = {"device": "cuda:0 (test)", "torch": torch.__version__, "threads": 1,
               "config": {"batch_size": 1, "d_model": 2, "seq_len": 2, "dims": [1, 1, 1], "av_layers": 0,
                          "amp": "none", "warmup": 0, "steps": 1},
               "modes": {"fused": {**r, "backend": "auto", "step_ms": 1.0, "step_ms_all": [1.0]}}}
    text = report(summary)
    assert "kernel launches per step: 3 launch API calls, 3 kernels, 1 memcpy/memset" in text
    assert "top 15 CUDA kernels" in text and "gemm_kernel" in text


@pytest.mark.cuda
def test_profile_on_cuda(tmp_path):
    from mim_fast.profile import profile, report

    summary = profile(["eager", "fused"], device=torch.device("cuda"), batch_size=4, d_model=10, heads=2, seq_len=8,
                      dims=(8, 6, 5), av_layers=1, steps=2, warmup=1, out=str(tmp_path))
    for r in summary["modes"].values():
        assert r["launches_per_step"] > 0 and r["kernels_per_step"] > 0 and r["device_ms_per_step"] > 0
        assert r["ranges"]["mim/gate/text"]["forward_ms"] > 0 and r["ranges"]["mim/gate/text"]["backward_ms"] > 0
        assert r["ranges"]["mim/kgs_loss"]["forward_ms"] > 0
    assert summary["modes"]["eager"]["kernels_per_step"] > summary["modes"]["fused"]["kernels_per_step"]
    assert "kernel launches per step" in report(summary)
    with open(tmp_path / "trace_fused.json") as f:
        names = {e.get("name") for e in json.load(f)["traceEvents"]}
    assert "mim/gate/text" in names
