# Set-up and checks. `make demo` and `make test` work on a fresh machine: they create .venv and
# install everything first (torch 2.14.1 / torchvision 0.29.1, then the package with extras).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench mutation clean

# scripts/install.sh is shared with the Dockerfiles, so a broken install step fails CI too.
$(STAMP): pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) bash scripts/install.sh full $(VENV) dev
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/patchcore demo

# The browser test of the review page is required, not skipped: Chromium is installed first.
test: $(STAMP)
	bash scripts/install_browser.sh
	$(BIN)/ruff check src tests benchmarks scripts
	PATCHCORE_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

# Plants plausible one-line bugs in a copy of src/ and checks that the tests catch each.
mutation: $(STAMP)
	$(BIN)/python scripts/mutation_check.py

clean:
	rm -rf $(VENV) patchcore_demo results predictions
