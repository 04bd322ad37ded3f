"""``python -m mim_fast info``: what is built and usable here, and why each unusable backend is not."""
import platform
import sys

import torch

from . import __version__, _ext
from .ops import _backends


def _triton_version():
    try:
        import triton

        return triton.__version__
    except Exception as exc:  # noqa: BLE001  (any import failure is worth reporting, not raising)
        return "not importable (%s)" % exc


def report() -> str:
    lines = ["mim_fast %s" % __version__,
             "python %s on %s (%s)" % (platform.python_version(), platform.platform(), platform.machine()),
             "torch %s (CUDA build: %s), %d CPU threads" % (torch.__version__, torch.version.cuda or "no",
                                                           torch.get_num_threads()),
             "triton %s%s" % (_triton_version(),
                              ", TRITON_INTERPRET=1 (kernels run on CPU tensors)" if _backends.triton_interpreting()
                              else "")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append("cuda:%d %s, sm_%d%d, %.1f GiB" % (i, p.name, p.major, p.minor, p.total_memory / 2**30))
    else:
        lines.append("no CUDA device visible")
    info = _ext.build_info()
    if info is None:
        lines.append("extension mim_fast._C: NOT LOADED (%s)" % _ext.load_error)
    else:
        lines.append("extension mim_fast._C: built against torch %s, CUDA %s%s, at::parallel_for on %s, %s"
                     % (info["torch_version"],
                        "runtime %d" % info["cuda_runtime_version"] if info["with_cuda"] else "not compiled in",
                        " for archs %s" % info["cuda_archs"] if info["with_cuda"] else "",
                        "OpenMP" if info["with_openmp"] else "native threads", info["compiler"]))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines.append("")
    lines.append("backends (auto order: %s)" % "; ".join("%s: %s" % (d, " > ".join(_backends.AUTO_ORDER[d]))
                                                         for d in devices))
    for op in _backends.ops():
        for dev in devices:
            lines.append("  %s on %s" % (op, dev))
            for name, reason in _backends.backend_status(op, dev).items():
                lines.append("    %-7s %s" % (name, "ok" if reason is None else "-- " + reason))
    lines.append("available here: %s" % ", ".join(_backends.available_backends()))
    return "\n".join(lines)


def main(argv=None) -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
