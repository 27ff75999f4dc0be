# Two commands set everything up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The device machines' stack (Python 3.12, jax 0.11.2, flax 0.12.10, ...), tested on CPU.
PYTHON312 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
VENV312 ?= .venv312
DEVICE_STACK := jax==0.11.2 flax==0.12.10 optax==0.2.8 orbax-checkpoint==0.12.4 einops==0.8.2 \
	transformers==5.17.0 safetensors==0.8.0 huggingface_hub==1.33.0 tqdm rich pytest pytest-xdist
# The newest releases on the package index when last checked (jax 0.12), on Python 3.12: the Pallas kernels' tests
# (in the interpreter, on CPU), where a jax release that changes Pallas shows first.
VENV_NEWEST ?= .venv-newest
NEWEST_STACK := jax==0.12.0.1 flax==0.12.12 optax==0.2.8 orbax-checkpoint==0.12.8 einops==0.8.2 \
	transformers==5.23.0 safetensors==0.8.0 huggingface_hub==2.4.0 tqdm pytest pytest-xdist
KERNEL_TESTS := tests/test_selective_scan_pallas.py tests/test_ssd.py tests/test_causal_conv.py \
	tests/test_state_update.py tests/test_mamba_step.py tests/test_mamba2_step.py tests/test_gemv_probe.py
PYTEST_ARGS ?= -n 2 -q

.PHONY: demo test test-device-stack test-newest-jax test-gpu lint format clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# Python 3.12 environments of a pinned stack, with this package on top (no other dependencies).
$(VENV312)/.installed: STACK = $(DEVICE_STACK)
$(VENV_NEWEST)/.installed: STACK = $(NEWEST_STACK)
$(VENV312)/.installed $(VENV_NEWEST)/.installed: pyproject.toml
	$(PYTHON312) -m venv $(@D)
	$(@D)/bin/python -m pip install -q --upgrade pip
	$(@D)/bin/python -m pip install -q $(STACK)
	$(@D)/bin/python -m pip install -q --no-deps -e .
	touch $@

demo: $(VENV)/.installed
	$(PY) -m examples.demo

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

# Same suite on the GPU machines' versions (no torch there: the torch parity tests skip).
test-device-stack: $(VENV312)/.installed
	$(VENV312)/bin/python -m pytest $(PYTEST_ARGS)

test-newest-jax: $(VENV_NEWEST)/.installed
	$(VENV_NEWEST)/bin/python -m pytest $(PYTEST_ARGS) $(KERNEL_TESTS)

# On a GPU machine with the packages installed (the device image): the full-size kernel checks.
test-gpu:
	PYTHONPATH=. python3 -m pytest -m "gpu or not gpu" -q -p no:cacheprovider -p no:benchmark

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) $(VENV312) $(VENV_NEWEST) .pytest_cache
