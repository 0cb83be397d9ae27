# Two commands do all set-up on a fresh machine:
#   make demo   runs the main job on the embedded default data
#   make test   runs the test suite
# Both create .venv when missing and install the package with its test extras.
# Options go through ARGS: make demo ARGS="--resume"  (or --overwrite, --out DIR, --steps N)
# torch: the CPU build is installed only when the venv has no torch at all, so a
# venv made with `python3 -m venv --system-site-packages .venv` over a CUDA torch keeps it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch>=2.4,<2.14

.PHONY: demo test test-all bench bench-routing bench-bernoulli-vae clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q '$(TORCH_SPEC)'
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pyro-reparam-conv demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -m "not slow" $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/seed_workload.py $(ARGS)

bench-routing: $(STAMP)
	$(PY) benchmarks/routing_overhead.py $(ARGS)

# needs Fashion-MNIST: apt-get install dataset-fashion-mnist (or ARGS="--data FOLDER")
bench-bernoulli-vae: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/bernoulli_vae.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
