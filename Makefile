# `make run` and `make test` install into .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
# pytest-xdist processes for `make test` and `make faults` (0: all in this one process); each test module runs
# whole in one of them, so its module fixtures are built once
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadscope

.PHONY: install run test smoke faults bench clean

$(VENV)/.installed: pyproject.toml constraints.txt scripts/install.sh
	VENV=$(VENV) scripts/install.sh
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/metatuner run

test: install
	$(PY) -m pytest -q $(XDIST)

smoke: install
	$(PY) -m pytest -q -m smoke

faults: install
	$(PY) -m pytest -q $(XDIST) tests/faults

clean:
	rm -rf $(VENV) runs .pytest_cache
