# `make run` and `make test` install into .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install run test smoke faults bench clean

$(VENV)/.installed: pyproject.toml constraints.txt scripts/install.sh
	VENV=$(VENV) scripts/install.sh
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/metatuner run

test: install
	$(PY) -m pytest -q

smoke: install
	$(PY) -m pytest -q -m smoke

faults: install
	$(PY) -m pytest -q tests/faults

clean:
	rm -rf $(VENV) runs .pytest_cache
