# Two entry points for a fresh clone (see README):  make run   |   make test
# TORCH picks the PyTorch build: the CPU wheel by default; on a GPU box TORCH=skip keeps the torch that the
# python3 running make already has (a venv's or the system's), or TORCH="torch" takes a CUDA build from PyPI.
# Offline, point pip at a wheelhouse: PIP_NO_INDEX=1 PIP_FIND_LINKS=/path/to/wheels make install TORCH=skip
# A CUDA torch adds the `gpu` extra (liger-kernel), which the GPU recipe's defaults use.
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: install venv run test test-fast lint report-images

# TORCH=skip: the venv sees the host's packages (--system-site-packages). When python3 is itself a venv (as on
# many GPU images, where a tuned torch lives in /opt/.../.venv), --system-site-packages alone would show only
# the base interpreter's packages, so a .pth file adds that venv's site-packages too.
venv:
	python3 -m venv $(if $(filter skip,$(TORCH)),--system-site-packages) $(VENV)
	if [ "$(TORCH)" = "skip" ]; then \
	  host=$$(python3 -c 'import sys, sysconfig; print(sysconfig.get_paths()["purelib"] if sys.prefix != sys.base_prefix else "")'); \
	  if [ -n "$$host" ]; then echo "$$host" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/host-python.pth"; fi; \
	  $(PY) -c 'import torch' 2>/dev/null || { echo "TORCH=skip keeps the torch of the python3 that runs make, but $$(command -v python3) has none: install torch there, or use TORCH=torch" >&2; exit 2; }; \
	fi

$(VENV)/.installed: pyproject.toml
	$(MAKE) --no-print-directory venv VENV=$(VENV) TORCH='$(TORCH)'
	if [ "$(TORCH)" != "skip" ]; then $(PY) -m pip install -q "$(TORCH)"; fi
	extras=$$($(PY) -c 'import torch; print("dev,gpu" if torch.version.cuda else "dev")') && \
	  echo "installing .[$$extras] into $(VENV) (torch $$($(PY) -c 'import torch; print(torch.__version__)'))" && \
	  $(PY) -m pip install -q -e ".[$$extras]"
	touch $@

install: $(VENV)/.installed

# The whole pipeline on the embedded default (offline, CPU): shipped sample + tiny local Llama.
run: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc metrics show

$(VENV)/.lint-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[lint]"
	touch $@

# Lint and format checks (ruff, configured in pyproject.toml).
lint: $(VENV)/.lint-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The lint checks, then the whole test suite, slow end-to-end tests included (what CI runs).
test: install lint
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -ra

# Everything but the slow end-to-end tests, for quick local iterations.
test-fast: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -ra -m "not slow"

# The README's pictures (docs/*.png) from this workspace's reports, after `make run` (needs chromium).
report-images: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m flows.report_images
