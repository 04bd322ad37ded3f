"""Backend registry and dispatch: which implementation of an op runs, or why none can.

Each (op, backend) pair registers an implementation and a ``reason`` function that returns None when
it can serve a call (device, dtypes) or a sentence saying why not. ``backend="auto"`` takes the first
backend in the device's preference order that can serve; an explicit backend that cannot serve
raises :class:`BackendUnavailableError` with its reason, and when nothing can serve the error lists
every backend with its reason.
"""
import functools
import importlib.util
import os
from typing import Callable, Dict, Iterable, List, Optional

import torch

from .. import _ext

BACKENDS = ("torch", "cpu", "triton", "cuda")
# Fastest first. Triton on CPU tensors is the interpreter (a test vehicle, far slower than eager):
# "auto" never picks it on CPU.
AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this call; the message says why."""


Reason = Callable[[torch.device, Iterable[torch.dtype]], Optional[str]]
_REGISTRY: Dict[str, Dict[str, tuple]] = {}


def register(op: str, backend: str, fn: Callable, reason: Reason) -> None:
    assert backend in BACKENDS, backend
    _REGISTRY.setdefault(op, {})[backend] = (fn, reason)
    _status_cached.cache_clear()
    _selected.cache_clear()


def ops() -> List[str]:
    return sorted(_REGISTRY)


# --- reasons shared by the kernel backends ----------------------------------------------------------
def always(device, dtypes) -> Optional[str]:
    return None


@functools.lru_cache(maxsize=None)
def triton_import_error() -> Optional[str]:
    # cached: find_spec walks sys.path with a stat() per entry (~25 µs), and this is asked on every call
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def needs_triton(device: torch.device, dtypes) -> Optional[str]:
    err = triton_import_error()
    if err:
        return err
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if triton_interpreting():
            return None
        return "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 (set before triton is imported)"
    return "Triton kernels do not run on %s tensors" % device.type


def needs_cpu_extension(device: torch.device, dtypes) -> Optional[str]:
    if _ext.C is None:
        return "the compiled extension mim_fast._C is not loaded (%s)" % _ext.load_error
    if device.type != "cpu":
        return "the 'cpu' backend takes CPU tensors; these are on %s" % device
    return None


def needs_cuda_extension(device: torch.device, dtypes) -> Optional[str]:
    if _ext.C is None:
        return "the compiled extension mim_fast._C is not loaded (%s)" % _ext.load_error
    if not _ext.build_info()["with_cuda"]:
        return "mim_fast._C was built without CUDA (CPU-only torch or no nvcc at build time)"
    if device.type != "cuda":
        return "the 'cuda' backend takes CUDA tensors; these are on %s" % device
    return None


def none_of(dtypes_ok) -> Reason:
    def reason(device, dtypes):
        bad = [d for d in dtypes if d not in dtypes_ok]
        return "dtype %s is not supported (supported: %s)" % (bad[0], ", ".join(str(d) for d in dtypes_ok)) if bad else None
    return reason


def all_of(*reasons: Reason) -> Reason:
    def reason(device, dtypes):
        for r in reasons:
            msg = r(device, dtypes)
            if msg:
                return msg
        return None
    return reason


# --- dispatch ---------------------------------------------------------------------------------------
def _assume_constant_result(fn):
    """What ``torch.compiler.assume_constant_result`` does (it sets this one attribute, torch 2.4-2.14),
    without its ``import torch._dynamo``: that import costs ~0.9 s, every `import mim_fast` paid it, and
    `mim-fast --help` took 3.6 s. tests/test_cli.py checks that it matches the real decorator."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _status(op: str, device_type: str, dtypes: tuple, interpreting: bool) -> tuple:
    # Under torch.compile this runs once, at trace time: the answer is a property of the installation
    # (what is built, which device), not of the data, so dispatch adds no graph break.
    return _status_cached(op, device_type, dtypes, interpreting)


@functools.lru_cache(maxsize=1024)
def _status_cached(op: str, device_type: str, dtypes: tuple, interpreting: bool) -> tuple:
    # Cached (every op call asks): the answer depends only on the arguments — `interpreting` is
    # TRITON_INTERPRET's state, passed in so that a change of it is a new question — and on the registry
    # (register() clears the cache).
    device = torch.device(device_type)
    impls = _REGISTRY.get(op, {})
    return tuple(impls[name][1](device, dtypes) if name in impls else "mim_fast has no %s kernel for %s yet" % (name, op)
                 for name in BACKENDS)


def backend_status(op: str, device="cpu", dtypes: Iterable[torch.dtype] = ()) -> Dict[str, Optional[str]]:
    """{backend: None if it can serve op on device with dtypes, else the reason it cannot}."""
    return dict(zip(BACKENDS, _status(op, torch.device(device).type, tuple(dtypes), triton_interpreting())))


def select(op: str, backend: str, device: torch.device, dtypes: Iterable[torch.dtype]) -> Callable:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError("backend must be 'auto' or one of %s; got %r" % (", ".join(repr(b) for b in BACKENDS), backend))
    status = backend_status(op, device, dtypes)
    if backend != "auto":
        if status[backend] is not None:
            raise BackendUnavailableError("%s: backend %r cannot run here: %s" % (op, backend, status[backend]))
        return _REGISTRY[op][backend][0]
    for name in AUTO_ORDER.get(device.type, ("torch",)):
        if status[name] is None:
            return _REGISTRY[op][name][0]
    lines = "\n".join("  %s: %s" % (b, r) for b, r in status.items())
    raise BackendUnavailableError("%s: no backend can run on %s with %s:\n%s" % (op, device, tuple(dtypes), lines))


def select_cached(op: str, backend: str, device_type: str, dtypes: tuple) -> Optional[Callable]:
    """select() for a call the caller has already validated, in ~1 µs: the implementation, or None
    where select() would raise (the caller then takes its full path, which raises)."""
    # TRITON_INTERPRET can only change the answer for backend "triton" ("auto" never picks Triton on CPU
    # tensors, and on CUDA ones it does not matter): elsewhere the environment lookup (~2 µs) is skipped
    return _selected(op, backend, device_type, dtypes, backend == "triton" and triton_interpreting())


@functools.lru_cache(maxsize=1024)
def _selected(op: str, backend: str, device_type: str, dtypes: tuple, interpreting: bool) -> Optional[Callable]:
    # the answer depends only on the arguments and on the registry (register() clears this cache);
    # `interpreting` is TRITON_INTERPRET's state, passed in so that a change of it is a new question
    try:
        return select(op, backend, torch.device(device_type), dtypes)
    except (ValueError, BackendUnavailableError):
        return None


def available_backends(op: Optional[str] = None, device=None) -> List[str]:
    """Backends that can run ``op`` (any op if None) on ``device`` (default: every device present here)."""
    if device is None:
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    else:
        devices = [torch.device(device)]
    names = []
    for name in BACKENDS:
        for o in ([op] if op else ops()):
            if any(backend_status(o, d)[name] is None for d in devices):
                names.append(name)
                break
    return names
