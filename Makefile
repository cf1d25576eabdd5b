# The two commands of README.md: `make install` (set-up) and `make test` (whole suite).
PYTHON ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV)/bin/python,$(CURDIR)/.venv/bin/python)

.PHONY: install test test-slow test-gpu build
install:
	bash tools/setup.sh

# Rebuild the extension after editing csrc/ (same flags as the set-up).
build:
	SKIP_DEPS=1 bash tools/setup.sh

test:
	$(PYTHON) -m pytest tests

# Long learning runs (minutes each), reported in README.md.
test-slow:
	$(PYTHON) -m pytest tests -m slow

# On a GPU machine: GPU op tests, 50-iteration CUDA training of every shapes config, both
# benchmarks; one report (docs/gpu_check.md + .json). Refuses (exit 2) without CUDA.
test-gpu:
	$(PYTHON) tools/gpu_check.py
