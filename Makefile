# make venv  - create .venv with torch (pinned by constraints.txt) and erasekit in editable mode
# make test  - run the default (fast, CPU) test suite
# make demo  - generate images with the embedded toy model and score a few with its detector

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

DEMO_OUT := out/demo

demo: venv
	$(ERASEKIT) generate "a red star on a striped background" "a blue heart on a dotted background" "a starfish" \
		--model toy -n 8 --seed 0 --out $(DEMO_OUT)
	$(ERASEKIT) detect $(DEMO_OUT)/a-red-star-on-a-striped-background_seed0_*.png \
		$(DEMO_OUT)/a-starfish_seed0_*.png

clean-demo:
	rm -rf $(DEMO_OUT)
