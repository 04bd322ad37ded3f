"""Shared test setup.

* Triton: without a GPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1), which must
  be set before triton compiles anything, i.e. here, before any test module imports mim_fast.triton.
* Randomness: every test gets fresh random inputs. The session draws a base seed (or takes
  MIM_FAST_TEST_SEED to replay a failure); each test seeds torch with (base seed, test id) and the
  base seed is printed in the header and again at the end (also under -q, which hides the header).
"""
import os
import random
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

BASE_SEED = int(os.environ.get("MIM_FAST_TEST_SEED", random.SystemRandom().randrange(2**31)))


def _seed_line() -> str:
    return "mim_fast test seed: MIM_FAST_TEST_SEED=%d (set it to replay this run's random inputs)" % BASE_SEED


def pytest_report_header(config):
    return _seed_line()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # Again at the end, where a failure is read, and also under -q (which hides the header).
    terminalreporter.write_line(_seed_line())


@pytest.fixture(autouse=True)
def _seed_torch(request):
    seed = (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    torch.manual_seed(seed)
    random.seed(seed)
    yield


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip without a GPU. Every test that exercises a GPU backend — marked ``cuda`` or
    ``triton``, or with "triton" in its name or parameters — is also marked ``gpu``: the set
    benchmarks/gpu_check.sh runs on the GPU machine (``pytest -m gpu``); CI runs everything on the CPU."""
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords or "triton" in item.keywords or "triton" in item.name:
            item.add_marker(pytest.mark.gpu)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
