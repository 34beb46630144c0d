# The two commands of the README: `make demo` (install + train on Fashion-MNIST) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# The other-language clients (examples/) and the browser their tests drive.
NODE_CLIENT := examples/node/node_modules/.package-lock.json
WEB_PAGE := examples/web/node_modules/.package-lock.json
CHROMIUM := /usr/bin/chromium

.PHONY: install data examples demo test lint quality bench gpu-check gpu-wheels

install: $(BIN)/fastvae

$(BIN)/fastvae: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Debian's package puts the four IDX files under /usr/share/datasets/fashion-mnist.
data: $(FASHION_MNIST)

$(FASHION_MNIST):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist

# onnxruntime-node's postinstall fetches CUDA binaries from outside the registry: skipped, its bundled CPU
# binaries run the exports. Chromium for the browser page's test comes from Debian.
examples: $(NODE_CLIENT) $(WEB_PAGE) $(CHROMIUM)

$(NODE_CLIENT): examples/node/package-lock.json
	cd examples/node && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --loglevel=error

$(WEB_PAGE): examples/web/package-lock.json
	npm ci --prefix examples/web --no-audit --no-fund --loglevel=error

$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium

# A new folder per run, so a second `make demo` never meets the first one's checkpoint.
demo: install data
	$(BIN)/fastvae train --epochs 2 --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: install data examples
	$(BIN)/python -m pytest -q tests bench

lint: install
	$(BIN)/ruff check .

# The README's quality table: the lab's code and fastvae, same seed and data, 10 epochs each.
quality: install data
	$(BIN)/fastvae train --model reference --epochs 10 --no-progress --out runs/quality-reference
	$(BIN)/fastvae train --epochs 10 --no-progress --out runs/quality-fast
	$(BIN)/fastvae eval runs/quality-reference --k 1000 --limit 1000
	$(BIN)/fastvae eval runs/quality-fast --k 1000 --limit 1000

# The benchmark suite with timings; the table and chart land in results/.
bench: install data
	mkdir -p results
	$(BIN)/python -m pytest bench --benchmark-enable --benchmark-json results/bench.json
	$(BIN)/python -m bench.report results/bench.json --png results/bench.png | tee results/bench.md

# The GPU check (docs/gpu.md): bench/gpu_check.sh, for a CUDA machine with torch and Triton preinstalled and no
# package registry. `make gpu-check DEVICE=cpu` runs its CPU mode in this project's venv.
DEVICE ?= cuda
ifeq ($(DEVICE),cpu)
GPU_CHECK_PYTHON := $(BIN)/python
GPU_CHECK_DEPS := install data
else
GPU_CHECK_PYTHON := python3
GPU_CHECK_DEPS :=
endif

gpu-check: $(GPU_CHECK_DEPS)
	GPU_CHECK_PYTHON=$(GPU_CHECK_PYTHON) DEVICE=$(DEVICE) bash bench/gpu_check.sh

# What the GPU machine lacks, as wheels for its Python 3.12 on x86_64 (pydantic and what it needs).
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
		typing-extensions==4.16.0
