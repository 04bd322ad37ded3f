"""summary.md of a benchmarks/gpu_check.sh run: one page that is the run's verdict.

Reads the run's work folder (machine.log, steps.tsv, junit XML of the tests, the sanitizer logs, the
bench JSONs, the profile summaries) and writes: the machine and versions, every step with its exit code
and time, pass/fail counts per test group, the sanitizer verdicts, and one line per performance target of
the GPU issue with the measured figure, the target and met / not met. A figure that is missing (a step
failed or timed out) is reported as missing, never guessed.

    python benchmarks/gpu_check_summary.py --work DIR --out DIR/summary.md
"""
import argparse
import glob
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional

FUSED = ("cuda", "triton", "cpu")  # the fused providers, best first (cpu: the dry run)


# ---------------------------------------------------------------------------------------------------- inputs
def read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def steps(work: str) -> List[Dict[str, str]]:
    lines = read(os.path.join(work, "steps.tsv")).splitlines()
    if not lines:
        return []
    keys = lines[0].split("\t")
    return [dict(zip(keys, line.split("\t"))) for line in lines[1:] if line.strip()]


def junit(work: str) -> Dict[str, Dict[str, int]]:
    """{test file: {passed, failed, error, skipped}} over every junit XML of the run; also the outcome of
    each test id under the key "_cases"."""
    groups: Dict[str, Dict[str, int]] = {}
    cases: Dict[str, str] = {}
    for path in sorted(glob.glob(os.path.join(work, "junit*.xml"))):
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError:
            continue
        for tc in root.iter("testcase"):
            cls = tc.get("classname", "")
            group = cls.split(".")[-1] + ".py" if cls else "?"
            outcome = "passed"
            for child in tc:
                if child.tag in ("failure", "error"):
                    outcome = "failed" if child.tag == "failure" else "error"
                elif child.tag == "skipped":
                    outcome = "skipped"
            g = groups.setdefault(group, {"passed": 0, "failed": 0, "error": 0, "skipped": 0})
            g[outcome] += 1
            cases["%s::%s" % (group, tc.get("name"))] = outcome
    groups["_cases"] = cases  # type: ignore[assignment]
    return groups


def bench_rows(work: str, name: str) -> Optional[dict]:
    """The bench.json of WORK/NAME merged with those of WORK/NAME_* (gpu_check.sh splits the large shapes over
    three calls): every row, the sweeps of the ops each call was asked for, the first copy bandwidth; None
    when there is none."""
    merged: Optional[dict] = None
    for d in [os.path.join(work, name)] + sorted(glob.glob(os.path.join(work, name + "_*"))):
        path = os.path.join(d, "bench.json")
        try:
            with open(path) as f:
                b = json.load(f)
        except (OSError, ValueError):
            continue
        asked = b.get("ops")  # (a sweep also holds the default shapes of the ops not asked for)
        sweep = {k: v for k, v in b.get("sweep", {}).items()
                 if asked is None or {"gate_passes": "gate"}.get(k, k) in asked}  # sweep key -> its --ops name
        if merged is None:
            merged = dict(b, rows=list(b.get("rows", [])), sweep=sweep)
        else:
            merged["rows"] += b.get("rows", [])
            for k, v in sweep.items():
                merged["sweep"].setdefault(k, v)
        merged["complete"] = merged.get("complete", True) and b.get("complete", True)
    return merged


def find(bench: Optional[dict], op: str, pass_: str, provider: str, dtype: str, **shape) -> Optional[dict]:
    if not bench:
        return None
    for r in bench["rows"]:
        if (r["op"], r["pass_"], r["provider"], r["dtype"]) == (op, pass_, provider, dtype) and \
                all(r["shape"].get(k) == v for k, v in shape.items()) and r.get("median_ms") is not None:
            return r
    return None


