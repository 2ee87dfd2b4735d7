# The two commands of README.rst: `make run` and `make test`.  Each builds its
# own virtual environment from pyproject.toml on first use, with only python3.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test bench demo clean sipp

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# compat mode puts the checkout itself on sys.path: tap.py and twisted/plugins live at the top.
	$(BIN)/python -m pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/twistd --nodaemon --pidfile= mpay $(ARGS)

test: $(STAMP)
	@command -v sipp >/dev/null || $(MAKE) --no-print-directory sipp
	$(BIN)/trial --reporter=mpay $(or $(TESTS),tests)

# Against the servers of `make run` (another shell): enrol, pay, charge, audit.
demo: $(STAMP)
	$(BIN)/python -m mpay.cli.demo $(ARGS)

bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) _trial_temp twisted/plugins/dropin.cache

# SIPp, the independent SIP peer of the interop tests (Debian: sip-tester).
sipp:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sip-tester >/dev/null) \
	    || echo "could not install sip-tester"; \
	else echo "SIPp (Debian package sip-tester) is missing: the SIPp interop tests will be skipped"; fi
