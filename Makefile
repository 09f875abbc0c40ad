# Two entry points a new user needs: `make demo` and `make test`. Both set up first.
PYTHON ?= python3
VENV ?= .venv
# An exact torch version: pip takes the CPU wheel where one lies on disk (this project's
# CI machines) and PyPI's CUDA wheel on a machine with an NVIDIA GPU.
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.cohort-installed

.PHONY: setup browser nginx systemd demo lint test benchmark clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/cohort simulate

# The audit page is tested in real headless Chromium (Debian's package); as root it is
# installed here, otherwise that one test is skipped with its reason.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || echo "chromium is not installed: the audit page test will be skipped"

# The coordinator's front door is Debian's nginx; the deployment tests run it for real. As
# root it is installed here (RUNLEVEL=1: the package's own service is not started),
# otherwise those tests are skipped with their reason.
nginx:
	@command -v nginx >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; } || echo "nginx is not installed: the deployment tests will be skipped"

# The systemd units `cohort service` writes are checked with systemd-analyze (Debian's
# systemd package; nothing is started, systemd need not run). As root it is installed
# here, otherwise those tests are skipped with their reason.
systemd:
	@command -v systemd-analyze >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null; } || echo "systemd-analyze is not installed: the service unit tests will be skipped"

# The code's habits, checked before any test runs: one format (ruff format), the lint rules
# and the types (mypy), all configured in pyproject.toml. Any finding fails `make test`.
lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

# Two workers, each taking whole test files (a file's shared federation starts once): much
# of a federation test is waiting on timeouts and process starts, which the other worker
# fills. The longest files go first, in tests/conftest.py's order, which
# --no-loadscope-reorder keeps (xdist would otherwise sort the files by how many tests they
# hold). A third worker measured 44 s faster but slowed each federation's exchanges
# towards their timeouts. `pytest tests/test_x.py` alone still runs serially.
test: setup lint browser nginx systemd
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=25

benchmark: setup
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
