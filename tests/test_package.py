"""The package as a user meets it: import without the extension, build info, backend reporting,
the info and demo commands."""
import os
import subprocess
import sys

import pytest
import torch

import mim_fast
from mim_fast.ops import _backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code_or_args, env=None):
    args = [sys.executable] + (["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args)
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, **(env or {})})


def test_imports_with_a_warning_when_the_extension_is_missing():
    # sys.modules[name] = None makes `from . import _C` raise ImportError, as for an unbuilt package.
    # The package loads on first use (`import mim_fast` alone imports neither torch nor the extension).
    res = _run("import sys, warnings; sys.modules['mim_fast._C'] = None\n"
               "with warnings.catch_warnings(record=True) as w:\n"
               "    warnings.simplefilter('always'); import mim_fast; backends = mim_fast.available_backends(device='cpu')\n"
               "print([str(x.message) for x in w]); print(backends)\n"
               "import torch; print(mim_fast.purify_gate(torch.randn(3, 2, 4), torch.randn(2, 3), seed=1).pooled.shape)\n"
               "try:\n    mim_fast.philox_uniform(1, 0, (3,), backend='cpu')\n"
               "except mim_fast.BackendUnavailableError as e: print('ERR', e)\n",
               env={"TRITON_INTERPRET": "0"})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "mim_fast._C is not available" in lines[0]
    assert lines[1] == "['torch']"
    assert lines[2] == "torch.Size([2, 4])"
    assert lines[3].startswith("ERR philox_uniform: backend 'cpu' cannot run here: the compiled extension")


@pytest.mark.skipif(mim_fast.build_info() is None, reason="mim_fast._C not built")
def test_build_info_describes_the_binary():
    info = mim_fast.build_info()
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["with_cuda"], bool) and isinstance(info["with_openmp"], bool)
    if info["with_cuda"]:
        assert info["cuda_runtime_version"] >= 11000 and info["cuda_archs"]
    if os.environ.get("MIM_FAST_EXPECT_CUDA_BUILD") == "1":  # CI builds against the CUDA torch
        assert info["with_cuda"], "CI expects the CUDA half of the extension to be compiled and linked"


def test_backend_status_explains_every_backend():
    status = mim_fast.backend_status("purify_gate", "cpu")
    assert set(status) == set(mim_fast.BACKENDS)
    assert status["torch"] is None
    assert all(reason is None or isinstance(reason, str) and reason for reason in status.values())
    assert "cuda" not in mim_fast.available_backends(device="cpu")
    assert mim_fast.available_backends("kgs_loss", "cpu")[0] == "torch"


def test_auto_never_picks_the_triton_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    _backends.register("test_op", "triton", lambda: calls.append("triton"), _backends.always)
    _backends.register("test_op", "torch", lambda: calls.append("torch"), _backends.always)
    try:
        _backends.select("test_op", "auto", torch.device("cpu"), ())()
        _backends.select("test_op", "triton", torch.device("cpu"), ())()
        assert calls == ["torch", "triton"]
    finally:
        del _backends._REGISTRY["test_op"]


def test_when_nothing_can_serve_the_error_lists_every_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _backends.register("test_op", "triton", lambda: None, _backends.needs_triton)
    try:
        with pytest.raises(_backends.BackendUnavailableError) as err:
            _backends.select("test_op", "auto", torch.device("cpu"), (torch.float32,))
        msg = str(err.value)
        assert msg.startswith("test_op: no backend can run on cpu")
        for name in mim_fast.BACKENDS:
            assert "\n  %s: " % name in msg
    finally:
        del _backends._REGISTRY["test_op"]


def test_info_command_prints_build_and_backends():
    res = _run(["-m", "mim_fast", "info"])
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "mim_fast %s" % mim_fast.__version__ in out and "torch %s" % torch.__version__ in out
    assert "extension mim_fast._C:" in out
    for op in ("purify_gate", "kgs_loss", "philox_uniform"):
        assert "%s on cpu" % op in out
    assert "available here: torch" in out


def test_demo_runs_and_agrees_across_backends():
    res = _run(["-m", "mim_fast", "demo", "--device", "cpu"])
    assert res.returncode == 0, res.stderr
    assert "== purify_gate" in res.stdout and "== kgs_loss" in res.stdout
    for line in res.stdout.splitlines():
        if "max diff vs torch" in line:
            diff = float(line.split("max diff vs torch")[1].split()[0])
            assert diff < 1e-4, line


def test_a_plain_install_brings_what_the_plots_need():
    """`pip install -e .` installs the [project] dependencies: matplotlib must be one of them, or
    `mim-fast train` / `mim-fast ablate` write no plots."""
    import re
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    names = {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower() for d in deps}
    assert {"torch", "numpy", "matplotlib"} <= names