# ---------------------------------------------------------------------------------------------------- verdicts
class Targets:
    """Collects one markdown row per target: what, figure, target, verdict."""

    def __init__(self):
        self.rows: List[str] = []

    def add(self, what: str, figure: Optional[float], fmt: str, target: Optional[float], op: str = ">=",
            note: str = "") -> None:
        if figure is None:
            verdict, shown = "missing", "–"
        else:
            shown = fmt % figure
            verdict = "report" if target is None else ("met" if (figure >= target if op == ">=" else figure <= target)
                                                       else "NOT met")
        goal = "–" if target is None else "%s %s" % (op.replace(">=", "≥").replace("<=", "≤"), fmt % target)
        self.rows.append("| %s | %s | %s | %s |%s" % (what, shown, goal, verdict, (" " + note) if note else ""))


def sanitizer_verdict(log: str, tool: str, rc: Optional[str]) -> str:
    if not log:
        return "not run"
    cases = re.search(r"sanitizer cases: (\d+) passed, (\d+) failed", log)
    cases_txt = ("; cases %s passed, %s failed" % cases.groups()) if cases else "; the cases did not finish"
    if tool == "memcheck":
        m = re.search(r"ERROR SUMMARY: (\d+) error", log)
        if m:
            return ("clean" if m.group(1) == "0" else "%s errors" % m.group(1)) + cases_txt + " (rc %s)" % rc
    if tool == "racecheck":
        m = re.search(r"RACECHECK SUMMARY: (\d+) hazard", log)
        if m:
            return ("clean" if m.group(1) == "0" else "%s hazards" % m.group(1)) + cases_txt + " (rc %s)" % rc
    return "no summary line (rc %s)%s" % (rc, cases_txt)


