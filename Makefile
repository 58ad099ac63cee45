# meshlet — `make test` and `make demo` work from a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint demo bench venv system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	-$(PY) -m pip install -q -e '.[accel,hsm]' || echo "optional extras (accel, hsm) not installed; their tests are skipped"
	touch $(STAMP)

venv: $(STAMP)

system-deps:
	bash scripts/system-deps.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/mypy

# pytest exits 5 when it collected nothing; that is reported, not failed.
test: $(STAMP) system-deps lint
	$(VENV)/bin/pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

demo: $(STAMP)
	$(PY) -m meshlet.cli.main demo

bench: $(STAMP) system-deps
	$(PY) -m meshlet.cli.main bench proxy --json

clean:
	rm -rf $(VENV) build dist src/*.egg-info
