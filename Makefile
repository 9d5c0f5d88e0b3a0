# `make demo`: set up, fetch SmolLM2-135M-Instruct, convert its top 15 layers, compare answers.
# `make test`: set up, run the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build; on a CUDA machine set TORCH to the build you want (e.g. TORCH=torch==2.13.0 from the CUDA index).
TORCH ?= torch==2.13.0
RUN := runs/smollm2-ladder15

.PHONY: setup demo test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	smollm2=$$($(VENV)/bin/ladder-fetch-smollm2) && \
	$(VENV)/bin/ladder-convert "$$smollm2" --layers 15 --output $(RUN) --overwrite && \
	$(PY) -m convert.chat "$$smollm2" $(RUN)

test: setup
	$(VENV)/bin/ladder-fetch-smollm2
	$(PY) -m pytest -q
