# Two entry points for a fresh clone (see README):  make run   |   make test
# Every install comes from the lock in requirements/ (hash-checked, docs/environment.md says how it is made):
#   requirements/cpu.lock  the project, its dev, lint and bench extras, and PyTorch's CPU wheel (what CI tests)
#   requirements/gpu.lock  the same plus the gpu extra, without torch/triton: a GPU box keeps its CUDA torch
#   requirements/build.lock  setuptools, which builds this project and the lock's few sdists (antlr4, rouge-score, ...)
# TORCH=lock (default) installs the locked CPU torch; TORCH=skip keeps the torch of the python3 running make
# (a venv's or the system's) and installs gpu.lock when that torch is a CUDA build.
# Offline, point pip at a wheelhouse made by `make wheelhouse`:
#   PIP_NO_INDEX=1 PIP_FIND_LINKS=$PWD/wheelhouse make install TORCH=skip
VENV  ?= .venv
PY    := $(VENV)/bin/python
PIP   := $(PY) -m pip
TORCH ?= lock
LOCKS := requirements/build.lock requirements/cpu.lock requirements/gpu.lock
# Where `make lock` finds PyTorch's CPU wheel: pip's find-links here (the CPU wheel lies on local disk); elsewhere
# PyTorch's own CPU index, e.g. LOCK_TORCH_LINKS=https://download.pytorch.org/whl/cpu/torch
LOCK_TORCH_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell python3 -m pip config get global.find-links 2>/dev/null))
# `make wheelhouse`: the target machine's Python, processor and glibc (the GPU machine here: CPython 3.12, x86-64,
# glibc 2.28 or newer)
WHEEL_PYTHON ?= 3.12
WHEEL_ARCH   ?= x86_64
WHEEL_GLIBC  ?= 28
WHEELHOUSE   ?= wheelhouse

.PHONY: install venv run test test-fast test-latest lint lock wheelhouse report-images

# TORCH=skip: the venv sees the host's packages (--system-site-packages). When python3 is itself a venv (as on
# many GPU images, where a tuned torch lives in /opt/.../.venv), --system-site-packages alone would show only
# the base interpreter's packages, so a .pth file adds that venv's site-packages too.
venv:
	python3 -m venv $(if $(filter skip,$(TORCH)),--system-site-packages) $(VENV)
	if [ "$(TORCH)" = "skip" ]; then \
	  host=$$(python3 -c 'import sys, sysconfig; print(sysconfig.get_paths()["purelib"] if sys.prefix != sys.base_prefix else "")'); \
	  if [ -n "$$host" ]; then echo "$$host" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/host-python.pth"; fi; \
	  $(PY) -c 'import torch' 2>/dev/null || { echo "TORCH=skip keeps the torch of the python3 that runs make, but $$(command -v python3) has none: install torch there, or leave TORCH unset for the locked CPU wheel" >&2; exit 2; }; \
	fi

# The lock is installed with --no-deps --require-hashes: exactly its files, each checked against its sha256.
# setuptools comes first (from build.lock) so that the sdist and this project build without fetching anything.
# pip check then proves the locked set is consistent with the torch in the venv (locked, or the host's).
$(VENV)/.installed: pyproject.toml $(LOCKS)
	$(MAKE) --no-print-directory venv VENV=$(VENV) TORCH='$(TORCH)'
	$(PIP) install -q --require-hashes --no-deps -r requirements/build.lock
	if [ "$(TORCH)" = "skip" ] && $(PY) -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then \
	  lock=requirements/gpu.lock; else lock=requirements/cpu.lock; fi; \
	  echo "installing $$lock into $(VENV)"; \
	  $(PIP) install -q --require-hashes --no-deps --no-build-isolation -r $$lock && \
	  $(PIP) install -q --no-deps --no-build-isolation -e . && \
	  echo "$$lock" > $(VENV)/.lock-variant
	$(PY) -m tasks.common.environment "$$(cat $(VENV)/.lock-variant)"
	touch $@

install: $(VENV)/.installed

# The whole pipeline on the embedded default (offline, CPU): shipped sample + tiny local Llama.
run: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc metrics show

# Lint and format checks (ruff, configured in pyproject.toml; its version is the lock's).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The lint checks, then the whole test suite, slow end-to-end tests included (what CI runs), on TEST_WORKERS
# pytest-xdist workers: most tests wait on subprocesses (dvc, stages, servers, PostgreSQL), so two workers left CI's
# two cores idle a fifth of the time (pytest 23 min 44 s, 1.57 cores busy on average, on a fresh clone of 607dc33);
# three keep them busy. A test file stays on one worker (--dist loadfile): its module-scoped servers start once.
# TEST_WORKERS=0 runs everything in this one process.
TEST_WORKERS ?= 3
test: install lint
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile

