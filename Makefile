# The README's two commands:  `make demo`  and  `make test`.
# Both create .venv on first use (torch 2.14.1 — the CUDA 13 build —, triton, test tools), build the
# extension mim_fast._C in place, then run. Nothing outside .venv/ and the source tree is touched.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-stamp
INSTALL := $(VENV)/.install-stamp

.PHONY: demo ops-demo test build info clean

# The main job: train MIM on the synthetic dataset into runs/demo (time: README, Quickstart).
demo: build
	$(PY) -m mim_fast train --out runs/demo --overwrite

# Both ops on random inputs with every backend that can run here, checked against the reference.
ops-demo: build
	$(PY) -m mim_fast demo

test: build
	$(PY) -m pytest -q -rs tests   # -rs: why each test was skipped; the random seed is printed at the end
	$(PY) -m pytest -q benchmarks --benchmark-disable   # every benchmark case once, so none rots

info: build
	$(PY) -m mim_fast info

$(DEPS): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# The package is installed editable without the extension (registers `mim-fast` and the import path),
# then the extension is built in place: ninja recompiles only what changed. --no-build-isolation: an
# isolated build would download a second multi-GB torch to compile against.
$(INSTALL): $(DEPS) setup.py pyproject.toml
	MIM_FAST_NO_EXT=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(INSTALL)
	$(PY) setup.py -q build_ext --inplace

clean:
	rm -rf build *.egg-info mim_fast/_C*.so
