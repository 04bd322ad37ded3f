"""Run folders and checkpoints of `mim-fast train` (mim_fast.runs, train.run/resume, the CLI): the safe,
verified checkpoint format, fallback to an intact checkpoint, atomic writes, what --overwrite may delete,
--resume in a moved folder and which flags it accepts, one-line CLI errors that write nothing, and fault
injection through the real command (kill -9, a damaged checkpoint, Ctrl-C, a full disk, a read-only folder)."""
import collections
import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from mim_fast import cli, runs
from mim_fast import train as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(synthetic={"n_train": 96, "n_dev": 32, "n_test": 32, "T": 8, "dims": [8, 6, 5]}, d_model=10, heads=2,
            batch_size=16, epochs=2, lr=3e-3)
QUIET = dict(progress=False, log=lambda *a: None)
# The CLI's fault-injection runs: the demo data with a small model (about 1 s per epoch on one thread).
CLI_RUN = ["--d-model", "10", "--batch-size", "64", "--quiet", "--threads", "1"]


def tiny(out, **kw):
    return T.TrainConfig(out=str(out), **{**TINY, **kw})


def files(folder):
    """{name: bytes} of every file in a folder (to show nothing changed)."""
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[name] = f.read()
    return out


def comparable(metrics):
    """metrics.json without what legitimately differs between two runs of the same trajectory: epoch wall
    times and the sessions' start times/hosts."""
    def strip(row):
        return {k: v for k, v in row.items() if k != "seconds"}
    return {"history": [strip(h) for h in metrics["history"]], "best": strip(metrics["best"]),
            "baseline": metrics["baseline"], "config": {k: v for k, v in metrics["config"].items() if k != "out"}}


def cli_env():
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def mim_fast(*args, **kw):
    return subprocess.run([sys.executable, "-m", "mim_fast", *args], capture_output=True, text=True, env=cli_env(),
                          timeout=600, **kw)


def one_line(stderr):
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------- checkpoints

def test_checkpoints_load_without_code_and_carry_a_verified_digest(tmp_path):
    T.run(tiny(tmp_path / "run", epochs=1), **QUIET)
    path = str(tmp_path / "run" / "checkpoint-epoch0001.pt")
    raw = torch.load(path, weights_only=True)  # plain data only: safe to load from anywhere
    assert raw["format"] == "mim_fast.checkpoint" and raw["epoch"] == 1 and raw["kind"] == "resume"
    assert json.loads(raw["config"])["d_model"] == 10 and json.loads(raw["state"])["epoch"] == 1
    assert raw["sha256"] == runs.digest(raw)
    assert runs.load_checkpoint(path)["epoch"] == 1
    best = torch.load(str(tmp_path / "run" / "best.pt"), weights_only=True)
    assert best["kind"] == "best" and runs.load_checkpoint(str(tmp_path / "run" / "best.pt"))["epoch"] == 1


def _largest_tensor_offset(path):
    ck = torch.load(path, weights_only=True)
    big = max(ck["model"].values(), key=lambda t: t.numel())
    blob = open(path, "rb").read()
    at = blob.find(big.contiguous().numpy().tobytes())
    assert at >= 0
    return blob, at + big.numel() * big.element_size() // 2


