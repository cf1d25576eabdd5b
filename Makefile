# The two commands of README.md: `make install` (set-up) and `make test` (whole suite).
PYTHON ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV)/bin/python,$(CURDIR)/.venv/bin/python)

.PHONY: install test test-slow test-gpu build gpu-bundle test-gpu-offline
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

# Here, with PyPI: ./gpu_bundle, the wheels d2seg needs on top of a machine's own PyTorch
# (CPython 3.12, manylinux x86-64; GPU_BUNDLE_ARGS="--python-version 3.11" for another).
gpu-bundle:
	python3 tools/gpu_bundle.py build --out gpu_bundle $(GPU_BUNDLE_ARGS)

# There, without network, from the checkout with ./gpu_bundle beside it: install the bundle
# over the machine's PyTorch, build d2seg._C for its GPU, run the GPU check in 9 minutes;
# the report goes to $(REPORT_DIR), else $$OUT, else output/gpu_offline (docs/gpu.md).
test-gpu-offline:
	bash tools/gpu_offline.sh $(REPORT_DIR)
