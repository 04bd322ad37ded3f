"""The mim-fast command as a user meets it: `mim-fast --help` answers without importing torch (the package
loads lazily), `train -h` documents every option with its default, and --debug shows a traceback."""
import os
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


def test_mim_fast_help_does_not_import_torch():
    code = ("import sys, time; t = time.perf_counter(); from mim_fast.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH', 'torch' in sys.modules, time.perf_counter() - t)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert res.returncode == 0, res.stderr
    _, imported, seconds = res.stdout.splitlines()[-1].split()
    assert imported == "False"
    assert float(seconds) < 1.0  # ~0.05 s measured; importing torch alone takes 1-1.5 s on the CI VM
    assert "train" in res.stdout and "bench" in res.stdout


def test_importing_the_package_is_lazy_and_complete():
    code = ("import sys, mim_fast; print('torch' in sys.modules)\n"
            "print(mim_fast.purify_gate.__module__, 'torch' in sys.modules, sorted(set(mim_fast.__all__) - set(dir(mim_fast))))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["False", "mim_fast.ops.purify_gate True []"]


def test_backend_dispatch_is_marked_constant_as_torch_would():
    """ops._backends marks _status without importing torch._dynamo; it must equal the real decorator."""
    import torch._dynamo  # noqa: F401
    from mim_fast.ops import _backends

    def probe():
        pass

    torch.compiler.assume_constant_result(probe)
    marked = {k: v for k, v in vars(probe).items()}
    assert marked and all(getattr(_backends._status, k, None) == v for k, v in marked.items())
