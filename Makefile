# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `make lock` runs pip-compile from its own venv, at a fixed pip-tools version, so the lock does not depend on
# whatever pip-tools happens to be installed; LOCK_ARGS passes more options, e.g. LOCK_ARGS=--upgrade.
LOCK_VENV := .cache/lock-venv
PIP_TOOLS := pip-tools==7.6.2
LOCK_ARGS ?=

.PHONY: demo test bench venv lock wheel wheel-check gpu-wheels clean

# The lock pins every package the venv holds (checked by tests/test_packaging.py); the editable faceforge with
# its two extras comes on top, so a lock that missed a dependency would show up there as an unpinned package.
$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.lock -e '.[onnx,test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/faceforge demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 tests

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# Re-resolve requirements.lock from pyproject.toml (core + the onnx and test extras) and requirements.in (the
# torch pin). Existing pins are kept where they still fit; LOCK_ARGS=--upgrade moves all of them to the newest,
# LOCK_ARGS='--upgrade-package numpy' one. torch must resolve to the CPU build: its local tag (+cpu) is dropped
# so that `torch==X` is also met by a CUDA build of X, and a lock that pulled CUDA packages is refused.
lock:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet $(PIP_TOOLS)
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet --strip-extras --allow-unsafe \
		--no-emit-index-url --no-emit-find-links --extra onnx --extra test --constraint requirements.in \
		--output-file requirements.lock $(LOCK_ARGS) pyproject.toml
	sed -i -E 's/^(torch==[^+ ]+)\+[A-Za-z0-9.]+$$/\1/' requirements.lock
	@if grep -qiE '^(nvidia-|triton==)' requirements.lock; then \
		echo "make lock: torch resolved to a CUDA build (nvidia-*/triton in requirements.lock); make the CPU torch wheel visible to pip and run it again" >&2; \
		exit 1; fi

# dist/faceforge-VERSION-py3-none-any.whl, to pip-install into any environment that has (or may get) torch.
# Needs only pip (and the index, for setuptools), not the dev venv.
wheel:
	rm -rf build dist
	$(PYTHON) -m pip wheel --quiet --no-deps --wheel-dir dist .

# Builds the wheel, installs it into a fresh venv that already holds the CPU torch, checks that torch is kept,
# and runs `faceforge --version`, `faceforge demo --help` and a 2-step train there (a few minutes; needs the index).
wheel-check: $(STAMP)
	FACEFORGE_WHEEL_CHECK=1 $(BIN)/python -m pytest -s tests/test_packaging.py::test_wheel_installs_into_a_fresh_venv_next_to_torch

# Wheels a GPU machine with a CUDA torch under another Python may lack (simplejpeg), for
# `benchmarks/gpu_check.sh OUT --wheels .gpu-wheels`. GPU_PY is that machine's Python version.
GPU_PY ?= 3.12
gpu-wheels:
	$(PYTHON) -m pip download --quiet --only-binary=:all: --no-deps --python-version $(GPU_PY) \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .gpu-wheels \
		$$(grep -E '^simplejpeg==' requirements.lock)

clean:
	rm -rf $(VENV) .cache runs build dist
