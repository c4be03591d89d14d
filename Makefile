# Short verbs; each does its own set-up. See README.md.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= config/broker.yaml

.PHONY: run test lint bench peers venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

## make run: the broker with config/broker.yaml (MQTT on 1883, MQTT over WebSocket on 8083 /mqtt)
run: venv
	$(VENV)/bin/realip-broker serve --config $(CONFIG)

## make test: the whole suite (unit, integration, end-to-end behind real NGINX/HAProxy)
test: venv peers
	$(PY) -m pytest $(PYTEST_ARGS)

## make lint: ruff and mypy, as CI runs them
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

## make bench: every benchmark side by side (realip-broker, amqtt 0.12.1, mosquitto), < 10 min: tables,
## ratios, wall times, the issue's criteria. BENCH_ARGS=--quick: smoke run (< 1 min);
## BENCH_ARGS="--only throughput ratio filters latency connect auth bans persistence cluster ws memory parse admin profile"; --output FILE
bench: venv peers
	$(PY) bench/run.py $(BENCH_ARGS)

## make peers: nginx, haproxy, mosquitto and its clients from Debian, if missing
peers:
	@scripts/install-peers.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