def test_every_kind_of_damage_is_reported_not_loaded(tmp_path):
    T.run(tiny(tmp_path / "run", epochs=1), **QUIET)
    good = str(tmp_path / "run" / "checkpoint-epoch0001.pt")
    blob, inside = _largest_tensor_offset(good)

    def damaged(name, data):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(runs.CheckpointError) as e:
            runs.load_checkpoint(str(path))
        assert str(e.value).startswith(name + ": ") and "\n" not in str(e.value)
        return str(e.value)

    flipped = bytearray(blob)
    flipped[inside] ^= 0x10  # one bit of one weight: torch.load alone would resume silently from it
    assert "checksum mismatch" in damaged("flipped.pt", bytes(flipped))
    assert "truncated or damaged" in damaged("truncated.pt", blob[: len(blob) // 2])
    assert "truncated or damaged" in damaged("empty.pt", b"")
    assert "not a readable checkpoint, truncated or damaged" in damaged("random.pt",
                                                                        np.random.default_rng(0).bytes(5000))
    other = tmp_path / "other.tmp"
    torch.save({"model": {}}, other)
    assert "not a mim_fast checkpoint" in damaged("other.pt", other.read_bytes())
    edited = torch.load(good, weights_only=True)
    edited["state"] = edited["state"].replace('"epoch": 1', '"epoch": 7')
    torch.save(edited, other)
    assert "checksum mismatch" in damaged("edited.pt", other.read_bytes())


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > %s" % os.environ.get("MIM_FAST_TEST_MARKER", "/dev/null"),))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("MIM_FAST_TEST_MARKER", str(marker))
    T.run(tiny(tmp_path / "run", epochs=1), **QUIET)
    path = tmp_path / "run" / "checkpoint-epoch0002.pt"
    torch.save({"format": "mim_fast.checkpoint", "payload": _RunsCode()}, path)
    with pytest.raises(runs.CheckpointError, match="refused — it refers to (posix|os).system, which is not plain "
                                                   "data \\(loading it could run code\\)"):
        runs.load_checkpoint(str(path))
    warnings = []
    T.resume(str(tmp_path / "run"), {"epochs": 2}, warn=warnings.append, **QUIET)
    assert not marker.exists()
    assert len(warnings) == 1 and "checkpoint-epoch0002.pt: refused" in warnings[0]


def test_resume_falls_back_to_the_newest_intact_checkpoint_and_matches_the_uninterrupted_run(tmp_path):
    full = T.run(tiny(tmp_path / "full", epochs=4), **QUIET)
    T.run(tiny(tmp_path / "run", epochs=3), keep_checkpoints=2, **QUIET)
    assert [e for e, _ in runs.checkpoints(str(tmp_path / "run"))] == [3, 2]
    newest = tmp_path / "run" / "checkpoint-epoch0003.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    warnings, log = [], []
    resumed = T.resume(str(tmp_path / "run"), {"epochs": 4}, warn=warnings.append, progress=False, log=log.append)
    assert len(warnings) == 1
    assert warnings[0].startswith("checkpoint-epoch0003.pt: not a readable checkpoint, truncated or damaged")
    assert warnings[0].endswith("resuming from checkpoint-epoch0002.pt instead")
    assert log[0].startswith("resuming %s from checkpoint-epoch0002.pt: 2 of 4 epochs done; training epochs 3-4"
                             % (tmp_path / "run"))
    assert comparable(resumed) == comparable(full)
    with pytest.raises(T.RunFolderError, match="no intact checkpoint .*checksum mismatch"):
        for _, path in runs.checkpoints(str(tmp_path / "run")):
            ck = torch.load(path, weights_only=True)
            ck["epoch"] += 1
            torch.save(ck, path)
        T.resume(str(tmp_path / "run"), **QUIET)


# ---------------------------------------------------------------------------------------------- atomic writes

def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    runs.write_json(str(target), {"a": 1})
    before = target.read_bytes()

    def no_space(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs._WriteErrors, "write", no_space)
    with pytest.raises(OSError) as e:
        runs.write_json(str(target), {"a": 2})
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as e:  # torch.save reports it as a RuntimeError; the OSError is what comes out
        runs.save_checkpoint(str(tmp_path / "c.pt"), {"x": torch.ones(1000)})
    assert e.value.errno == errno.ENOSPC
    assert target.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["metrics.json"]


def test_written_files_get_the_usual_permissions(tmp_path):
    runs.write_json(str(tmp_path / "a.json"), {})
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "a.json").st_mode & 0o777 == 0o666 & ~umask


# ---------------------------------------------------------------------------------------------- --overwrite

def _cli(argv, capsys):
    """cli.main in-process: (exit status, stdout, stderr); argparse's SystemExit is an exit status."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_overwrite_checks_every_input_before_it_deletes_anything(tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    for data in (str(tmp_path / "none.pkl"), "synthetic"):  # a missing data file, then valid inputs
        rc, _, err = _cli(["train", "--out", str(precious), "--overwrite", "--data", data], capsys)
        assert rc == 2 and "holds files that are not a mim-fast run (thesis.txt); refusing to write into it" \
            in one_line(err)
        assert files(precious) == {"thesis.txt": b"years of work"}

    run = tmp_path / "run"
    T.run(tiny(run, epochs=1), **QUIET)
    (run / "notes.txt").write_text("mine")
    before = files(run)
    wrong = tmp_path / "wrong.pkl"
    wrong.write_bytes(pickle.dumps({"something": "else"}))
    rc, _, err = _cli(["train", "--out", str(run), "--overwrite", "--data", str(wrong)], capsys)
    assert rc == 2 and "wrong.pkl: not a MAG-BERT or MMSA pickle" in one_line(err)
    assert files(run) == before  # the run is intact
    T.run(tiny(run, epochs=1, seed=5), overwrite=True, **QUIET)
    assert (run / "notes.txt").read_text() == "mine"  # only the files a run writes were replaced
    assert json.loads((run / "config.json").read_text())["seed"] == 5


def test_overwrite_deletes_only_run_files(tmp_path):
    run = tmp_path / "run"
    T.run(tiny(run, epochs=3), **QUIET)
    (run / ".checkpoint-epoch0004.pt.abc123.tmp").write_bytes(b"left by a crash")
    (run / "data.pkl").write_bytes(b"user data")
    (run / "sub").mkdir()
    assert sorted(runs.run_files(str(run))) == sorted([
        ".checkpoint-epoch0004.pt.abc123.tmp", "best.pt", "checkpoint-epoch0001.pt", "checkpoint-epoch0002.pt",
        "checkpoint-epoch0003.pt", "config.json", "curves.png", "gates.png", "metrics.json"])
    runs.remove_run_files(str(run))
    assert sorted(os.listdir(run)) == ["data.pkl", "sub"]


def test_already_holds_a_run_suggests_resume_only_when_there_is_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    T.run(tiny(run), stop_after_steps=2, **QUIET)  # stopped in epoch 1: config.json, no checkpoint
    with pytest.raises(T.RunFolderExists) as e:
        T.run(tiny(run), **QUIET)
    assert "--resume" not in str(e.value) and "has no checkpoint" in str(e.value) and "--overwrite" in str(e.value)
    with pytest.raises(T.RunFolderError, match="has no checkpoint \\(the run stopped before its first epoch ended\\)"):
        T.resume(str(run), **QUIET)
    T.run(tiny(run, epochs=1), overwrite=True, **QUIET)
    with pytest.raises(T.RunFolderExists, match="checkpoint of epoch 1\\): pass --resume to continue it or "
                                                "--overwrite"):
        T.run(tiny(run), **QUIET)


# ---------------------------------------------------------------------------------------------- --resume

def test_a_copied_run_resumes_in_place_and_never_writes_into_the_original(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    T.run(tiny(a, epochs=1), **QUIET)
    shutil.copytree(a, b)
    before = files(a)
    T.resume(str(b), {"epochs": 2}, **QUIET)
    assert files(a) == before
    metrics = json.loads((b / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and metrics["config"]["out"] == str(b)
    assert json.loads((b / "config.json").read_text())["out"] == str(b)
    shutil.move(str(b), str(tmp_path / "C"))  # a moved run too
    T.resume(str(tmp_path / "C"), {"epochs": 3}, **QUIET)
    assert len(json.loads((tmp_path / "C" / "metrics.json").read_text())["history"]) == 3


def test_resume_applies_safe_changes_and_refuses_the_others(tmp_path):
    run = tmp_path / "run"
    T.run(tiny(run, epochs=2), **QUIET)
    before = files(run)
    with pytest.raises(T.RunFolderError, match="cannot change --lr 0.5 \\(the run has 0.003\\); --batch-size 7 "
                                               "\\(the run has 16\\): start a new run"):
        T.resume(str(run), {"lr": 0.5, "batch_size": 7, "epochs": 3}, **QUIET)
    with pytest.raises(ValueError, match="--epochs 1: the run in .* has already trained 2 epochs"):
        T.resume(str(run), {"epochs": 1}, **QUIET)
    assert files(run) == before
    out = T.resume(str(run), {"epochs": 3, "lr": 3e-3, "device": "cpu", "backend": "torch"}, **QUIET)
    assert out["config"]["backend"] == "torch" and out["config"]["epochs"] == 3
    assert [s["first_epoch"] for s in out["sessions"]] == [1, 3]
    assert out["sessions"][-1]["backends"] == {"purify_gate": "torch", "kgs_loss": "torch"}


def test_metrics_record_the_environment(tmp_path):
    T.run(tiny(tmp_path / "run", epochs=1), threads=1, **QUIET)
    env = json.loads((tmp_path / "run" / "metrics.json").read_text())["environment"]
    import mim_fast
    assert env["threads"] == 1 and env["torch"] == torch.__version__ and env["mim_fast"] == mim_fast.__version__
    assert env["device"] == "cpu" and set(env["backends"]) == {"purify_gate", "kgs_loss"}
    assert env["commit"] is None or len(env["commit"].split("-")[0]) == 40


# ---------------------------------------------------------------------------------------------- CLI mistakes

def _no_gpu():
    return not torch.cuda.is_available()


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "argument --epochs: must be an integer >= 1; got '0'"),
    (["--epochs", "-1"], "argument --epochs: must be an integer >= 1; got '-1'"),
    (["--epochs", "x"], "argument --epochs: must be an integer >= 1; got 'x'"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1; got '0'"),
    (["--lr", "0"], "argument --lr: must be a finite number > 0; got '0'"),
    (["--lr", "nan"], "argument --lr: must be a finite number > 0; got 'nan'"),
    (["--threads", "0"], "argument --threads: must be an integer >= 1; got '0'"),
    (["--keep-checkpoints", "0"], "argument --keep-checkpoints: must be an integer >= 1"),
    (["--mask-ratio", "0"], "argument --mask-ratio: must be an integer >= 1"),
    (["--penalty-weight", "-1"], "argument --penalty-weight: must be a finite number >= 0"),
    (["--fusion", "sum"], "argument --fusion: invalid choice: 'sum'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--d-model", "42"], "d_model must be divisible by heads (the Transformer layers split it across "
                          "heads); got d_model (--d-model) = 42, heads = 5"),
    (["--device", "toaster"], "--device 'toaster' is not a device name (available here: cpu"),
    (["--device", "cpu", "--backend", "cuda"], "--backend cuda cannot run purify_gate on cpu: "),
    (["--data", "{tmp}/missing.pkl"], "missing.pkl"),
    (["--data", "{tmp}"], "is a directory, not a data file"),
    (["--bert", "{tmp}/nobert"], "bert_path (--bert): {tmp}/nobert is not a folder"),
    (["--resume"], "--resume: {out} is not a folder"),
    (["--resume", "--overwrite"], "--resume continues the run in --out and --overwrite replaces it"),
])
def test_each_cli_mistake_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    argv = [a.format(tmp=tmp_path) for a in argv]
    message = message.format(tmp=tmp_path, out=out)
    rc, stdout, err = _cli(["train", "--out", str(out), *argv], capsys)
    assert rc == 2
    line = one_line(err)
    assert line.startswith("mim-fast train: error: ") and message in line, line
    assert not out.exists() and sorted(os.listdir(tmp_path)) == []


@pytest.mark.skipif(not _no_gpu(), reason="checks the message on a machine without a GPU")
def test_an_unavailable_device_names_what_is_available(tmp_path, capsys):
    rc, _, err = _cli(["train", "--out", str(tmp_path / "o"), "--device", "cuda"], capsys)
    assert rc == 2 and one_line(err).endswith("--device cuda: torch sees no CUDA device here (available here: cpu)")
    assert not (tmp_path / "o").exists()


def test_out_that_is_a_file_or_under_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    for out in (tmp_path / "f", tmp_path / "f" / "run"):
        rc, _, err = _cli(["train", "--out", str(out)], capsys)
        assert rc == 2 and "%s is a file, not a folder" % (tmp_path / "f") in one_line(err)
    assert sorted(os.listdir(tmp_path)) == ["f"] and (tmp_path / "f").read_text() == "x"


# ---------------------------------------------------------------------------------------------- item 6

def _magbert_file(path, labels):
    rng = np.random.default_rng(0)
    obj = {}
    for split, ys in labels.items():
        rows = []
        for i, y in enumerate(ys):
            L = 9 + i % 3
            rows.append(((["w%d" % rng.integers(5) for _ in range(L)], rng.standard_normal((L, 47)),
                          rng.standard_normal((L, 74))), np.array([[y]]), "%s_%d" % (split, i)))
        obj[split] = rows
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return str(path)


def test_max_len_applies_to_a_magbert_pickle(tmp_path):
    path = _magbert_file(tmp_path / "mosi.pkl", {s: list(np.linspace(-2, 2, 8)) for s in ("train", "dev", "test")})
    cfg = T.TrainConfig(data=path, out=str(tmp_path / "run"), max_len=7)
    dataset = T.load_for_training(cfg)
    assert dataset.seq_len == {"text": 7, "audio": 7, "vision": 7}


def test_bad_labels_are_refused_naming_file_and_sample(tmp_path, capsys):
    labels = {s: list(np.linspace(-2, 2, 8)) for s in ("train", "dev", "test")}
    labels["train"][3] = float("nan")
    nan = _magbert_file(tmp_path / "nan.pkl", labels)
    labels["train"][3] = 0.5
    labels["test"][5] = 100.0
    far = _magbert_file(tmp_path / "far.pkl", labels)
    rc, _, err = _cli(["train", "--data", nan, "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and one_line(err) == "mim-fast train: error: %s: split 'train' sample 3: label is nan (1 NaN/inf " \
                                        "label)" % nan
    rc, _, err = _cli(["train", "--data", far, "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "far.pkl: split 'test' sample 5: label 100 is outside [-3, 3]" in one_line(err)
    assert sorted(os.listdir(tmp_path)) == ["far.pkl", "nan.pkl"]


def test_trust_data_reaches_the_loader(tmp_path, capsys):
    path = tmp_path / "odd.pkl"
    with open(path, "wb") as f:  # a defaultdict: harmless, but not plain data for the restricted unpickler
        pickle.dump(collections.defaultdict(list, {"train": [], "dev": [], "test": []}), f)
    rc, _, err = _cli(["train", "--data", str(path), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "refusing to run it. If you trust this file, pass trusted=True (mim-fast train: " \
                       "--trust-data)" in one_line(err)
    rc, _, err = _cli(["train", "--data", str(path), "--out", str(tmp_path / "o"), "--trust-data"], capsys)
    assert rc == 2 and "split 'train' is empty" in one_line(err)  # loaded, then checked
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- fault injection

def _wait_for(path, proc, timeout=300):
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "timed out waiting for %s" % path
        time.sleep(0.05)


def test_cli_kill_9_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    res = mim_fast("train", "--out", str(full), "--epochs", "3", *CLI_RUN)
    assert res.returncode == 0, res.stderr
    proc = subprocess.Popen([sys.executable, "-m", "mim_fast", "train", "--out", str(killed), "--epochs", "3",
                             *CLI_RUN], env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(killed / "checkpoint-epoch0001.pt", proc)
    epoch_s = json.loads((full / "metrics.json").read_text())["history"][0]["seconds"]
    time.sleep(min(0.2, 0.4 * epoch_s))  # inside epoch 2 (an epoch takes ~1 s; the poll is every 50 ms)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done = [e for e, _ in runs.checkpoints(str(killed))]
    assert done and done[0] < 3
    res = mim_fast("train", "--out", str(killed), "--resume", "--quiet")
    assert res.returncode == 0, res.stderr
    assert "resuming %s from checkpoint-epoch%04d.pt" % (killed, done[0]) in res.stdout
    a = json.loads((full / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert comparable(a) == comparable(b)  # bit-exact: every float of every epoch
    for name in ("best.pt", "checkpoint-epoch0003.pt"):
        a, b = (torch.load(folder / name, weights_only=True)["model"] for folder in (full, killed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_cli_damaged_newest_checkpoint_falls_back_with_one_warning(tmp_path):
    run = tmp_path / "run"
    res = mim_fast("train", "--out", str(run), "--epochs", "2", *CLI_RUN)
    assert res.returncode == 0, res.stderr
    newest = run / "checkpoint-epoch0002.pt"
    blob, inside = _largest_tensor_offset(str(newest))
    flipped = bytearray(blob)
    flipped[inside] ^= 0x01
    newest.write_bytes(bytes(flipped))
    res = mim_fast("train", "--out", str(run), "--resume", "--epochs", "3", "--quiet")
    assert res.returncode == 0, res.stderr
    assert one_line(res.stderr) == ("warning: checkpoint-epoch0002.pt: checksum mismatch (the file is damaged or "
                                    "was edited); resuming from checkpoint-epoch0001.pt instead")
    assert "from checkpoint-epoch0001.pt: 1 of 3 epochs done; training epochs 2-3" in res.stdout
    assert [h["epoch"] for h in json.loads((run / "metrics.json").read_text())["history"]] == [1, 2, 3]


def test_cli_ctrl_c_says_how_to_continue(tmp_path):
    run = tmp_path / "run"
    # The child gets SIGINT's default action back: under a shell's background job (`make test &`, a CI
    # runner's `nohup ... &`) SIGINT is inherited as ignored, and Python then installs no handler for it.
    proc = subprocess.Popen([sys.executable, "-m", "mim_fast", "train", "--out", str(run), "--epochs", "30",
                             *CLI_RUN], env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for(run / "checkpoint-epoch0001.pt", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out[-2000:], err[-2000:])
    done = runs.checkpoints(str(run))[0][0]
    assert one_line(err) == ("mim-fast train: interrupted after epoch %d; rerun with --resume to continue "
                             "(mim-fast train --resume --out %s)" % (done, run))
    assert not [n for n in os.listdir(run) if n.endswith(".tmp")]


def _userns_tmpfs_works():
    if shutil.which("unshare") is None:
        return False
    res = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt && echo ok"],
                         capture_output=True, text=True, timeout=30)
    return res.stdout.strip() == "ok"


def _in_namespace(script, tmp_path):
    """Run a shell script as root of a private mount namespace (unshare -rm): it can mount a tiny or
    read-only tmpfs over a folder without privileges on the host, and nothing outlives it."""
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=cli_env(),
                          timeout=600, cwd=str(tmp_path))


@pytest.mark.skipif(not _userns_tmpfs_works(), reason="needs unprivileged user namespaces (unshare -rm)")
def test_cli_full_disk_is_one_line_and_loses_nothing(tmp_path):
    """A real full disk: the run folder is a tmpfs too small for a third checkpoint. The error is one line,
    exit 1, the checkpoints written before stay intact, no temporary is left, and --resume elsewhere works."""
    run = tmp_path / "run"
    run.mkdir()
    py = sys.executable
    args = " ".join(CLI_RUN)
    # a checkpoint of this model is ~0.3 MB, best.pt ~0.07 MB: 700 kB holds two epochs, then the disk is full
    script = ("mount -t tmpfs -o size=700k none %s && %s -m mim_fast train --out %s --epochs 6 %s; rc=$?; "
              "mkdir %s/saved && cp -a %s/. %s/saved/; exit $rc" % (run, py, run, args, tmp_path, run, tmp_path))
    res = _in_namespace(script, tmp_path)
    assert res.returncode == 1, (res.stdout, res.stderr)
    line = one_line(res.stderr)
    assert line.startswith("mim-fast train: error: cannot write %s/" % run) and line.endswith(
        "No space left on device"), line
    saved = tmp_path / "saved"
    names = sorted(os.listdir(saved))
    assert not [n for n in names if n.endswith(".tmp")], names
    done = runs.checkpoints(str(saved))
    assert done, names
    for _, path in done:
        runs.load_checkpoint(path)  # every checkpoint on the full disk is intact
    res = mim_fast("train", "--out", str(saved), "--resume", "--epochs", str(done[0][0] + 1), "--quiet")
    assert res.returncode == 0, res.stderr


def test_cli_full_disk_injected_in_process(tmp_path, capsys, monkeypatch):
    """The same through an injected ENOSPC (for machines without user namespaces): the third checkpoint's
    write fails; the error is one line, exit 1, and the earlier checkpoints are intact."""
    real = runs._WriteErrors.write
    count = {"checkpoints": 0}

    def write(self, data):
        return real(self, data)

    def save(path, payload, _orig=runs.save_checkpoint):
        if os.path.basename(path).startswith("checkpoint-"):
            count["checkpoints"] += 1
            if count["checkpoints"] == 3:
                def full(self, data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                monkeypatch.setattr(runs._WriteErrors, "write", full)
        return _orig(path, payload)

    monkeypatch.setattr(runs, "save_checkpoint", save)
    run = tmp_path / "run"
    rc, _, err = _cli(["train", "--out", str(run), "--epochs", "4", *CLI_RUN], capsys)
    assert rc == 1
    assert one_line(err) == "mim-fast train: error: cannot write %s: No space left on device" % (
        run / "checkpoint-epoch0003.pt")
    assert [e for e, _ in runs.checkpoints(str(run))] == [2, 1]
    assert not [n for n in os.listdir(run) if n.endswith(".tmp")]
    for _, path in runs.checkpoints(str(run)):
        runs.load_checkpoint(path)


def test_cli_read_only_folder_is_one_line_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    res = mim_fast("train", "--out", str(run), "--epochs", "1", *CLI_RUN)
    assert res.returncode == 0, res.stderr
    before = files(run)
    args = ["--out", str(run), "--resume", "--epochs", "2", "--quiet"]
    if os.geteuid() != 0:
        os.chmod(run, 0o555)
        try:
            res = mim_fast("train", *args)
        finally:
            os.chmod(run, 0o755)
    elif _userns_tmpfs_works():  # root ignores permissions: make it a read-only bind mount instead
        res = _in_namespace("mount --bind %s %s && mount -o remount,bind,ro %s && %s -m mim_fast train %s" % (
            run, run, run, sys.executable, " ".join(args)), tmp_path)
    else:
        pytest.skip("running as root without user namespaces: cannot make a read-only folder")
    assert res.returncode == 1, (res.stdout, res.stderr)
    line = one_line(res.stderr)
    assert line.startswith("mim-fast train: error: cannot write %s" % (run / "config.json")), line
    assert line.endswith("Read-only file system") or line.endswith("Permission denied"), line
    assert files(run) == before


def test_git_commit_outside_a_checkout_takes_the_commit_from_the_environment(monkeypatch):
    """A copy of the tree without .git (the GPU machine's) records the commit gpu_check.sh was told."""
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 128, "", "not a git repo"))
    monkeypatch.delenv("MIM_FAST_COMMIT", raising=False)
    assert runs.git_commit() is None
    monkeypatch.setenv("MIM_FAST_COMMIT", "0123abcd")
    assert runs.git_commit() == "0123abcd (MIM_FAST_COMMIT)"