# Everything but the slow end-to-end tests, for quick local iterations.
test-fast: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -ra -m "not slow" -n $(TEST_WORKERS) --dist loadfile

# Refresh the lock on purpose: resolve pyproject.toml's ranges anew (uv, universal: every Python >= 3.11 and
# platform), then run `make test` on it. Commit requirements/*.lock only after the suite passes.
lock: install
	$(VENV)/bin/uv pip compile -q requirements/build.in --universal --python-version 3.11 --generate-hashes \
	  -o requirements/build.lock
	$(VENV)/bin/uv pip compile -q requirements/cpu.in --universal --python-version 3.11 --generate-hashes \
	  --find-links "$(LOCK_TORCH_LINKS)" -c requirements/build.lock --no-emit-package guanaco-qlora-pipeline \
	  -o requirements/cpu.lock
	$(VENV)/bin/uv pip compile -q requirements/gpu.in --universal --python-version 3.11 --generate-hashes \
	  --excludes requirements/excludes.txt -c requirements/build.lock -c requirements/cpu.lock \
	  --no-emit-package guanaco-qlora-pipeline -o requirements/gpu.lock
	git --no-pager diff --stat -- requirements/

# Drift on purpose: the suite on the newest versions pyproject.toml's ranges allow (torch stays the locked CPU
# wheel), in a venv of its own; failures here are what the next `make lock` would bring.
test-latest:
	rm -rf .venv-latest
	python3 -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --require-hashes --no-deps -r requirements/build.lock
	grep -oE '^torch==[^ ]+' requirements/cpu.lock > .venv-latest/torch-constraint.txt
	.venv-latest/bin/python -m pip install -q -r .venv-latest/torch-constraint.txt
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c .venv-latest/torch-constraint.txt \
	  -e ".[dev,lint,bench]"
	.venv-latest/bin/python -m pip freeze --exclude-editable > .venv-latest/installed.txt
	PATH="$(CURDIR)/.venv-latest/bin:$$PATH" .venv-latest/bin/python -m pytest -q -ra

# A wheelhouse for another machine (default: the GPU box's CPython 3.12 on x86-64 Linux) from gpu.lock, for
# `PIP_NO_INDEX=1 PIP_FIND_LINKS=... make install TORCH=skip` there. It holds every locked file for that
# target (torch, triton and the CUDA libraries are the box's own, so they are left out), setuptools for
# the builds, and the sdists of packages that ship no wheel. Hash-checked against the lock as it downloads.
wheelhouse: install
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	$(VENV)/bin/uv pip compile -q requirements/gpu.in -c requirements/gpu.lock --python-version $(WHEEL_PYTHON) \
	  --python-platform $(WHEEL_ARCH)-manylinux_2_$(WHEEL_GLIBC) --generate-hashes --excludes requirements/excludes.txt \
	  --no-emit-package guanaco-qlora-pipeline --no-header -o $(WHEELHOUSE)/.gpu-target.txt
	# pip matches a wheel's manylinux tag exactly: name every glibc the target runs (2.5 up to its own)
	$(PIP) download -q --no-deps --require-hashes --prefer-binary -d $(WHEELHOUSE) \
	  --python-version $(WHEEL_PYTHON) --implementation cp \
	  $$(for n in $$(seq $(WHEEL_GLIBC) -1 5); do printf -- '--platform manylinux_2_%s_$(WHEEL_ARCH) ' $$n; done) \
	  --platform manylinux2014_$(WHEEL_ARCH) --platform manylinux2010_$(WHEEL_ARCH) \
	  --platform manylinux1_$(WHEEL_ARCH) --platform linux_$(WHEEL_ARCH) \
	  -r $(WHEELHOUSE)/.gpu-target.txt -r requirements/build.lock
	@echo "$(WHEELHOUSE): $$(ls $(WHEELHOUSE) | wc -l) files, $$(du -sh $(WHEELHOUSE) | cut -f1), for CPython $(WHEEL_PYTHON) on $(WHEEL_ARCH) (glibc >= 2.$(WHEEL_GLIBC))"

# The README's pictures (docs/*.png) from this workspace's reports, after `make run` (needs chromium).
report-images: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m tasks.validate.report_images
