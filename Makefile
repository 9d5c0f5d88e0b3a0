# `make demo`: set up, then the whole path on SmolLM2-135M-Instruct: convert its top 15 layers (gated), heal them
# briefly (DEMO_TOKENS; gated), export the result, print the original / converted / adapted table and the answers.
# `make test`: set up, run the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build; on a CUDA machine set TORCH to the build you want (e.g. TORCH=torch==2.13.0 from the CUDA index).
TORCH ?= torch==2.13.0
RUN := runs/smollm2-ladder15
DEMO_TOKENS ?= 12000
EXPORT := dist/smollm2-ladder15

.PHONY: setup demo test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# A short heal fails the after_adapt gate (exit 1) by design: the demo goes on and exports with --force, which the
# model card states.
demo: setup
	smollm2=$$($(VENV)/bin/ladder-fetch-smollm2) && \
	$(VENV)/bin/ladder-convert "$$smollm2" --layers 15 --output $(RUN) --overwrite && \
	rm -rf $(RUN)-demo && \
	{ $(PY) adapt/sft.py recipes/smollm2-135m.yaml --max_train_tokens $(DEMO_TOKENS) --output_dir $(RUN)-demo \
		--save_steps 1000 --logging_steps 1; [ $$? -le 1 ]; } && \
	$(VENV)/bin/ladder-publish $(RUN)-demo/final --export $(EXPORT) --overwrite --force \
		--base-model HuggingFaceTB/SmolLM2-135M-Instruct --license apache-2.0 && \
	sed -n '/^## Evaluation/,/^## Usage/p' $(EXPORT)/README.md | head -n -1 && \
	$(PY) -m convert.chat "$$smollm2" $(RUN) $(EXPORT)

test: setup
	$(VENV)/bin/ladder-fetch-smollm2
	$(PY) -m pytest -q
