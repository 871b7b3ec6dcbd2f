# The two commands of the README: `make demo` (the main job) and `make test`.
# Both create .venv on first use: torch first (pinned; on this CPU machine the local
# CPU wheel), then triton and the rest, then the package itself (editable).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: test demo bench bench-cpu bench-torch-cpu clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q triton numpy transformers datasets pytest tqdm matplotlib safetensors trl accelerate
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# Pass 1: Triton kernels under the CPU interpreter (natively on a CUDA machine).
# Pass 2: the PyTorch backend, torch.compile and everything above the kernels.
test: $(STAMP)
	if $(PY) -c "import sys, torch; sys.exit(torch.cuda.is_available())"; then \
	  TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not no_interpreter" tests; fi
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m minorsft demo

# CUDA microbenchmarks -> benchmarks/results/<gpu>-<yyyymmdd>-<sha>.json, README.md, PNGs.
bench: $(STAMP)
	$(PY) -m benchmarks.bench_logprobs
	$(PY) -m benchmarks.bench_linear
	$(PY) -m benchmarks.plot

# Harness check under the Triton interpreter (CPU; not performance figures).
bench-cpu: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m benchmarks.bench_logprobs --tiny --cpu-reps 1
	$(PY) -m benchmarks.plot

# The PyTorch backend on this CPU against eager and torch.compile (performance figures of the CPU).
bench-torch-cpu: $(STAMP)
	$(PY) -m benchmarks.bench_logprobs --cpu --cpu-reps 5

clean:
	rm -rf $(VENV) build *.egg-info runs .pytest_cache
