# Quick start: `make demo` (set up + run the whole pipeline locally), `make test` (set up + run the tests).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
OUTPUT ?= runs/demo
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test compile clean images

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

# Container images: images/Dockerfile.{cpu,cuda} -> $(REGISTRY)/funmatch-{cpu,cuda}:$(TAG), the names the
# compiled pipeline uses: REGISTRY and TAG default to FUNMATCH_IMAGE_PREFIX / FUNMATCH_IMAGE_TAG, the same
# settings `funmatch compile` reads (else ghcr.io/funmatch and the package version). Builds with docker,
# else podman (CONTAINER_ENGINE=... to choose), then pushes (PUSH=0: build only).
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
