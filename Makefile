# edgec: two commands to start.
#   make demo   build the bundled digits sample for four device profiles, print the report
#   make test   install what the tests need and run lint, type checks, import contracts, tests
#
# Uses the active virtual environment if there is one, else creates .venv here.

ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgec-installed
DEMO_OUT ?= build/demo
PYTEST_ARGS ?=

.PHONY: demo test check pytest install system-deps samples mobilenet bench clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[compiler,pytorch,agent,server,dev]"
	touch $(STAMP)

install: $(STAMP)

# The Mosquitto broker binary the integration tests start (Debian's package), where apt can.
system-deps:
	@command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || \
	  { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; } || \
	  echo "note: mosquitto is not installed; broker tests will skip"

demo: $(STAMP)
	$(PY) -m edgec profiles list
	$(PY) -m edgec build samples/digits/model.onnx --name digits --version 1.0.0 \
	  --target x86-64-cpu --target raspberry-pi-4 --target jetson-orin-nano --target apple-silicon-mac \
	  --calibration samples/digits/calib.npz --eval samples/digits/eval.npz \
	  --out $(DEMO_OUT) --force
	$(PY) -m edgec inspect $(DEMO_OUT)/digits-1.0.0-raspberry-pi-4

check: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

pytest: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test: system-deps check pytest

# Regenerate the digits sample (trains a CNN; needs the samples extra: torch, scikit-learn).
samples: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[samples]"
	$(PY) samples/digits/make_digits.py
	$(PY) samples/digits/make_digits_keras.py

mobilenet: $(STAMP)
	$(PY) samples/mobilenet/make_mobilenetv2.py

bench: $(STAMP)
	$(PY) bench/bench_onnx_precision.py
	$(PY) bench/bench_formats.py

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
