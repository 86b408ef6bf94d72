#!/usr/bin/env bash
# One device call: GPU tests, then the speed bench. Usage (on the device, after installing the
# carried wheels into /tmp/site): bash bench/device_run.sh [CASE ...]
set -o pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv | tee $OUT/gpu.txt
python3 -c "import torch, triton, transformers, peft, bitsandbytes; print(torch.__version__, triton.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__)"
[ -n "$SKIP_TESTS" ] || timeout ${TESTS_TIMEOUT:-150} python3 -m pytest -q -x tests/gpu -p no:cacheprovider 2>&1 | tee $OUT/pytest.log | tail -15
timeout ${BENCH_TIMEOUT:-420} python3 bench/speed.py "$@" --out $OUT 2>&1 | tee $OUT/bench.log | grep -v "Loading weights"
cat $OUT/speed-*.md
