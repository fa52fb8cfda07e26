# make venv  - create .venv with torch (pinned by constraints.txt) and erasekit in editable mode
# make test  - run the default (fast, CPU) test suite
# make demo  - the quick benchmark (erasekit bench): erase "star" from the embedded model, attack it, print the table

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
ERASEKIT := $(VENV)/bin/erasekit
# Extra flags for the torch install, e.g. TORCH_PIP_FLAGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_FLAGS ?=
STAMP := $(VENV)/.erasekit-installed

.PHONY: venv test demo clean-demo

venv: $(STAMP)

# torch goes in first, on its own, so that resolving erasekit's dependencies never swaps it for a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt $(TORCH_PIP_FLAGS) torch
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $@

test: venv
	$(PY) -m pytest -q

DEMO_OUT := runs/demo

# The quick bench preset (src/erasekit/bench/presets/quick.yaml); rerunning resumes and recomputes nothing.
demo: venv
	$(ERASEKIT) bench --preset quick --out $(DEMO_OUT)

clean-demo:
	rm -rf $(DEMO_OUT)
