"""benchmarks/gpu_check.sh's summary: the verdict logic on a made-up run (CI also runs the whole script
as a dry run on the CPU: .ci/run)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check_summary  # noqa: E402


def _row(op, pass_, provider, dtype, shape, ms, **extra):
    return dict(op=op, pass_=pass_, provider=provider, dtype=dtype, shape=shape, median_ms=ms, **extra)


def _bench(path, sweep, rows, copy=4300.0):
    os.makedirs(path)
    with open(os.path.join(path, "bench.json"), "w") as f:
        json.dump({"sweep": sweep, "rows": rows, "copy_bandwidth": {"copy_GBps": copy}}, f)


def _fake_run(tmp_path, *, cuda_pct, failed_test):
    w = tmp_path / "work"
    w.mkdir()
    (w / "machine.log").write_text("dry_run 0\ngpu NVIDIA H200\n")
    (w / "steps.tsv").write_text("step\trc\tseconds\tlimit\nbuild\t0\t60\t200\ntests\t1\t100\t210\nmemcheck\t124\t100\t100\n")
    (w / "junit_tests_0.xml").write_text(
        '<testsuites><testsuite>'
        '<testcase classname="tests.test_purify_gate" name="test_cuda_gate_math_bit_identical_to_cpu_at_op_level"/>'
        '<testcase classname="tests.test_purify_gate" name="test_a[cuda]">%s</testcase>'
        '<testcase classname="tests.test_kgs_loss" name="test_b[triton]"><skipped/></testcase>'
        '</testsuite></testsuites>' % ("<failure>boom</failure>" if failed_test else ""))
    (w / "memcheck.log").write_text("sanitizer cases: 20 passed, 0 failed\n========= ERROR SUMMARY: 0 errors\n")
    gate = dict(T=50, B=2048, D=768)
    rows = []
    for dtype in ("fp32", "bf16"):
        rows += [_row("purify_gate", "fwd+bwd", "cuda", dtype, gate, 1.0, pct_copy_bw=cuda_pct, vs_compile=2.5),
                 _row("purify_gate", "fwd+bwd", "triton", dtype, gate, 1.2, pct_copy_bw=70.0, vs_compile=1.9)]
    rows += [_row("kgs_loss", "fwd+bwd", "cuda", "fp32", dict(M=3, B=4096, D=768), 0.1, vs_eager=12.0, vs_compile=3.5),
             _row("kgs_loss", "fwd+bwd", "cuda", "fp32", dict(M=3, B=65536, D=80), 0.2, pct_copy_bw=81.0)]
    _bench(str(w / "bench_large"), {"gate": [[50, 2048, 768]], "kgs": [[4096, 768], [65536, 80]]}, rows)
    _bench(str(w / "bench_max_autotune"), {"gate": [[50, 2048, 768]]},
           [_row("purify_gate", "fwd+bwd", p, d, gate, ms) for d in ("fp32", "bf16")
            for p, ms in (("compile-max-autotune", 1.5), ("cuda", 1.0), ("triton", 1.4))])
    return str(w)


def _line(text, start):
    lines = [l for l in text.splitlines() if l.startswith("| " + start)]
    assert lines, (start, text)
    return lines[0]


def test_summary_verdicts(tmp_path):
    text = gpu_check_summary.summarize(_fake_run(tmp_path, cuda_pct=90.0, failed_test=True))
    assert _line(text, "gate fwd+bwd T50 B2048 D768 fp32, cuda: % of copy").endswith("| met |")
    assert _line(text, "gate fwd+bwd T50 B2048 D768 fp32, triton: % of copy").endswith("| NOT met |")
    assert "| 1.50× | ≥ 1.30× | met |" in _line(text, "gate fwd+bwd T50 B2048 D768 bf16, cuda: vs max-autotune")
    assert "| 1.07× | ≥ 1.30× | NOT met |" in _line(text, "gate fwd+bwd T50 B2048 D768 bf16, triton: vs max-autotune")
    assert _line(text, "KGS fwd+bwd M3 B4096 D768 fp32, cuda: vs eager").endswith("| met |")
    assert _line(text, "KGS fwd+bwd M3 B65536 D80 fp32, cuda: % of copy").endswith("| met |")
    assert _line(text, "KGS fwd+bwd M3 B4096 D768 fp32, triton: vs eager").endswith("| missing |")
    assert _line(text, "GPU tests").endswith("| NOT met |")  # one failed test
    assert _line(text, "gates bit-identical").endswith("| met |")
    assert "`test_purify_gate.py::test_a[cuda]`" in text
    assert "| memcheck | 124 (timed out) |" in text
    assert "- memcheck: clean; cases 20 passed, 0 failed (rc 124)" in text
    assert "- racecheck: not run" in text
    assert "missing (bench_paper did not finish)" in text


def test_summary_flags_a_missed_bandwidth_target(tmp_path):
    text = gpu_check_summary.summarize(_fake_run(tmp_path, cuda_pct=60.0, failed_test=False))
    assert _line(text, "gate fwd+bwd T50 B2048 D768 fp32, cuda: % of copy").endswith("| NOT met |")
    assert _line(text, "GPU tests").endswith("| met |")


def test_gpu_check_script_is_valid_bash():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], check=True)


def test_summary_merges_the_split_large_benchmarks_and_flags_an_incomplete_one(tmp_path):
    """gpu_check.sh measures the large shapes in three calls (bench_large, bench_large_logits,
    bench_large_kgs): the summary reads them as one; a call stopped midway is named."""
    w = _fake_run(tmp_path, cuda_pct=90.0, failed_test=False)
    big = os.path.join(w, "bench_large")
    with open(os.path.join(big, "bench.json")) as f:
        data = json.load(f)
    kgs_rows = [r for r in data["rows"] if r["op"] == "kgs_loss"]
    data["rows"] = [r for r in data["rows"] if r["op"] != "kgs_loss"]
    kgs_sweep = data["sweep"].pop("kgs")
    with open(os.path.join(big, "bench.json"), "w") as f:
        json.dump(data, f)
    _bench(os.path.join(w, "bench_large_kgs"), {"kgs": kgs_sweep}, kgs_rows)
    gate = dict(T=50, B=2048, D=768)
    _bench(os.path.join(w, "bench_large_logits"), {"gate": [[50, 2048, 768]]},
           [_row("purify_gate", "fwd+bwd-logits", "cuda", "fp32", gate, 0.5)])
    with open(os.path.join(w, "machine.log"), "a") as f:
        f.write("results_folder benchmarks/results/2026-12-07-h200/\n")
    text = gpu_check_summary.summarize(w)
    assert _line(text, "KGS fwd+bwd M3 B4096 D768 fp32, cuda: vs eager").endswith("| met |")
    assert "| 0.50 |" in _line(text, "gate fwd+bwd T50 B2048 D768 fp32, cuda: x frozen")
    assert "under `benchmarks/results/2026-12-07-h200/`" in text
    assert "stopped before its last case" not in text
    with open(os.path.join(w, "bench_large_kgs", "bench.json")) as f:
        part = json.load(f)
    part["complete"] = False
    with open(os.path.join(w, "bench_large_kgs", "bench.json"), "w") as f:
        json.dump(part, f)
    assert "| bench_large stopped before its last case |" in gpu_check_summary.summarize(w)


def test_summary_takes_each_calls_sweep_only_for_the_ops_it_was_asked_for(tmp_path):
    """A bench.json's sweep also holds the default shapes of the ops not asked for (`--ops gate` still lists
    the default KGS shapes): merged, only the asked-for ones count, and a call that never ran says missing."""
    w = tmp_path / "work"
    w.mkdir()
    (w / "machine.log").write_text("dry_run 0\n")
    (w / "steps.tsv").write_text("step\trc\tseconds\tlimit\n")
    gate = dict(T=50, B=2048, D=768)
    big = str(w / "bench_large")
    _bench(big, {"gate": [[50, 2048, 768]], "kgs": [[16, 80]]},
           [_row("purify_gate", "fwd+bwd", "cuda", "fp32", gate, 1.0, pct_copy_bw=90.0, vs_compile=2.5)])
    with open(os.path.join(big, "bench.json")) as f:
        data = json.load(f)
    data["ops"] = ["gate"]
    with open(os.path.join(big, "bench.json"), "w") as f:
        json.dump(data, f)
    text = gpu_check_summary.summarize(str(w))
    assert "B16 D80" not in text
    assert "| KGS large-shape targets | – | – | missing (bench_kgs did not run) |" in text
    assert _line(text, "gate fwd+bwd T50 B2048 D768 fp32, cuda: % of copy").endswith("| met |")
