"""Run folders of ``mim-fast train``: which files a run writes, how they are written, and its checkpoints.

What a run folder holds (and the only files ``--overwrite`` deletes):

    config.json                      the TrainConfig of the run (JSON)
    metrics.json                     history, best epoch, baseline, environment (JSON)
    checkpoint-epoch<NNNN>.pt        the state after epoch N, to resume from; the last ``keep`` are kept
    best.pt                          the model of the epoch with the lowest dev L1
    curves.png, gates.png            plots
    .<name>.<random>.tmp             a write in progress (left behind only by a crash)

Every file is written atomically: into a temporary file in the same folder, flushed and fsync'ed, renamed
over the target, then the folder is fsync'ed — a crash or a full disk leaves the previous version intact,
never a half-written file.

Checkpoints hold only tensors, plain containers, numbers and strings (the config and the history as JSON
text), so ``torch.load(path, weights_only=True)`` reads them without running any code; a file that needs
more is refused. Each carries a SHA-256 digest of its content (every tensor's dtype, shape and bytes, every
value), checked on load: a truncated, damaged or edited checkpoint is detected, and ``--resume`` falls back
to the newest intact one.
"""
import hashlib
import json
import os
import re
import tempfile
from typing import Callable, List, Optional, Tuple

__all__ = ["CheckpointError", "RunFolderError", "RUN_FILES", "atomic_write", "write_json", "save_checkpoint",
           "load_checkpoint", "checkpoints", "latest_intact_checkpoint", "prune_checkpoints", "run_files",
           "is_run_folder", "remove_run_files", "checkpoint_name", "git_commit", "cpu_name"]

FORMAT = "mim_fast.checkpoint"
VERSION = 1
RUN_FILES = ("config.json", "metrics.json", "best.pt", "curves.png", "gates.png")
_CHECKPOINT_RE = re.compile(r"^checkpoint-epoch(\d+)\.pt$")
_TMP_RE = re.compile(r"^\..+\.tmp$")
# config.json keys that mark a folder as written by mim-fast train (present since its first version)
_CONFIG_KEYS = {"data", "out", "seed", "epochs", "batch_size", "lr", "d_model", "fusion"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, not a mim_fast checkpoint, or failing its checksum."""


class RunFolderError(ValueError):
    """--out cannot be used as asked (not a run folder, already holds a run, ...)."""


# ---------------------------------------------------------------------------------------------- atomic writes

def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temporary binary file in the same folder, which is
    flushed, fsync'ed and renamed over ``path``; then the folder is fsync'ed so the rename is durable. On any
    failure the temporary file is removed and ``path`` keeps its previous content."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    except OSError as e:
        e.filename = path  # name the file being written, not the temporary
        raise
    try:
        os.fchmod(fd, _default_mode())  # mkstemp makes it 0600; give it what open() would have
        with os.fdopen(fd, "wb") as f:
            rec = _WriteErrors(f)
            try:
                write(rec)
            except Exception:
                if rec.error is not None:  # torch.save turns ENOSPC & co into a bare RuntimeError
                    raise rec.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            e.filename, e.filename2 = path, None
        raise
    _fsync_dir(folder)


def _default_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


class _WriteErrors:
    """A binary file that remembers the first OSError of its writes (for a message that says "No space
    left on device" rather than the serializer's own error)."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        self._f.flush()


def write_json(path: str, obj) -> None:
    """``obj`` as indented JSON, atomically (numpy/torch scalars become floats)."""
    text = json.dumps(obj, indent=2, default=float) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# ---------------------------------------------------------------------------------------------- checkpoints

def _feed(h, obj) -> None:
    """Hash ``obj`` canonically: a type tag, then the value; dicts in sorted key order; tensors by dtype,
    shape and raw bytes. Only what weights_only loading can return is accepted."""
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(b"T%s%s|" % (str(t.dtype).encode(), repr(tuple(t.shape)).encode()))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"D%d|" % len(obj))
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(b"%s%d|" % (b"L" if isinstance(obj, list) else b"U", len(obj)))
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, bool) or obj is None:
        h.update(b"B%r|" % (obj,))
    elif isinstance(obj, int):
        h.update(b"I%d|" % obj)
    elif isinstance(obj, float):
        h.update(b"F%s|" % obj.hex().encode())
    elif isinstance(obj, str):
        data = obj.encode("utf-8")
        h.update(b"S%d|" % len(data))
        h.update(data)
    else:
        raise TypeError("a checkpoint holds only tensors, dicts, lists, tuples, str, int, float, bool and None; "
                        "got %s" % type(obj).__name__)


