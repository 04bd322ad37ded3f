"""Registers, shared memory and spills of every CUDA kernel, from ptxas itself, without a GPU.

Recompiles each kernels/*.cu with exactly the nvcc command of the last build (read from the ninja file
the extension build wrote: build/temp*/build.ninja) plus ``-Xptxas=-v``, and parses what ptxas prints per
entry function. Fails (exit 1) when a kernel spills registers to local memory: every kernel in
kernels/ is on a hot path (the gate's forward and backward, the KGS loss, the noise), and a spill there
costs memory traffic the byte counts in the docstrings do not include.

    python benchmarks/ptxas_report.py [--build-dir build] [--out DIR]

Writes DIR/ptxas.md (a table) and DIR/ptxas.json, and prints the table. Run after the extension was built
with CUDA (make build, or setup.py build_ext); exits 2 when there is no CUDA build to read.
"""
import argparse
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas info\s*: Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str, source: str) -> List[Dict]:
    """One dict per entry function of a ``ptxas -v`` log: name, arch, registers, smem, stack, spills."""
    kernels: List[Dict] = []
    current = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = {"source": source, "mangled": m.group(1), "arch": m.group(2), "registers": None,
                       "smem_bytes": 0, "stack_bytes": 0, "spill_stores": 0, "spill_loads": 0}
            kernels.append(current)
            continue
        if current is None:
            continue
        m = _FRAME.search(line)
        if m:
            current["stack_bytes"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
            continue
        m = _USED.search(line)
        if m:
            current["registers"] = int(m.group(1))
            smem = _SMEM.search(line)
            current["smem_bytes"] = int(smem.group(1)) if smem else 0
    _demangle(kernels)
    return kernels


def _demangle(kernels: List[Dict]) -> None:
    names = [k["mangled"] for k in kernels]
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        demangled = out.splitlines()
    except (OSError, subprocess.CalledProcessError):
        demangled = names
    for k, d in zip(kernels, demangled):
        k["name"] = d


def ninja_commands(build_dir: str) -> Dict[str, str]:
    """{.cu path: the shell command that compiled it} from the extension build's ninja file."""
    files = glob.glob(os.path.join(build_dir, "temp*", "build.ninja"))
    if not files:
        raise FileNotFoundError("no build.ninja under %s/temp*: build the extension first (make build)" % build_dir)
    text = open(max(files, key=os.path.getmtime)).read()
    var = dict(re.findall(r"^(\w+) = (.*)$", text, flags=re.M))
    if "nvcc" not in var:
        raise FileNotFoundError("the last build was CPU-only (no nvcc in %s): build with CUDA (MIM_FAST_CUDA=1)"
                                % build_dir)
    commands = {}
    for src in re.findall(r"^build \S+: cuda_compile (\S+)$", text, flags=re.M):
        commands[src] = "%s %s -c %s -o {out} %s -Xptxas=-v" % (var["nvcc"], var.get("cuda_cflags", ""),
                                                               shlex.quote(src), var.get("cuda_post_cflags", ""))
    return commands


def compile_one(src: str, command: str) -> List[Dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = command.format(out=shlex.quote(os.path.join(tmp, "k.o")))
        proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError("nvcc failed on %s:\n%s" % (src, (proc.stdout + proc.stderr)[-4000:]))
    return parse_ptxas(proc.stdout + proc.stderr, os.path.relpath(src, ROOT))


def markdown(kernels: List[Dict]) -> str:
    lines = ["| source | kernel | arch | registers | smem B | stack B | spill stores B | spill loads B |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for k in sorted(kernels, key=lambda k: (k["source"], k["name"])):
        name = k["name"] if len(k["name"]) < 140 else k["name"][:137] + "..."
        lines.append("| %s | `%s` | %s | %s | %d | %d | %d | %d |" % (
            k["source"], name.replace("|", "\\|"), k["arch"], k["registers"], k["smem_bytes"], k["stack_bytes"],
            k["spill_stores"], k["spill_loads"]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--build-dir", default=os.path.join(ROOT, "build"))
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "ptxas"))
    args = p.parse_args(argv)
    try:
        commands = ninja_commands(args.build_dir)
    except FileNotFoundError as exc:
        print("ptxas_report: %s" % exc, file=sys.stderr)
        return 2
    with ThreadPoolExecutor(max_workers=max(1, min(len(commands), os.cpu_count() or 1))) as pool:
        results = list(pool.map(lambda kv: compile_one(*kv), commands.items()))
    kernels = [k for r in results for k in r]
    os.makedirs(args.out, exist_ok=True)
    table = markdown(kernels)
    with open(os.path.join(args.out, "ptxas.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "ptxas.json"), "w") as f:
        json.dump(kernels, f, indent=1)
    print(table)
    spilling = [k for k in kernels if k["spill_stores"] or k["spill_loads"]]
    print("%d kernels from %d files; %d spill" % (len(kernels), len(commands), len(spilling)))
    if not kernels:
        print("ptxas_report: ptxas reported no kernel (was -Xptxas=-v honoured?)", file=sys.stderr)
        return 1
    for k in spilling:
        print("SPILL: %s (%s): %d bytes stores, %d bytes loads" % (k["name"], k["source"], k["spill_stores"],
                                                                  k["spill_loads"]), file=sys.stderr)
    return 1 if spilling else 0


if __name__ == "__main__":
    sys.exit(main())
