"""`mim-fast bench`: the runner on toy shapes (what it measures is checked, not how fast), its timers, byte
counts, peak-memory probe and error handling. The real sweeps are run by hand or by benchmarks/gpu_check.sh."""
import json
import os

import pytest
import torch

from mim_fast import bench, cli


def _run(tmp_path, *extra):
    out = tmp_path / "bench"
    rc = cli.main(["bench", "--quick", "--device", "cpu", "--out", str(out), "--no-plots", *extra])
    return rc, out


def _rows(out):
    with open(out / "bench.json") as f:
        return json.load(f)


def test_minimal_bytes_are_the_kernels_contract():
    # gate: x read once (+ pooled) forward; x read twice and ∂L/∂x written once (+ pooled) forward+backward
    assert bench.minimal_bytes("purify_gate", "fwd", {"T": 7, "B": 3, "D": 5}, torch.float32) == 4 * (7 * 3 * 5 + 3 * 5)
    assert bench.minimal_bytes("purify_gate", "fwd+bwd", {"T": 7, "B": 3, "D": 5}, torch.bfloat16) == 2 * (
        3 * 7 * 3 * 5 + 3 * 5)
    # x frozen: x read twice (+ pooled), no ∂L/∂x
    assert bench.minimal_bytes("purify_gate", "fwd+bwd-logits", {"T": 7, "B": 3, "D": 5}, torch.float32) == 4 * (
        2 * 7 * 3 * 5 + 3 * 5)
    # KGS: h read once, ∂L/∂h written once
    assert bench.minimal_bytes("kgs_loss", "fwd+bwd", {"M": 3, "B": 11, "D": 13}, torch.float32) == 2 * 3 * 11 * 13 * 4
    assert bench.minimal_bytes("train_step", "step", {"B": 16}, torch.float32) is None


def test_time_cpu_quantiles_are_ordered_and_count_calls():
    calls = []
    med, p20, p80 = bench.time_cpu(lambda: calls.append(1), min_reps=7, min_time=0.0, warmup=2)
    assert p20 <= med <= p80
    assert len(calls) == 2 + 7


def test_interleaved_timer_alternates_providers():
    calls = []
    stats = bench.time_cpu_interleaved([lambda: calls.append("a"), lambda: calls.append("b")], min_reps=4,
                                       min_time=0.0, warmup=1)
    assert calls == ["a", "b"] + ["a", "b", "b", "a"] * 2  # a warm-up round, then rounds that rotate
    assert len(stats) == 2 and all(p20 <= med <= p80 for med, p20, p80 in stats)