def digest(payload: dict) -> str:
    """SHA-256 (hex) of a checkpoint's content, every key but "sha256"."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != "sha256"})
    return h.hexdigest()


def save_checkpoint(path: str, payload: dict) -> None:
    """Save ``payload`` (plain data and tensors) with its format tag and digest, atomically."""
    import torch

    payload = dict(payload, format=FORMAT, version=VERSION)
    payload["sha256"] = digest(payload)
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str) -> dict:
    """Load and verify a checkpoint (on the CPU). Raises :class:`CheckpointError` saying what is wrong with
    it: unreadable (missing, empty, truncated, not a torch file), refused (it holds objects other than
    tensors and plain data, i.e. it could run code), not a mim_fast checkpoint, or a checksum mismatch."""
    import pickle

    import torch

    name = os.path.basename(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError("%s: no such file" % name) from None
    except pickle.UnpicklingError as e:
        text = str(e)
        code = re.search(r"GLOBAL (\S+)", text)
        if code:
            raise CheckpointError("%s: refused — it refers to %s, which is not plain data (loading it could run "
                                  "code)" % (name, code.group(1))) from None
        why = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        raise CheckpointError("%s: not a readable checkpoint, truncated or damaged (%s)" % (
            name, (why.group(1) if why else text.strip().splitlines()[0] if text.strip() else "unpickling failed")
            [:200])) from None
    except Exception as e:  # noqa: BLE001 — torch reports damage as many types (EOFError, RuntimeError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError("%s: not a readable checkpoint, truncated or damaged (%s: %s)"
                              % (name, type(e).__name__, first[:200])) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError("%s: not a mim_fast checkpoint" % name)
    if obj.get("version") != VERSION:
        raise CheckpointError("%s: checkpoint format version %r; this mim_fast reads version %d"
                              % (name, obj.get("version"), VERSION))
    try:
        ok = obj.get("sha256") == digest(obj)
    except TypeError as e:
        raise CheckpointError("%s: %s" % (name, e)) from None
    if not ok:
        raise CheckpointError("%s: checksum mismatch (the file is damaged or was edited)" % name)
    return obj


def checkpoint_name(epoch: int) -> str:
    return "checkpoint-epoch%04d.pt" % epoch


def checkpoints(folder: str) -> List[Tuple[int, str]]:
    """[(epoch, path)] of the resume checkpoints in ``folder``, newest first."""
    found = []
    for name in _listdir(folder):
        m = _CHECKPOINT_RE.match(name)
        if m:
            found.append((int(m.group(1)), os.path.join(folder, name)))
    return sorted(found, reverse=True)


def latest_intact_checkpoint(folder: str) -> Tuple[Optional[dict], Optional[str], List[str]]:
    """(payload, path, problems): the newest checkpoint that loads and verifies, and one message per newer
    one that did not. (None, None, problems) when there is none."""
    problems = []
    for _, path in checkpoints(folder):
        try:
            return load_checkpoint(path), path, problems
        except CheckpointError as e:
            problems.append(str(e))
    return None, None, problems


def prune_checkpoints(folder: str, keep: int) -> None:
    """Delete all but the ``keep`` newest resume checkpoints."""
    for _, path in checkpoints(folder)[keep:]:
        os.unlink(path)


# ---------------------------------------------------------------------------------------------- provenance

def git_commit() -> Optional[str]:
    """The commit of the mim_fast source tree ("-dirty" when tracked files are modified). Where it is not a git
    checkout (an installed wheel, a copy of the tree without .git such as the GPU machine's) or git is
    missing: the environment's MIM_FAST_COMMIT, marked as such, else None."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    told = os.environ.get("MIM_FAST_COMMIT")
    fallback = "%s (MIM_FAST_COMMIT)" % told if told else None
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return fallback
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return fallback
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


# ---------------------------------------------------------------------------------------------- the folder

def _listdir(folder: str) -> List[str]:
    try:
        return sorted(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _is_run_file(folder: str, name: str) -> bool:
    if name in RUN_FILES or _CHECKPOINT_RE.match(name) or name == "checkpoint.pt":
        return os.path.isfile(os.path.join(folder, name)) or os.path.islink(os.path.join(folder, name))
    # temporaries of atomic_write; also a stale "checkpoint.pt.tmp" of the first versions
    return bool(_TMP_RE.match(name) or name == "checkpoint.pt.tmp")


def run_files(folder: str) -> List[str]:
    """Names of the files in ``folder`` that a run writes."""
    return [n for n in _listdir(folder) if _is_run_file(folder, n)]


def _config_of(folder: str) -> Optional[dict]:
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def is_run_folder(folder: str) -> bool:
    """Whether ``folder`` holds a run of mim-fast train: a config.json with a TrainConfig's keys, or a
    checkpoint file of ours."""
    cfg = _config_of(folder)
    if cfg is not None and _CONFIG_KEYS <= set(cfg):
        return True
    return bool(checkpoints(folder)) or os.path.isfile(os.path.join(folder, "checkpoint.pt"))


def remove_run_files(folder: str) -> List[str]:
    """Delete the files a run writes (and nothing else) from a run folder; returns their names."""
    names = run_files(folder)
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):  # a stale temporary that is a folder: leave it
            continue
        os.unlink(path)
    if names:
        _fsync_dir(folder)
    return names
