#!/usr/bin/env bash
# One device call for issue 7: the graphed decoder's GPU tests, the decode diagnosis (kernel profile per
# step, stock-vs-stock and loraforge-vs-stock greedy tokens), then the server bench (stock generate vs
# FastDecoder in-process vs 16/1 streams through `loraforge serve`, staggered arrivals).
# Carried: .whl/ .whl2/ (bitsandbytes, fastapi stack) and .cache/model-gpu-check (SmolLM2 tokenizer).
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl .whl2/*.whl || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
timeout ${TESTS_TIMEOUT:-120} python3 -m pytest -q ${GPU_TESTS:-tests/gpu/test_fast_decode_gpu.py} -p no:cacheprovider \
  2>&1 | tee $OUT/pytest-decode.log | tail -4
[ -n "$SKIP_DIAG" ] || timeout ${DIAG_TIMEOUT:-150} python3 bench/decode_diag.py --out $OUT 2>&1 \
  | grep -v -i warn | tee $OUT/decode-diag.log | tail -8
timeout ${SERVE_TIMEOUT:-300} python3 bench/serve_speed.py --out $OUT 2>&1 | tee $OUT/serve.log \
  | grep -v "Loading weights" | tail -60
[ -z "$GEMM" ] || timeout 90 python3 bench/gemm_shapes.py --out $OUT 2>&1 | tee $OUT/gemm.log
[ -z "$CONCAT" ] || timeout 60 python3 bench/proj_concat_check.py --out $OUT 2>&1 | tee $OUT/concat.log