def test_peak_memory_sees_a_temporary_on_cpu():
    n = int(torch.randint(2_000_000, 3_000_000, ()).item())

    def fn():
        t = torch.empty(n, dtype=torch.float32)
        t.fill_(1.0)
        del t
        torch.empty(16)

    peak = bench.peak_memory(fn, "cpu")
    assert 4 * n <= peak <= 4 * n + 2**16

    # a buffer from before the call, freed inside it, is not subtracted (the previous step's .grad)
    held = [torch.ones(n)]

    def drop_then_allocate():
        held.pop()
        t = torch.empty(n // 2)
        t.fill_(2.0)

    peak = bench.peak_memory(drop_then_allocate, "cpu")
    assert 4 * (n // 2) <= peak <= 4 * (n // 2) + 2**16


def test_bench_cli_measures_every_op_against_eager(tmp_path):
    rc, out = _run(tmp_path, "--providers", "eager,cpu,cuda", "--dtypes", "fp32", "--gate-shapes", "3x2x5,1x1x1",
                   "--kgs-shapes", "2x3", "--train-batches", "2")
    assert rc == 0
    data = _rows(out)
    rows = data["rows"]
    assert data["machine"]["torch"] == torch.__version__ and data["copy_bandwidth"]["copy_GBps"] > 0
    measured = [r for r in rows if r["median_ms"] is not None]
    assert {(r["op"], r["pass_"]) for r in measured} == {
        ("purify_gate", "fwd"), ("purify_gate", "fwd+bwd"), ("kgs_loss", "fwd+bwd"), ("train_step", "step")}
    assert {r["provider"] for r in measured} == {"eager", "cpu"}
    for r in measured:
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["peak_mem_bytes"] is not None and r["peak_mem_bytes"] >= 0
        assert r["error"] is None
        if r["provider"] == "eager":
            assert r["vs_eager"] == pytest.approx(1.0)
        assert r["vs_compile"] is None  # no compile provider in this run
        if r["op"] != "train_step":
            assert r["bytes"] > 0 and r["gbps"] == pytest.approx(r["bytes"] / r["median_ms"] / 1e6)
    gate_fwd = [r for r in measured if r["op"] == "purify_gate" and r["pass_"] == "fwd" and r["shape"]["T"] == 3]
    assert len(gate_fwd) == 2 and gate_fwd[0]["size"] == 3 * 2 * 5
    # unavailable providers are listed with the reason, not silently dropped
    skipped = [r for r in rows if r["skipped"]]
    assert {r["provider"] for r in skipped} == {"cuda"} and all("CUDA" in r["skipped"] for r in skipped)
    table = (out / "bench.md").read_text()
    assert "| case | provider | median ms |" in table and "kgs_loss fwd+bwd M=3 B=2 D=3 fp32" in table


def test_bench_cli_compile_column_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench"
    rc = cli.main(["bench", "--quick", "--device", "cpu", "--out", str(out), "--ops", "gate", "--dtypes", "fp32",
                   "--providers", "eager,compile,cpu", "--gate-shapes", "2x3x4"])
    assert rc == 0
    rows = [r for r in _rows(out)["rows"] if r["median_ms"] is not None]
    comp = [r for r in rows if r["provider"] == "compile"]
    assert len(comp) == 2 and all(r["vs_compile"] == pytest.approx(1.0) for r in comp)
    assert all(r["vs_compile"] is not None for r in rows)
    assert os.path.getsize(out / "time.png") > 1000 and os.path.getsize(out / "roofline.png") > 1000


def test_a_failing_provider_is_reported_and_fails_the_run(tmp_path, monkeypatch, capsys):
    real = bench._make_step

    def broken(op, pass_, shape, dtype, provider, device):
        if provider == "cpu":
            raise RuntimeError("kernel exploded")
        return real(op, pass_, shape, dtype, provider, device)

    monkeypatch.setattr(bench, "_make_step", broken)
    rc, out = _run(tmp_path, "--ops", "kgs", "--providers", "eager,cpu", "--dtypes", "fp32", "--kgs-shapes", "2x3")
    assert rc == 1
    rows = _rows(out)["rows"]
    cpu = [r for r in rows if r["provider"] == "cpu"]
    assert cpu and cpu[0]["error"] == "RuntimeError: kernel exploded" and "Traceback" in cpu[0]["traceback"]
    assert [r for r in rows if r["provider"] == "eager"][0]["median_ms"] is not None
    assert "ERROR kgs_loss fwd+bwd M=3 B=2 D=3 fp32 · cpu" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--ops", "gate,nope"], "--ops: 'nope'"),
    (["--dtypes", "fp8"], "--dtypes: 'fp8'"),
    (["--providers", "fast"], "--providers: 'fast'"),
    (["--gate-shapes", "50x16"], "--gate-shapes: '50x16'"),
    (["--kgs-shapes", "0x3"], "--kgs-shapes: '0x3'"),
    (["--train-batches", "x"], "--train-batches: 'x'"),
])
def test_bad_arguments_name_the_option(tmp_path, capsys, args, message):
    rc, out = _run(tmp_path, *args)
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_profiler_chatter_never_reaches_the_output(tmp_path, capfd):
    """libkineto writes `USDT: ... profiler_start/stop` (and, without a GPU driver, `gpuGetDeviceCount failed`)
    straight to fd 2 on every profiler run; bench filters those lines and passes every other one on."""
    with bench.native_stderr_filtered():
        os.write(2, b"USDT:2026-12-01 05:33:53 8928:8928 SyncActivityProfilerHandler.cpp:39] profiler_start\n")
        os.write(2, b"ERROR:2026-12-01 05:33:53 8928:8928 DeviceProperties.cpp:56] gpuGetDeviceCount failed "
                    b"with code 35\n")
        os.write(2, b"[W1201 05:58:04.097208926 CPUAllocator.cpp:245] Memory block of unknown size was allocated "
                    b"before the profiling started, profiler results will not include the deallocation event\n")
        os.write(2, b"a real warning\n")
    assert capfd.readouterr().err == "a real warning\n"
    bench.peak_memory(lambda: torch.ones(10) + 1, "cpu")  # the real profiler
    rc, _ = _run(tmp_path, "--ops", "gate", "--providers", "eager", "--dtypes", "fp32", "--gate-shapes", "2x3x4")
    captured = capfd.readouterr()
    assert rc == 0 and "USDT" not in captured.out + captured.err and "gpuGetDeviceCount" not in captured.err


def _row(median, p20, p80, load=None, device="cpu"):
    return bench.Row(op="purify_gate", pass_="fwd", shape={"T": 1, "B": 1, "D": 1}, dtype="fp32", provider="eager",
                     device=device, size=1, median_ms=median, p20_ms=p20, p80_ms=p80, load1=load)


