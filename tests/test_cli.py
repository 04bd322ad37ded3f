"""The mim-fast command as a user meets it: `mim-fast --help` answers without importing torch (the package
loads lazily), `train -h` documents every option with its default, and --debug shows a traceback."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mim_fast import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_env():
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def _cli(argv, capsys):
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_help_lists_every_option_with_its_default(capsys):
    rc, out, _ = _cli(["train", "-h"], capsys)
    assert rc == 0
    actions = cli.parser("train")._subparsers._group_actions[0].choices["train"]._actions
    for action in actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings
            if action.nargs != 0:  # a flag has no default worth showing
                assert "default" in action.help, action.option_strings
    for flag in ("--threads", "--keep-checkpoints", "--trust-data", "--debug", "--max-len"):
        assert flag in out


def test_debug_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(ValueError):
        cli.main(["train", "--out", str(tmp_path / "o"), "--d-model", "42", "--debug"])


def _help_runs():
    """The two ways a user starts the command: the installed script, and python -m mim_fast."""
    script = shutil.which("mim-fast", path=os.path.dirname(sys.executable))
    runs = [[sys.executable, "-m", "mim_fast", "--help"]]
    if script:
        runs.append([script, "--help"])
    return runs


@pytest.mark.parametrize("argv", _help_runs(), ids=lambda a: "script" if a[0].endswith("mim-fast") else "python -m")
def test_mim_fast_help_does_not_import_torch(argv):
    code = ("import sys, time, runpy; t = time.perf_counter(); sys.argv = %r\n"
            "try:\n    runpy.run_module('mim_fast', run_name='__main__', alter_sys=True) if sys.argv[0] == '-m' "
            "else runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('TORCH', 'torch' in sys.modules, time.perf_counter() - t)")
    res = subprocess.run([sys.executable, "-c", code % (["-m", "--help"] if argv[1] == "-m" else argv)],
                         capture_output=True, text=True, env=cli_env(), timeout=120)
    assert res.returncode == 0, res.stderr
    _, imported, seconds = res.stdout.splitlines()[-1].split()
    assert imported == "False"
    assert float(seconds) < 1.0  # ~0.05 s measured; importing torch alone takes 1-1.5 s on the CI VM
    assert "train" in res.stdout and "bench" in res.stdout
    res = subprocess.run(argv, capture_output=True, text=True, env=cli_env(), timeout=120)  # and for real
    assert res.returncode == 0 and "train" in res.stdout, res.stderr


def test_importing_the_package_registers_everything():
    """A program's `import mim_fast` registers torch.ops.mim_fast at once (torch.export.load of a program
    that uses the ops needs nothing else) and exposes every public name."""
    code = ("import sys, mim_fast, torch; print(hasattr(torch.ops.mim_fast, 'purify_gate_forward_triton'))\n"
            "print(mim_fast.purify_gate.__module__, sorted(set(mim_fast.__all__) - set(dir(mim_fast))))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["True", "mim_fast.ops.purify_gate []"]


def test_backend_dispatch_is_marked_constant_as_torch_would():
    """ops._backends marks _status without importing torch._dynamo; it must equal the real decorator."""
    import torch._dynamo  # noqa: F401
    from mim_fast.ops import _backends

    def probe():
        pass

    torch.compiler.assume_constant_result(probe)
    marked = {k: v for k, v in vars(probe).items()}
    assert marked and all(getattr(_backends._status, k, None) == v for k, v in marked.items())
