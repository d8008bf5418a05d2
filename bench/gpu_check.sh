#!/usr/bin/env bash
# Device check on one GPU: GPU-marked tests, the gpu1 smoke preset (one step per stage), trainer benchmark.
#
#   bash bench/gpu_check.sh                   # each part: passed / FAILED and its seconds; exit 1 if any failed
#   ENFORCE_EAGER=1 bash bench/gpu_check.sh   # every vLLM engine of the gpu1 run without torch.compile and CUDA
#                                             # graphs: cold starts in seconds, not minutes (decoding is slower)
#
# Without a GPU nothing is checked: it says so and exits 3 (never 0, which would read as a pass).
# Time limits are for cold starts (empty compile caches): the gpu1 run starts five vLLM engines (warmup, Stage I,
# hard mining, Stage II, evaluation), each compiling and capturing CUDA graphs unless ENFORCE_EAGER=1.
# T_TESTS, T_GPU1, T_BENCH override them (seconds). PYTHON (default python), GPU_CHECK_DIR (default a fresh
# temporary folder for the smoke run).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! $PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "gpu_check: no GPU here (torch.cuda.is_available() is False): nothing was checked" >&2
  exit 3
fi
EAGER=${ENFORCE_EAGER:-0}
[ "$EAGER" = 1 ] && T_GPU1=${T_GPU1:-480} || T_GPU1=${T_GPU1:-900}
T_TESTS=${T_TESTS:-300}; T_BENCH=${T_BENCH:-180}
$PY -c "import torch, transformers; print('gpu_check:', torch.cuda.get_device_name(), 'torch', torch.__version__, 'transformers', transformers.__version__)"
$PY -c "import importlib.util as u; print('gpu_check: vllm', __import__('vllm').__version__ if u.find_spec('vllm') else 'not installed (HF engine)', '| flash-attn', 'usable' if __import__('grpo').flash_attn_ok(__import__('torch').device('cuda')) else 'not usable (SDPA)', '| ENFORCE_EAGER=$EAGER')"
T0=$SECONDS
failed=""
part() {  # part NAME SECONDS COMMAND...: run it under a time limit, say how it went
  local name=$1 limit=$2 t=$SECONDS rc
  shift 2
  timeout "$limit" "$@"; rc=$?
  if [ $rc = 0 ]; then
    echo "gpu_check: $name passed in $((SECONDS - t)) s"
  else
    [ $rc = 124 ] && rc="timed out after ${limit} s" || rc="exit code $rc"
    echo "gpu_check: $name FAILED ($rc, $((SECONDS - t)) s)"; failed="$failed $name"
  fi
}

echo "== 1/3 GPU-marked tests"
part tests "$T_TESTS" $PY -m pytest -q tests/test_vllm.py tests/test_rollout.py tests/test_grpo.py -k "vllm or gpu" -p no:cacheprovider

echo "== 2/3 gpu1 preset, one step per stage"
RUN=${GPU_CHECK_DIR:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
part gpu1 "$T_GPU1" env RUN_DIR="$RUN" STEPS=1 ENFORCE_EAGER="$EAGER" PYTHON="$PY" bash train.sh gpu1
for s in warmup stage1 stage2; do
  [ -f "$RUN/$s/log.jsonl" ] && echo "gpu_check: $s $(tail -n 1 "$RUN/$s/log.jsonl")"
done

echo "== 3/3 trainer benchmark: Qwen2.5-0.5B shape, bf16 FSDP2, 16K packing"
part bench "$T_BENCH" $PY bench/bench_train.py

echo "gpu_check: done in $((SECONDS - T0)) s" "${failed:+; FAILED:$failed}"
[ -z "$failed" ]
