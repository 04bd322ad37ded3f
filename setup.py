"""Build mim_fast._C, the one compiled extension of mim_fast.

* torch without CUDA, or no nvcc            -> CppExtension (CPU kernels only)
* CUDA build of torch and nvcc present       -> CUDAExtension (CPU kernels + kernels/*.cu)
* MIM_FAST_CUDA=0|1                          -> force either (1 fails loudly when CUDA cannot be built)

Honours MAX_JOBS (ninja parallelism) and TORCH_CUDA_ARCH_LIST (default 9.0 when no GPU is visible,
because torch otherwise tries to detect the arch of a GPU that is not there and fails).
Build with ``pip install -e . --no-build-isolation`` (isolation would pull a second multi-GB torch).
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    # /usr/local/bin/nvcc may be a wrapper: torch would then take /usr/local as CUDA_HOME and the link
    # fails on -lcudart. Prefer an explicit CUDA_HOME, then the conventional toolkit folder.
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and os.path.exists(os.path.join(cand, "bin", "nvcc")):
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _want_cuda(torch):
    forced = os.environ.get("MIM_FAST_CUDA")
    cuda_home = _find_cuda_home()
    reasons = []
    if torch.version.cuda is None:
        reasons.append("torch %s is a CPU-only build" % torch.__version__)
    if cuda_home is None:
        reasons.append("nvcc was not found (set CUDA_HOME)")
    if forced == "0":
        return False, None
    if reasons:
        if forced == "1":
            sys.exit("MIM_FAST_CUDA=1 but the CUDA extension cannot be built: " + "; ".join(reasons))
        print("mim_fast: building the CPU-only extension: " + "; ".join(reasons))
        return False, None
    return True, cuda_home


def _nvidia_wheel_includes():
    # The pip CUDA wheels carry headers (cusparse.h, ...) that a bare toolkit (nvcc + cudart) lacks and
    # that torch's CUDA headers include.
    dirs = []
    for sp in sys.path:
        dirs += glob.glob(os.path.join(sp, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def _extensions():
    import torch

    with_cuda, cuda_home = _want_cuda(torch)
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        import torch.utils.cpp_extension as cpp_ext

        cpp_ext.CUDA_HOME = cuda_home  # torch caches CUDA_HOME at import time
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        Extension = cpp_ext.CUDAExtension
    else:
        from torch.utils.cpp_extension import CppExtension as Extension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    define_macros = [("MIM_FAST_WITH_CUDA", "1" if with_cuda else "0")]
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    define_macros += [
        ("MIM_FAST_CUDA_ARCHS", '"%s"' % archs),
        ("MIM_FAST_TORCH_VERSION", '"%s"' % torch.__version__),
    ]
    # No contraction of a*b+c into FMAs: the gate math (kernels/mim_math.h) must round every operation
    # exactly as the torch reference and the Triton kernels do, so gates are bit-identical everywhere.
    # -fno-trapping-math lets the compiler evaluate both sides of a branchless select (so the feature
    # loops vectorize) without changing any computed value.
    extra = {"cxx": ["-O3", "-ffp-contract=off", "-fno-trapping-math"]}
    link_args = []
    # at::parallel_for is a header template whose OpenMP backend is a `#pragma omp parallel` compiled into
    # *our* objects: without -fopenmp it silently runs on one thread. The wheels' torch is built with
    # OpenMP and ships libgomp.so.1; linking -fopenmp records the same soname, which the loader resolves to
    # the copy torch already loaded (mim_fast._ext imports torch first): one runtime, one thread pool,
    # sized by torch.set_num_threads.
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        extra["cxx"].append("-fopenmp")
        link_args.append("-fopenmp")
    if os.environ.get("MIM_FAST_NATIVE") == "1":  # opt-in: fast here, not portable to other CPUs
        extra["cxx"].append("-march=native")
    include_dirs = [os.path.join(ROOT, "kernels"), os.path.join(ROOT, "csrc")]
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("kernels", "*.cu")))
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "--fmad=false"]
        include_dirs += _nvidia_wheel_includes()
    return [
        Extension(
            "mim_fast._C",
            sources=sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args=extra,
            extra_link_args=link_args,
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


# MIM_FAST_NO_EXT=1: install the Python package only (the Makefile's editable install does this, then
# builds the extension in place with `setup.py build_ext --inplace`, which ninja keeps incremental).
if os.environ.get("MIM_FAST_NO_EXT") == "1":
    setup(packages=find_packages(include=["mim_fast", "mim_fast.*"]))
else:
    setup(
        packages=find_packages(include=["mim_fast", "mim_fast.*"]),
        ext_modules=_extensions(),
        cmdclass={"build_ext": _build_ext()},
    )
