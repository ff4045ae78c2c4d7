# Two entry points that work on a fresh machine (Python 3.10-3.12 with venv):
#   make demo   - install into .venv and run a short OTFace training on synthetic identities
#   make test   - install into .venv (with test extras) and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
# The CPU build; an unpinned torch may pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q setuptools wheel
	$(VENV)/bin/pip install -q "$(TORCH_PIN)"
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

.PHONY: install demo test bench clean gpu-kit gpu-check
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/otface-demo

# Three environments: the plugin's own (no mxnet), mxnet 1.9.1's for the RecordIO cross-checks,
# and the recipe's training environment for the tests against the real arcface_torch recipe.
test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not upstream"
	bash .ci/mxnet_compat.sh
	OTFACE_MAIN_PYTHON=$(VENV)/bin/python bash .ci/recipe_env.sh

bench: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/bench_ot.py
	$(VENV)/bin/python benchmarks/bench_step.py

# The GPU check. Here (with the package index): make gpu-kit builds .gpu-kit (wheels, recipe, .rec).
# On the GPU machine, offline, with .gpu-kit carried: make gpu-check installs the kit with
# pip --no-index --target and writes results/gpu/REPORT.md + gpu.json.
gpu-kit: $(VENV)/.installed
	PYTHON=$(VENV)/bin/python bash benchmarks/gpu_kit.sh .gpu-kit

GPU_PYTHON ?= python3
gpu-check:
	PYTHON=$(GPU_PYTHON) bash benchmarks/gpu_run.sh --device cuda

clean:
	rm -rf $(VENV) build dist *.egg-info
