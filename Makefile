# Two entry points for a fresh clone (see README):  make run   |   make test
# TORCH picks the PyTorch build: the CPU wheel by default; on a GPU box use e.g. TORCH="torch==2.13.0"
# from the CUDA index, or any torch you already have (TORCH=skip).
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: install run test test-fast

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ "$(TORCH)" != "skip" ]; then $(PY) -m pip install -q "$(TORCH)"; fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The whole pipeline on the embedded default (offline, CPU): shipped sample + tiny local Llama.
run: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc metrics show

# The whole test suite, slow end-to-end tests included (what CI runs).
test: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -ra

# Everything but the slow end-to-end tests, for quick local iterations.
test-fast: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -ra -m "not slow"
