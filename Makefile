# The two commands of the README:
#   make serve   starts the sidecar with embedded defaults
#   make test    runs the whole test suite (Python, Go and Rust)
# Both bootstrap .venv on first use; nothing needs installing by hand.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTHON_BOOT ?= $(shell command -v python3.12 || command -v python3)
BUF := $(VENV)/bin/buf

.PHONY: serve test check lint typecheck buf-lint buf-breaking gen gen-check baseline bench clean deploy-tools api-tools

# hatch_build.py compiles src/connmeta/_ingest.py, _sorted.py and _wirecore.py with mypyc
# into the editable install.
$(STAMP): pyproject.toml constraints.txt hatch_build.py src/connmeta/_ingest.py \
  src/connmeta/_sorted.py src/connmeta/_wirecore.py
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[mitmproxy,dev]'
	@touch $@

serve: $(STAMP)
	$(VENV)/bin/connmeta serve

test: $(STAMP) deploy-tools api-tools
	$(PY) -m pytest

# kustomize, kubernetes-validate and hadolint for tests/deploy, pinned, in .tools/.
deploy-tools:
	scripts/install-deploy-tools

# grpcurl for tests/test_tools.py (buf comes with the venv), pinned, in .tools/.
api-tools:
	scripts/install-api-tools

check: lint typecheck buf-lint buf-breaking gen-check
check: go-lint

# go vet and staticcheck (pinned, built into .tools/bin) of the Go client.
.PHONY: go-lint
go-lint:
	scripts/install-staticcheck
	cd clients/go && go vet ./... && ../../.tools/bin/staticcheck ./...

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

buf-lint: $(STAMP)
	$(BUF) lint
	$(BUF) format --diff --exit-code

# Compatibility with the last released schema (the committed baseline image).
buf-breaking: $(STAMP)
	$(BUF) breaking --against proto/baseline/connmeta-v1.binpb

# Refresh the baseline when a schema version is released.
baseline: $(STAMP)
	$(BUF) build -o proto/baseline/connmeta-v1.binpb

gen: $(STAMP)
	PYTHON=$(PY) scripts/gen
	BUF=$(BUF) scripts/gen-clients
	$(PY) -m connmeta.export.ndjson > docs/ndjson.schema.json

# Regenerate into the work tree and fail if anything differs from what is committed.
gen-check: gen
	@git diff --exit-code --stat -- src/connmeta/v1 clients docs/ndjson.schema.json || \
	  { echo "generated code is stale: run 'make gen' and commit the result"; exit 1; }
	@test -z "$$(git status --porcelain --untracked-files=all -- src/connmeta/v1 clients)" || \
	  { git status --porcelain -- src/connmeta/v1 clients; echo "untracked generated files: run 'make gen' and commit"; exit 1; }

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
