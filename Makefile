# trackingproxy: the two commands a newcomer needs (`make run ARGS=...`, `make test`) and the
# long-running ones (demo, bench). Each target sets up what it needs by itself.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
APT_PACKAGES := pebble curl openssl ca-certificates chromium libnghttp2-14 redis-server haproxy
ARGS ?=

.PHONY: run test lint unit debs venv clean plugin-cache

venv: $(STAMP)

# An editable install in "compat" mode: setuptools' default (PEP 660 finder) hides
# twisted/plugins from Twisted's plugin scan, compat mode puts the checkout on sys.path.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || $(MAKE) --no-print-directory debs APT_PACKAGES=python3-venv
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]' --config-settings editable_mode=compat
	$(MAKE) --no-print-directory plugin-cache
	touch $@

# Twisted writes twisted/plugins/dropin.cache on first scan; do it now so users never see a
# "cannot write dropin.cache" warning.
plugin-cache:
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

# Debian packages the tests use (pebble for ACME, curl/openssl as wire-level clients).
debs:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

run: $(STAMP)
	@$(MAKE) --no-print-directory debs APT_PACKAGES=libnghttp2-14
	$(BIN)/twistd --nodaemon --pidfile= trackingproxy $(ARGS)

# ruff, mypy, and the import contracts that keep the layout the shape of the data flow
# (pyproject.toml [tool.importlinter]; tests/test_layout.py and tests/test_internals.py check
# what they cannot state: no module imports another's private names, nor a private module of
# Twisted or pyOpenSSL outside trackingproxy/internals/).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_layout.py tests/test_internals.py

unit: $(STAMP)
	$(BIN)/python -m pytest -q

test: debs $(STAMP) lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info twisted/plugins/dropin.cache

# The whole flow on one machine, offline, in about a minute: pebble, a stand-in for spgo.io and
# the proxy on loopback ports; an open, a click and a certificate renewal over HTTPS.
# `make demo DEMO_ARGS=--keep-running` leaves everything up afterwards to try the curl commands.
.PHONY: demo
demo: debs $(STAMP)
	$(BIN)/python demo/run_demo.py $(DEMO_ARGS)

# Cluster mode on one machine, offline, in about a minute: a real redis-server, pebble,
# HAProxy (PROXY v2, round robin) and three replicas sharing the store: one certificate for
# all three, a replica killed -9 mid-order and another finishing it, a renewal reaching every
# replica, requests answered while Redis is down. DEMO_ARGS=--keep-running leaves it up.
.PHONY: cluster-demo
cluster-demo: debs $(STAMP)
	$(BIN)/python demo/run_cluster_demo.py $(DEMO_ARGS)

# trackingproxy against nginx (SparkPost's recipe, and tuned) and Caddy, on loopback; writes
# bench/RESULTS.md and bench/results/latest.json (see bench/README.md). bench-quick: ~3 minutes.
BENCH_DEBS := nginx caddy wrk nghttp2-client util-linux strace redis-server
.PHONY: bench bench-quick bench-domains
bench: $(STAMP)
	@$(MAKE) --no-print-directory debs APT_PACKAGES="$(BENCH_DEBS)"
	$(BIN)/python -m bench.run $(BENCH_ARGS)
	$(BIN)/python -m bench.domains

# 100, 1,000 and 10,000 domains on one instance, from --certs-dir, the state directory and a
# Redis store: start-up, memory per domain, handshakes, SIGHUP, /metrics (bench/domains.py;
# writes its table into bench/RESULTS.md).
bench-domains: $(STAMP)
	@$(MAKE) --no-print-directory debs APT_PACKAGES="redis-server util-linux"
	$(BIN)/python -m bench.domains $(BENCH_DOMAINS_ARGS)

bench-quick: $(STAMP)
	@$(MAKE) --no-print-directory debs APT_PACKAGES="$(BENCH_DEBS)"
	$(BIN)/python -m bench.run --quick $(BENCH_ARGS)

# Build deploy/Dockerfile with podman and run the image for real (3 to 5 minutes the first time,
# then about 1): pebble, a stand-in for spgo.io and the container on the host network get a
# certificate, proxy an open and a click over HTTPS, restart and keep the certificate. Needs root
# (rootful podman) and free ports 80 and 443; installs podman, runc and debootstrap when
# missing and makes the base image debian:bookworm-slim with debootstrap (no registry needed).
# CONTAINER_TEST_ARGS="--source head" builds the last commit instead of the working tree.
.PHONY: container-test
container-test: debs $(STAMP)
	$(BIN)/python tests/deploy/container_run.py $(CONTAINER_TEST_ARGS)

# Soak: SOAK_SECONDS (default 600) of mixed load (opens and clicks, HTTP and HTTPS, h1 and h2)
# with certificate renewals every minute (pebble), a 30 s upstream outage in the middle and a
# SIGTERM under load at the end, then the property tests with more examples; writes
# soak/RESULTS.md. `make soak SOAK_SECONDS=120` is a short run.
SOAK_SECONDS ?= 600
.PHONY: soak
soak: debs $(STAMP)
	@$(MAKE) --no-print-directory debs APT_PACKAGES="pebble nghttp2-client"
	SOAK_SECONDS=$(SOAK_SECONDS) $(BIN)/python soak/run.py
