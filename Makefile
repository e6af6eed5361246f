# asose_jax: the two everyday commands are `make search` and `make test`.
# Each creates .venv (with $(PY) -m venv) when it is missing and installs the package into it.

PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
TORCH_VERSION ?= 2.13.0
ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv install install-torch test search smoke clean

venv: $(VPY)

$(VPY):
	$(PY) -m venv $(VENV)

install: venv
	$(PIP) install -e .

# On machines with a pinned CPU torch wheel, torch must be installed by version before the extra.
install-torch: venv
	$(PIP) install torch==$(TORCH_VERSION) && $(PIP) install -e '.[torch]'

# The torch baseline tests need torch; if it cannot be installed they skip.
test: venv
	$(PIP) install -e '.[test]'
	$(PIP) install torch==$(TORCH_VERSION) || echo "torch==$(TORCH_VERSION) could not be installed: the torch baseline tests will skip"
	$(VPY) -m pytest $(PYTEST_ARGS)

# The default search (configs/default.py); extra flags with ARGS, e.g.
#   make search ARGS="--workdir runs/try1 --set cycle.max_cycles=2"
search: install
	$(VPY) -m asose_jax.search $(ARGS)

# The <= 2-minute CPU smoke run on synthetic data into runs/smoke.
smoke: install
	$(VPY) -m asose_jax.search --preset smoke --workdir runs/smoke $(ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache
