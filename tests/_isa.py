"""Run a script under a capped CPU instruction set, shared by the tests that compare the CPU kernels'
ISA variants (the variant is chosen once per process, from MIM_FAST_CPU_ISA, so it takes a subprocess)."""
import os
import subprocess
import sys
from typing import Optional

import torch

import mim_fast


def saved_under_isa(code: str, isa: Optional[str], tag: str) -> list:
    """Run ``code`` — a script that ``torch.save``s its results to ``sys.argv[1]`` — in a fresh Python whose
    CPU kernels are capped at ``isa`` ("default", "avx2", ...; None: as in this process), from the
    repository root, without the Triton interpreter; return what it saved."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(mim_fast.__file__)))
    path = "/tmp/mim_fast_%s_isa_%s_%d.pt" % (tag, isa or "widest", os.getpid())
    env = dict(os.environ, TRITON_INTERPRET="0")
    if isa is not None:
        env["MIM_FAST_CPU_ISA"] = isa
    res = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, env=env, timeout=300,
                         cwd=root)
    assert res.returncode == 0, res.stderr
    saved = torch.load(path)
    os.remove(path)
    return saved
