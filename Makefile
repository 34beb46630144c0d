# The two commands of the README: `make demo` (install + train on Fashion-MNIST) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install data demo test lint quality bench

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

# A new folder per run, so a second `make demo` never meets the first one's checkpoint.
demo: install data
	$(BIN)/fastvae train --epochs 2 --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: install data
	$(BIN)/python -m pytest -q tests bench --benchmark-disable

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
	$(BIN)/python -m pytest bench --benchmark-json results/bench.json
	$(BIN)/python -m bench.report results/bench.json --png results/bench.png | tee results/bench.md