def summarize(work: str) -> str:
    out: List[str] = ["# gpu_check summary", ""]
    machine = read(os.path.join(work, "machine.log")).strip()
    dry = "dry_run 1" in machine
    if dry:
        out += ["**Dry run on a CPU** (GPU_CHECK_DRY_RUN=1): the CPU kernels and the Triton interpreter, tiny shapes; "
                "no GPU figure below means anything about a GPU.", ""]
    folder = re.findall(r"^results_folder (\S+)", machine, flags=re.M)
    if folder:
        out += ["Commit this file and gpu_check.tar.gz, unedited, under `%s`." % folder[0], ""]
    out += ["## Machine", "", "```", machine or "(machine.log missing)", "```", ""]

    st = steps(work)
    rc_of = {s["step"]: s["rc"] for s in st}
    out += ["## Steps", "", "| step | exit code | seconds | limit s |", "|---|---:|---:|---:|"]
    out += ["| %s | %s%s | %s | %s |" % (s["step"], s["rc"], " (timed out)" if s["rc"] in ("124", "137") else "",
                                         s["seconds"], s["limit"]) for s in st]
    out.append("")

    groups = junit(work)
    cases = groups.pop("_cases", {})
    out += ["## GPU tests (pytest -m gpu)", ""]
    if groups:
        out += ["| group | passed | failed | errors | skipped |", "|---|---:|---:|---:|---:|"]
        tot = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
        for g, c in sorted(groups.items()):
            out.append("| %s | %d | %d | %d | %d |" % (g, c["passed"], c["failed"], c["error"], c["skipped"]))
            for k in tot:
                tot[k] += c[k]
        out.append("| **all** | %d | %d | %d | %d |" % (tot["passed"], tot["failed"], tot["error"], tot["skipped"]))
        failed = sorted(k for k, v in cases.items() if v in ("failed", "error"))
        if failed:
            out += ["", "Failed: " + ", ".join("`%s`" % k for k in failed[:40]) + (" …" if len(failed) > 40 else "")]
    else:
        tot = None
        out.append("No junit XML: the tests did not run or did not finish (see tests.log).")
    out.append("")

    out += ["## compute-sanitizer", ""]
    if dry:
        out.append("- skipped (dry run): %s" % (read(os.path.join(work, "sanitizer_note.log")).strip() or "no GPU"))
        out.append("- the cases without it: %s" % (re.findall(r"sanitizer cases: .*", read(os.path.join(
            work, "sanitizer_cases.log"))) or ["did not finish"])[-1])
    else:
        for tool in ("memcheck", "racecheck"):
            out.append("- %s: %s" % (tool, sanitizer_verdict(read(os.path.join(work, tool + ".log")), tool,
                                                               rc_of.get(tool))))
    out.append("")

    # --- performance targets ---
    t = Targets()
    t.add("GPU tests: every CUDA and Triton test passes (failed + errors)",
          None if tot is None else float(tot["failed"] + tot["error"]), "%.0f", 0.0, "<=")
    bit = [v for k, v in cases.items() if "test_cuda_gate_math_bit_identical_to_cpu" in k]
    t.rows.append("| gates bit-identical to the CPU kernel for a seed (test_cuda_gate_math_bit_identical_to_cpu_at_op_level)"
                  " | %s | passed | %s |" % (bit[0] if bit else "–", ("met" if bit == ["passed"] else "NOT met")
                                                if bit else "missing"))
    large = bench_rows(work, "bench_large")
    paper = bench_rows(work, "bench_paper")
    autotune = bench_rows(work, "bench_max_autotune")
    fused = [p for p in FUSED if any(r["provider"] == p and r.get("median_ms") for r in (large or {}).get("rows", []))] \
        or ["cuda", "triton"]
    if large:
        if not large["sweep"].get("gate"):
            t.rows.append("| gate large-shape targets | – | – | missing (bench_gate did not run) |")
        for T, B, D in large["sweep"].get("gate", []):
            for dtype in ("fp32", "bf16"):
                for p in fused:
                    r = find(large, "purify_gate", "fwd+bwd", p, dtype, T=T, B=B, D=D)
                    what = "gate fwd+bwd T%d B%d D%d %s, %s" % (T, B, D, dtype, p)
                    t.add(what + ": % of copy bandwidth (3 passes of x)", r and r.get("pct_copy_bw"), "%.0f%%", 85.0)
                    t.add(what + ": vs torch.compile", r and r.get("vs_compile"), "%.2f×", 2.0)
                    ma = find(autotune, "purify_gate", "fwd+bwd", "compile-max-autotune", dtype, T=T, B=B, D=D)
                    mine = find(autotune, "purify_gate", "fwd+bwd", p, dtype, T=T, B=B, D=D)
                    t.add(what + ": vs max-autotune (same run)",
                          ma["median_ms"] / mine["median_ms"] if ma and mine else None, "%.2f×", 1.3)
                    lr = find(large, "purify_gate", "fwd+bwd-logits", p, dtype, T=T, B=B, D=D)
                    if lr and r:
                        t.add(what + ": x frozen (no ∂L/∂x) time / fwd+bwd time", lr["median_ms"] / r["median_ms"],
                              "%.2f", None)
        kgs = large["sweep"].get("kgs", [])
        if not kgs:
            t.rows.append("| KGS large-shape targets | – | – | missing (bench_kgs did not run) |")
        for i, (B, D) in enumerate(kgs):
            for p in fused:
                r = find(large, "kgs_loss", "fwd+bwd", p, "fp32", M=3, B=B, D=D)
                what = "KGS fwd+bwd M3 B%d D%d fp32, %s" % (B, D, p)
                if i == 0:
                    t.add(what + ": vs eager", r and r.get("vs_eager"), "%.1f×", 10.0)
                    t.add(what + ": vs torch.compile", r and r.get("vs_compile"), "%.1f×", 3.0)
                else:
                    t.add(what + ": % of copy bandwidth", r and r.get("pct_copy_bw"), "%.0f%%", 80.0)
    else:
        t.rows.append("| gate and KGS large-shape targets | – | – | missing (bench_large did not finish) |")
    if paper:
        for T, B, D in paper["sweep"].get("gate", []):
            for p in fused:
                r = find(paper, "purify_gate", "fwd+bwd", p, "fp32", T=T, B=B, D=D)
                t.add("paper size: gate fwd+bwd T%d B%d D%d fp32, %s: vs eager" % (T, B, D, p), r and r.get("vs_eager"),
                      "%.2f×", 3.0)
        for B, D in paper["sweep"].get("kgs", []):
            for p in fused:
                r = find(paper, "kgs_loss", "fwd+bwd", p, "fp32", M=3, B=B, D=D)
                t.add("paper size: KGS fwd+bwd M3 B%d D%d fp32, %s: vs eager" % (B, D, p), r and r.get("vs_eager"),
                      "%.2f×", 3.0)
        for B in paper["sweep"].get("train", []):
            for p in fused + (["cuda-graphs"] if "cuda" in fused else []):  # graphs: the fused step, captured
                r = find(paper, "train_step", "step", p, "fp32", B=B)
                e = find(paper, "train_step", "step", "eager", "fp32", B=B)
                t.add("MIM training step B%d fp32, %s vs eager (%s ms vs %s ms)" % (
                    B, p, "%.2f" % r["median_ms"] if r else "–", "%.2f" % e["median_ms"] if e else "–"),
                    r and r.get("vs_eager"), "%.2f×", None)
    else:
        t.rows.append("| paper-size and training-step targets | – | – | missing (bench_paper did not finish) |")
    for large_or_paper, name in ((large, "bench_large"), (paper, "bench_paper")):
        if large_or_paper and not large_or_paper.get("complete", True):
            t.rows.append("| %s stopped before its last case | – | – | rows after it missing |" % name)
        if large_or_paper:
            copy = large_or_paper.get("copy_bandwidth", {})
            t.rows.append("| copy bandwidth measured in %s | %.0f GB/s | – | report |" % (name, copy.get("copy_GBps", 0)))
    out += ["## Performance targets", "", "| what | measured | target | verdict |", "|---|---:|---:|---|"] + t.rows + [""]

    # --- training-step profile: where the time goes ---
    out += ["## Training-step profile (mim-fast profile)", ""]
    profiles = sorted(glob.glob(os.path.join(work, "profile_B*", "summary.json")))
    if not profiles:
        out.append("No profile summary (see profile.log).")
    for path in profiles:
        try:
            with open(path) as f:
                prof = json.load(f)
        except (OSError, ValueError):
            out.append("- %s: unreadable" % path)
            continue
        out.append("- %s: %s" % (os.path.basename(os.path.dirname(path)), _profile_line(prof)))
    out.append("")
    counts = {"met": sum(" | met |" in r for r in t.rows), "not met": sum("NOT met" in r for r in t.rows),
              "missing": sum("| missing |" in r or r.endswith("missing |") for r in t.rows)}
    out.insert(2, "Targets: %(met)d met, %(not met)d not met, %(missing)d missing." % counts)
    out.insert(3, "")
    return "\n".join(out) + "\n"


def _profile_line(prof: dict) -> str:
    """Step time per mode, launches per step, the gate + KGS share and the ranges that take most of the step."""
    parts = []
    for mode, m in prof.get("modes", {}).items():
        ranges = m.get("ranges") or {}
        top = sorted(((k, v.get("total_ms", 0.0)) for k, v in ranges.items()), key=lambda kv: -kv[1])[:4]
        parts.append("%s %s ms/step, %s %s, gate + KGS %s%% (top: %s)" % (
            mode, _num(m.get("step_ms")), _num(m.get("counter_per_step"), "%.0f"), prof.get("counter", "launches")
            .split(" (")[0], _num(100 * m["fused_ops_share"] if m.get("fused_ops_share") is not None else None, "%.1f"),
            ", ".join("%s %.2f ms" % kv for kv in top)))
    speedup = prof.get("comparison", {}).get("speedup")
    if speedup is not None:
        parts.append("fused/eager step speed-up %.2f×" % speedup)
    return "; ".join(parts) if parts else "summary has no modes"


def _num(v, fmt="%.2f") -> str:
    return fmt % v if isinstance(v, (int, float)) else "?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    text = summarize(args.work)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
