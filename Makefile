# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONPATH := $(CURDIR)

.PHONY: run test test-systemd test-cluster venv broker rpm bench soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '.[test]'
	touch $(STAMP)

venv: $(STAMP)

broker:
	scripts/ensure-broker

run: venv broker
	$(VENV)/bin/twistd --nodaemon --pidfile= amqp-consumer --config=conf/amqp-consumer.toml

test: venv broker
	$(PY) -m mypy  # strict; what it checks is set in pyproject.toml [tool.mypy]
	$(PY) -m pytest  # includes make rpm's checks (tests/test_rpm.py) when rpmbuild is installed

# The RPM installed into a booted systemd container (root, systemd-nspawn, debootstrap; see README).
test-systemd: venv broker rpm
	$(PY) -m pytest tests/systemd_container

# Three RabbitMQ 4.3 nodes in a cluster, a node and a daemon killed (tests/cluster; see README).
test-cluster: venv
	AMQP_CONSUMER_BROKERS=4.3 $(PY) -m pytest tests/cluster -p no:randomly

rpm: venv
	PYTHON=$(PY) packaging/rpm/build.sh

bench: venv broker
	$(PY) bench/run.py

# Not part of `make test`: 30 minutes of mixed traffic against a private node killed every few minutes.
SOAK_MINUTES ?= 30
SOAK_BROKER ?= 3.10
soak: venv
	$(PY) bench/soak.py --minutes $(SOAK_MINUTES) --broker $(SOAK_BROKER)

clean:
	rm -rf $(VENV) build dist *.egg-info twisted/plugins/dropin.cache
