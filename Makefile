# The two commands a user needs: `make test` and `make report`.
# Each one sets itself up: the virtual env, the Python packages and the few
# Debian packages the real runs use (iproute2 for network namespaces, QEMU for
# the qemu-peer comparison); as root on Debian 12 also QEMU 10.0 beside the
# system's QEMU, unpacked into .qemu/ (never installed system-wide).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
QEMU10 := .qemu/qemu-10.0

.PHONY: test test-unit report lab venv debs browser qemu clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Debian packages: only installed when missing, and only when we are root on a
# Debian-like system; elsewhere the tests that need them skip with a reason.
debs:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; \
	  command -v ip >/dev/null || missing="$$missing iproute2"; \
	  command -v qemu-system-x86_64 >/dev/null || missing="$$missing qemu-system-x86"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  fi; \
	fi

# Debian's Chromium for the report's browser test (tests/system/test_report_browser.py, which Playwright
# from the test extra drives; nothing is downloaded when it runs): only when missing, only as root on
# a Debian-like system; elsewhere that test skips with a reason.
browser:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v chromium >/dev/null; then \
	  echo "installing Debian packages: chromium"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null \
	    || echo "chromium could not be installed: the browser test will skip"; \
	fi

# QEMU 10.0 from bookworm-backports into .qemu/ (tools/fetch-qemu.sh: as root on Debian 12;
# elsewhere it prints why it skipped, and qemu-peer runs the system's QEMU alone).
qemu: debs
	@./tools/fetch-qemu.sh

# The layer rules (import-linter contracts in pyproject.toml), then both halves of the suite.
test: $(STAMP) debs browser qemu
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# The fast half alone: no processes, no root, no QEMU (tests/unit).
test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

# REPORT_ARGS: e.g. --quick, or --results DIR to report on an existing run.
REPORT_ARGS ?=
# qemu-peer runs QEMU 10.0 beside the system's QEMU when .qemu/ has it (MIGFD_QEMU).
report: $(STAMP) debs qemu
	MIGFD_QEMU=$$([ -x $(QEMU10) ] && echo $(CURDIR)/$(QEMU10)) $(BIN)/migfd report $(REPORT_ARGS)

# Jupyter refuses to start as root unless told; the notebooks' kernel is this venv's Python.
lab: $(STAMP)
	$(BIN)/jupyter lab $$([ "$$(id -u)" = 0 ] && echo --allow-root) notebooks/

clean:
	rm -rf $(VENV) reports .qemu