def test_untrustworthy_figures_are_flagged_and_warned_about():
    assert bench.untrusted_reason(_row(1.0, 0.95, 1.2, load=1.5), cores=2) is None
    assert bench.untrusted_reason(_row(1.0, 0.9, 1.31), cores=2) == "p20-p80 spread 41% of the median"
    assert bench.untrusted_reason(_row(1.0, 1.0, 1.0, load=4.9), cores=2) == "load 4.9 on 2 cores"
    assert bench.untrusted_reason(_row(1.0, 1.0, 1.0, load=4.9, device="cuda"), cores=2) is None
    rows = [_row(1.0, 1.0, 1.0), _row(2.0, 1.0, 3.0)]
    for r in rows:
        r.untrusted = bench.untrusted_reason(r, cores=2)
    assert bench.trust_warning(rows) == ("WARNING: 1 of 2 figures are not trustworthy (⚠ in the trust column): 1 "
                                         "with a p20-p80 spread over 30% of the median. Rerun on an idle machine "
                                         "before quoting them.")
    assert bench.trust_warning(rows[:1]) is None
    table = bench.markdown(rows, {"gpu": None, "cpu": "x", "torch_threads": 1, "torch": "t", "triton": None,
                                  "cuda": None, "commit": None, "time": "now"}, {"device": "cpu", "copy_GBps": 1.0})
    assert "| ok |" in table and "| ⚠ p20-p80 spread 100% of the median |" in table and "WARNING: 1 of 2" in table
    rows[0].load1 = 3.0
    rows[0].untrusted = bench.untrusted_reason(rows[0], cores=2)
    assert "2 of 2 figures" in bench.trust_warning(rows) and ", 1 timed while the load average exceeded the core " \
        "count." in bench.trust_warning(rows)


def test_plots_give_each_provider_one_colour_everywhere(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    seen = {}
    real_plot = plt.Axes.plot

    def plot(self, *args, **kw):
        if "label" in kw:
            seen.setdefault(kw["label"], set()).add((kw.get("color"), kw.get("marker")))
        return real_plot(self, *args, **kw)

    monkeypatch.setattr(plt.Axes, "plot", plot)
    rows = []
    for op, pass_ in (("purify_gate", "fwd"), ("kgs_loss", "fwd+bwd"), ("train_step", "step")):
        for provider in (["cpu", "eager"] if op == "kgs_loss" else ["eager", "compile", "cpu"]):
            for size in (10, 1000):
                r = _row(1.0 + size / 1000, 1.0, 1.1)
                r.op, r.pass_, r.provider, r.size, r.pct_copy_bw = op, pass_, provider, size, 50.0
                rows.append(r)
    written = bench.plots(rows, str(tmp_path))
    assert sorted(os.path.basename(p) for p in written) == ["roofline.png", "time.png"]
    assert all(len(styles) == 1 for styles in seen.values()), seen
    assert seen["eager"] == {bench.PROVIDER_STYLE["eager"]} and seen["cpu"] == {bench.PROVIDER_STYLE["cpu"]}


def test_rows_are_written_after_every_case(tmp_path, monkeypatch):
    """A run stopped midway (gpu_check.sh's time limit sends SIGINT) leaves bench.json and bench.md with the
    cases measured so far, marked incomplete; a finished run is marked complete."""
    real = bench._make_step

    def interrupted(op, pass_, shape, dtype, provider, device):
        if op == "kgs_loss":
            raise KeyboardInterrupt
        return real(op, pass_, shape, dtype, provider, device)

    monkeypatch.setattr(bench, "_make_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "--ops", "gate,kgs", "--providers", "eager,cpu", "--dtypes", "fp32", "--gate-shapes",
             "3x2x5", "--kgs-shapes", "2x3")
    data = _rows(tmp_path / "bench")
    assert data["complete"] is False
    measured = {(r["op"], r["pass_"], r["provider"]) for r in data["rows"] if r["median_ms"] is not None}
    assert ("purify_gate", "fwd+bwd", "cpu") in measured and not any(op == "kgs_loss" for op, _, _ in measured)
    assert "Incomplete" in (tmp_path / "bench" / "bench.md").read_text()
    assert not list((tmp_path / "bench").glob("*.tmp"))

    monkeypatch.setattr(bench, "_make_step", real)
    rc, out = _run(tmp_path, "--ops", "kgs", "--providers", "eager,cpu", "--dtypes", "fp32", "--kgs-shapes", "2x3")
    assert rc == 0 and _rows(out)["complete"] is True and "Incomplete" not in (out / "bench.md").read_text()


def test_cuda_graphs_provider_is_skipped_with_the_reason_where_the_captured_step_refuses():
    reasons = {dtype: dict(bench._providers("train_step", "cuda", dtype, None))["cuda-graphs"]
               for dtype in (torch.float32, torch.bfloat16, torch.float16)}
    assert reasons[torch.float32] is None and reasons[torch.bfloat16] is None
    assert "fp16" in reasons[torch.float16]
    assert "CUDA device" in dict(bench._providers("train_step", "cpu", torch.float32, None))["cuda-graphs"]
