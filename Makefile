# The two commands of README.rst: `make run` and `make test`.  Each builds its
# own virtual environment from pyproject.toml on first use, with only python3.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Debian trixie's SIPp, which has TLS, in a root of its own outside the checkout (built once).
SIPP_TLS_ROOT ?= /var/cache/mpay/sipp-trixie
export SIPP_TLS_ROOT

# The hot modules mypyc compiles in place (mpay/compiled.py's MODULES, in this order).
COMPILED := mpay/auth/crypto.py mpay/auth/tickets.py mpay/auth/verifier.py mpay/payment/body.py \
            mpay/sip/headers.py mpay/sip/message.py mpay/sip/parser.py mpay/sip/uri.py \
            mpay/sip/useragent.py mpay/sip/transaction.py mpay/sip/server_transaction.py \
            mpay/sip/client_transaction.py mpay/sip/linger.py mpay/sip/timing.py mpay/e164.py \
            mpay/payment/transfer_flow.py mpay/payment/receipt_groups.py mpay/payment/receipt.py \
            mpay/payment/transfer.py mpay/sip/endpoint.py mpay/timewheel.py
COMPILED_STAMP := build/.compiled-stamp

.PHONY: run test bench demo clean sipp

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# compat mode puts the checkout itself on sys.path: tap.py and twisted/plugins live at the top.
	$(BIN)/python -m pip install --quiet -e '.[test,compiled]' --config-settings editable_mode=compat
	touch $(STAMP)

# Again whenever a source changes; if mypyc cannot build, the sources run (it says so).
$(COMPILED_STAMP): $(STAMP) $(COMPILED) mpay/compiled.py
	$(BIN)/python -m mpay.compiled build
	mkdir -p build && touch $(COMPILED_STAMP)

run: $(COMPILED_STAMP)
	$(BIN)/twistd --nodaemon --pidfile= mpay $(ARGS)

test: $(COMPILED_STAMP)
	@{ command -v sipp && [ -x $(SIPP_TLS_ROOT)/usr/bin/sipp ]; } >/dev/null || $(MAKE) --no-print-directory sipp
	$(BIN)/trial --reporter=mpay $(or $(TESTS),tests)

# Against the servers of `make run` (another shell): enrol, pay, charge, audit.
demo: $(COMPILED_STAMP)
	$(BIN)/python -m mpay.cli.demo $(ARGS)

bench: $(COMPILED_STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) _trial_temp twisted/plugins/dropin.cache build ./*__mypyc*.so
	find mpay -name '*.so' -delete

# SIPp, the independent SIP peer of the interop tests (Debian: sip-tester), and for TLS
# trixie's in $(SIPP_TLS_ROOT) (about a minute, once).  Never fails: what is missing is skipped.
sipp:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    command -v sipp >/dev/null || \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sip-tester >/dev/null) \
	    || echo "could not install sip-tester: the SIPp interop tests will be skipped"; \
	    [ -x $(SIPP_TLS_ROOT)/usr/bin/sipp ] || { echo "building SIPp with TLS in $(SIPP_TLS_ROOT)"; \
	    sh tests/sipp/build_tls_root.sh $(SIPP_TLS_ROOT) || echo "the SIPp TLS test will be skipped"; }; \
	else echo "SIPp (Debian package sip-tester) and its TLS build need root: the SIPp tests may be skipped"; fi
