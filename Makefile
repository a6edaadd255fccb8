# msgmux developer entry points.  A newcomer needs two: `make demo` and `make test`.
# Both create the virtualenv on first use.  The integration tests, the demo,
# `make faults` and `make bench` need root (network namespaces, a private
# RabbitMQ node) and the machine's RabbitMQ at 127.0.0.1:5672 (guest/guest).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: all venv test unit demo faults bench scale clean

all: test

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# compat mode puts the source tree on sys.path, so twistd finds twisted/plugins/msgmux_dropin.py
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	$(PY) -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $(STAMP)

venv: $(STAMP)

# Every test: unit tests, codec fuzzing, the integration tests against two real brokers,
# and the alerting rules (promtool, installed from Debian's prometheus package when missing).
test: $(STAMP)
	lab/install-promtool
	MSGMUX_INTEGRATION=1 $(PY) -m twisted.trial --temp-directory=/tmp/msgmux-trial tests

# Unit tests only (no root, no brokers).
unit: $(STAMP)
	$(PY) -m twisted.trial tests

# `make demo TLS=1`: the same with both brokers listening for TLS only.
demo: $(STAMP)
	$(PY) -m lab.demo $(if $(TLS),--tls)

# Fault injection under load (kill -9 each half, restart each broker, cut the socket, drop connections);
# prints the sent/delivered/lost/duplicated/outage table; then the halves' and brokers' faults
# again with both brokers TLS only.  About four minutes.
faults: $(STAMP)
	$(PY) -m lab.faults

# msgmux against the alternatives on this machine (oslo direct, the Shovel), one run,
# printed as a table of figures and ratios.  About five minutes.
bench: $(STAMP)
	$(PY) -m lab.bench

# 200 supervised tenant halves on one host (HALVES=50 for fewer): time until all
# are healthy, memory (PSS per half, total), the control half's CPU at idle.
# About two minutes.
HALVES ?= 200
scale: $(STAMP)
	$(PY) -m lab.scale --halves $(HALVES)

clean:
	rm -rf $(VENV) _trial_temp /tmp/msgmux-trial
