# asose_jax: the two everyday commands are `make search` and `make test`.
# Each creates .venv (with $(PY) -m venv) when it is missing and installs the package into it, but only
# when pyproject.toml is newer than the last install (a stamp file in .venv): a re-run needs no network.
# `make install` after `touch pyproject.toml` forces a reinstall.

PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
TORCH_VERSION ?= 2.13.0
ARGS ?=
PYTEST_ARGS ?=

# Stamps, touched after a successful install: the package, the package with its test extra, torch.
INSTALLED := $(VENV)/.installed
INSTALLED_TEST := $(VENV)/.installed-test
INSTALLED_TORCH := $(VENV)/.installed-torch-$(TORCH_VERSION)

.PHONY: venv install install-torch test search smoke clean

venv: $(VPY)

$(VPY):
	$(PY) -m venv $(VENV)

install: $(INSTALLED)

$(INSTALLED): pyproject.toml | $(VPY)
	$(PIP) install -e .
	touch $@

# The test extra installs the package too, so it also stamps $(INSTALLED).
$(INSTALLED_TEST): pyproject.toml | $(VPY)
	$(PIP) install -e '.[test]'
	touch $@ $(INSTALLED)

# The torch baseline tests need torch; if it cannot be installed they skip, and the next `make test` tries again.
$(INSTALLED_TORCH): | $(VPY)
	$(PIP) install torch==$(TORCH_VERSION) && touch $@ \
		|| echo "torch==$(TORCH_VERSION) could not be installed: the torch baseline tests will skip"

# On machines with a pinned CPU torch wheel, torch must be installed by version before the extra.
install-torch: venv
	$(PIP) install torch==$(TORCH_VERSION) && $(PIP) install -e '.[torch]' && touch $(INSTALLED_TORCH)

# Two pytest-xdist workers (XLA's CPU compiles are mostly single-threaded, so two keep 2 cores busy); each test file
# runs whole on one worker, so its module fixtures (a reference search, say) run once, and the files go out in
# collection order (tests/conftest.py puts the longest first).
test: $(INSTALLED_TEST) $(INSTALLED_TORCH)
	$(VPY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The default search (configs/default.py); extra flags with ARGS, e.g.
#   make search ARGS="--workdir runs/try1 --set cycle.max_cycles=2"
search: $(INSTALLED)
	$(VPY) -m asose_jax.search $(ARGS)

# The <= 2-minute CPU smoke run on synthetic data into runs/smoke.
smoke: $(INSTALLED)
	$(VPY) -m asose_jax.search --preset smoke --workdir runs/smoke $(ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache
