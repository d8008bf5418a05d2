#!/usr/bin/env bash
# Device check on one GPU, under 8 minutes: GPU-marked tests, the gpu1 smoke preset (short), trainer benchmark.
#
#   bash bench/gpu_check.sh          # prints each part's result; exits 0 with one line when there is no GPU
#
# PYTHON (default python), GPU_CHECK_DIR (default a fresh temporary folder for the smoke run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! $PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "gpu_check: no GPU (torch.cuda.is_available() is False): skipped"
  exit 0
fi
$PY -c "import torch, transformers; print('gpu_check:', torch.cuda.get_device_name(), 'torch', torch.__version__, 'transformers', transformers.__version__)"
$PY -c "import importlib.util as u; print('gpu_check: vllm', __import__('vllm').__version__ if u.find_spec('vllm') else 'not installed (HF engine)', '| flash-attn', 'usable' if __import__('grpo').flash_attn_ok(__import__('torch').device('cuda')) else 'not usable (SDPA)')"
T0=$SECONDS

echo "== 1/3 GPU-marked tests (skipped on the CPU)"
timeout 90 $PY -m pytest -q -x tests/test_rollout.py tests/test_grpo.py -k "vllm or gpu" -p no:cacheprovider

echo "== 2/3 gpu1 preset, one step per stage"
RUN=${GPU_CHECK_DIR:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
RUN_DIR=$RUN GPU1_STEPS=1 PYTHON=$PY timeout 240 bash train.sh gpu1
$PY -c "import json, sys; [print('gpu_check:', s, json.loads(open(f'{sys.argv[1]}/{s}/log.jsonl').read().splitlines()[-1])) for s in ('warmup', 'stage1', 'stage2')]" "$RUN"

echo "== 3/3 trainer benchmark: Qwen2.5-0.5B shape, bf16 FSDP2, 16K packing"
timeout 120 $PY bench/bench_train.py
echo "gpu_check: done in $((SECONDS - T0)) s"
