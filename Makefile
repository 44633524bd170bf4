# Quick start: `make demo` (set up + run the whole pipeline locally), `make test` (set up + run the tests).
#
# Every target runs its tools from the project's own virtual environment $(VENV) (default .venv), never from
# whatever `python3`/`pip` is on PATH: the first target creates it with `$(PYTHON) -m venv` and installs the
# package with its dev extra at constraints.txt's pins; later ones reinstall only when pyproject.toml or
# constraints.txt changed (the stamp file $(STAMP)). So the same commands work with the system interpreter,
# inside another active virtual environment, and on PEP 668 systems (Debian 12, Ubuntu 24.04), where pip
# refuses to install outside a venv.
#   make setup       create / update $(VENV)            make lint       ruff check + ruff format --check
#   make demo        the whole pipeline, locally         make typecheck  mypy (the whole tree, pyproject.toml)
#   make test        the whole test suite (CI)           make format     ruff check --fix + ruff format (edits!)
#   make test-fast   the tests not marked slow           make hooks      install the git pre-commit hooks
#   make compile     the pipeline IR                     make clean      runs and caches (distclean: + $(VENV))
#   make images      container images (see below)
# Settings: PYTHON=python3.11 (the interpreter that creates the venv), VENV=DIR, PYTEST_ARGS='-x -k name'.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
VPY := $(BIN)/python
STAMP := $(VENV)/.funmatch-installed
OUTPUT ?= runs/demo
PYTEST_ARGS ?=
export HF_HUB_OFFLINE := 1
# Recipes, and what they start (tests run `funmatch`, actionlint, ...), see $(VENV) first, as if activated.
MAKE_PATH := $(PATH)
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup demo test test-fast lint format typecheck hooks compile clean distclean images

setup: $(STAMP)

# (Re)creates $(VENV) when it is missing or broken (no working pip: its Python is gone, or an earlier `venv`
# failed half-way), then installs. `python3 -m venv` fails without ensurepip on Debian/Ubuntu unless
# python3-venv is installed: as root with apt-get, for the system Python, make installs it (APT_INSTALL=0:
# never), else it says what to install. PYTHON is looked up on the PATH make was started with.
APT_INSTALL ?= 1
$(STAMP): pyproject.toml constraints.txt
	@if ! "$(VPY)" -m pip --version >/dev/null 2>&1; then \
	  export PATH="$(MAKE_PATH)"; \
	  if [ -e "$(VENV)" ] && [ ! -f "$(VENV)/pyvenv.cfg" ]; then \
	    echo "make: $(VENV) exists and is not a virtual environment: remove it or run make VENV=another-dir" >&2; exit 1; fi; \
	  ver=$$("$(PYTHON)" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
	    || { echo "make: $(PYTHON) not found or does not run: install Python >= 3.11, or run make PYTHON=/path/to/python3.11" >&2; exit 1; }; \
	  "$(PYTHON)" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	    || { echo "make: funmatch needs Python >= 3.11, $(PYTHON) is $$ver: run make PYTHON=python3.11" >&2; exit 1; }; \
	  rm -rf "$(VENV)"; \
	  echo "make: creating $(VENV) with $$("$(PYTHON)" -c 'import sys; print(sys.executable)')"; \
	  if ! err=$$("$(PYTHON)" -m venv "$(VENV)" 2>&1); then \
	    rm -rf "$(VENV)"; \
	    case "$$err" in *ensurepip*) ;; *) echo "$$err" >&2; exit 1;; esac; \
	    pkg="python$$ver-venv"; \
	    case "$$("$(PYTHON)" -c 'import os, sys; print(os.path.realpath(sys.executable))')" in \
	      /usr/bin/*) system=1;; *) system=0;; esac; \
	    if [ "$$system" = 1 ] && [ "$(APT_INSTALL)" != 0 ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      echo "make: $(PYTHON) has no ensurepip: installing $$pkg (python3-venv) with apt-get"; \
	      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$$pkg"; } >/dev/null \
	        && "$(PYTHON)" -m venv "$(VENV)" \
	        || { rm -rf "$(VENV)"; echo "make: could not install $$pkg: install python3-venv ('apt-get install python3-venv'), then run make again" >&2; exit 1; }; \
	    else \
	      echo "make: $(PYTHON) cannot create a virtual environment (no ensurepip): install python3-venv ('sudo apt-get install python3-venv', or $$pkg), or run make PYTHON=another-python3.11" >&2; \
	      exit 1; \
	    fi; \
	  fi; \
	fi
	@echo "make: installing funmatch and its dev tools into $(VENV) (pip install -c constraints.txt -e '.[dev]')"
	@# -qq: errors only, so `make demo` stays short (a machine's pip settings can warn on every package)
	"$(VPY)" -m pip install --quiet --quiet -c constraints.txt -e '.[dev]'
	@touch "$(STAMP)"

demo: setup
	"$(BIN)/funmatch" run --preset demo --output $(OUTPUT)

test: setup
	"$(VPY)" -m pytest -q $(PYTEST_ARGS)

# The unit tier: everything but the tests marked @pytest.mark.slow (whole pipelines, > 5 s each).
test-fast: setup
	"$(VPY)" -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup
	"$(BIN)/ruff" check .
	"$(BIN)/ruff" format --check .

format: setup
	"$(BIN)/ruff" check --fix .
	"$(BIN)/ruff" format .

typecheck: setup
	"$(BIN)/mypy"

hooks: setup
	"$(BIN)/pre-commit" install

compile: setup
	"$(BIN)/funmatch" compile --preset demo --output $(OUTPUT)/pipeline.yaml

clean:
	rm -rf runs .pytest_cache .ruff_cache .mypy_cache

distclean: clean
	rm -rf "$(VENV)"

# Container images: images/Dockerfile.{cpu,cuda} -> $(REGISTRY)/funmatch-{cpu,cuda}:$(TAG), the names the
# compiled pipeline uses: REGISTRY and TAG default to FUNMATCH_IMAGE_PREFIX / FUNMATCH_IMAGE_TAG, the same
# settings `funmatch compile` reads (else ghcr.io/funmatch and the package version). Builds with docker,
# else podman (CONTAINER_ENGINE=... to choose), then pushes (PUSH=0: build only). Needs no $(VENV).
REGISTRY ?= $(or $(FUNMATCH_IMAGE_PREFIX),ghcr.io/funmatch)
TAG ?= $(or $(FUNMATCH_IMAGE_TAG),$(shell $(PYTHON) -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])"))
CONTAINER_ENGINE ?= $(shell command -v docker 2>/dev/null || command -v podman 2>/dev/null)
PLATFORM ?= linux/amd64
PUSH ?= 1

images:
	@test -n "$(CONTAINER_ENGINE)" || { echo "make images: neither docker nor podman found (set CONTAINER_ENGINE)" >&2; exit 1; }
	@test -n "$(TAG)" || { echo "make images: empty TAG" >&2; exit 1; }
	@for kind in cpu cuda; do \
	  image="$(REGISTRY)/funmatch-$$kind:$(TAG)"; \
	  echo "make images: building $$image"; \
	  "$(CONTAINER_ENGINE)" build --platform "$(PLATFORM)" --build-arg VERSION="$(TAG)" \
	    -f "images/Dockerfile.$$kind" -t "$$image" . || exit 1; \
	  if [ "$(PUSH)" = 1 ]; then "$(CONTAINER_ENGINE)" push "$$image" || exit 1; fi; \
	done
