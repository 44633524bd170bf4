# Quick start: `make demo` (set up + run the whole pipeline locally), `make test` (set up + run the tests).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
OUTPUT ?= runs/demo
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test compile clean

setup:
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'

demo: setup
	funmatch run --preset demo --output $(OUTPUT)

test: setup
	$(PYTHON) -m pytest -q

compile: setup
	funmatch compile --preset demo --output $(OUTPUT)/pipeline.yaml

clean:
	rm -rf runs .pytest_cache
