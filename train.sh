#!/usr/bin/env bash
# LoongRL's three-stage run: data -> warmup -> Stage I -> hard mining -> Stage II -> evaluation.
#
#   bash train.sh tiny         CPU, tiny random model, generated data, 2 processes: the whole pipeline in minutes
#   bash train.sh 7b           Qwen2.5-7B-Instruct on 2 nodes x 8 A100 80GB (run the same command on each node)
#   bash train.sh 14b          Qwen2.5-14B-Instruct on 2 nodes x 8 A100 80GB
#   bash train.sh 7b-mi300x    Qwen2.5-7B-Instruct on 1 node x 8 MI300X (ROCm)
#
# Environment: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (multi-node, as for torchrun), NPROC_PER_NODE,
# RUN_DIR (default runs/<preset>), MODEL (hub id or local folder), PYTHON (default python),
# raw data: HOTPOTQA, TWOWIKI, MUSIQUE (the QA sources), DAPO (DAPO-Math-17k parquet), MATHQA (json),
# HAYSTACK (optional book for the RULER needles); stage lengths: WARMUP_EPOCHS, STAGE1_EPOCHS, STAGE2_EPOCHS;
# evaluation: EVAL_BENCHMARKS (default ruler,niah), EVAL_DATA (the files of LongBench, MMLU, ... for eval.py);
# MINE_MODE=rollouts mines hard items from Stage I's own rollouts instead of sampling them again.
# Data routes (GPU presets): RELEASED=path/to/LoongRL-Train-Data trains on the authors' released rows (warmup: its
# non-KeyChain rows; no raw files, no filter). Otherwise the raw files go through the difficulty filter first:
# FILTER_MODEL (default Qwen/Qwen2.5-32B-Instruct; "none" skips the filter) answers every raw QA item 8 times at
# temperature 1.0, items solved 1..6 of 8 are kept (counts cached in RUN_DIR/data/filter/, resumable);
# FILTER_COUNTS=counts.jsonl reuses pass counts from an earlier run instead. The tiny preset skips the filter.
# Re-running the same command resumes: finished stages are skipped, the current one continues from its last
# checkpoint.
set -euo pipefail
cd "$(dirname "$0")"

PRESET=${1:-}
FILTER_ARGS=""  # set by the GPU presets when the difficulty filter runs
PY=${PYTHON:-python}
die() { echo "train.sh: $*" >&2; exit 2; }
int() { [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be a non-negative integer, got '$2'"; }

case "$PRESET" in
  tiny)
    MODEL=${MODEL:-tiny}; NNODES=1; NPROC=${NPROC_PER_NODE:-2}; GPUS=0
    DATA="--scale=0.002 --max_tokens=8192 --key_style=short"
    RL="--device=cpu --batch_prompts=4 --group=4 --max_new_tokens=24 --lr=1e-4 --micro_tokens=20000 --save_every=2 --engine=hf"
    STEPS_WARMUP="--steps=2"; STEPS_1="--steps=4"; STEPS_2="--steps=2"
    MINE="--group=4 --max_new_tokens=24 --engine=hf --batch=8"
    EVAL="--engine=hf --benchmarks=ruler,niah --ruler_lengths=1024,2048 --num_samples=1 --niah_depths=3 --niah_samples=1 --max_new_tokens=8"
    ;;
  7b|14b|7b-mi300x)
    case "$PRESET" in
      7b)        MODEL=${MODEL:-Qwen/Qwen2.5-7B-Instruct};  NNODES=${NNODES:-2}; TP=2 ;;
      14b)       MODEL=${MODEL:-Qwen/Qwen2.5-14B-Instruct}; NNODES=${NNODES:-2}; TP=4 ;;
      7b-mi300x) MODEL=${MODEL:-Qwen/Qwen2.5-7B-Instruct};  NNODES=${NNODES:-1}; TP=1 ;;  # 192 GB per GPU
    esac
    NPROC=${NPROC_PER_NODE:-8}; GPUS=$NPROC
    DATA="--tokenizer=$MODEL --scale=1 --max_tokens=16384 --key_style=uuid --hotpotqa=${HOTPOTQA:-} --twowiki=${TWOWIKI:-} --musique=${MUSIQUE:-} --dapo=${DAPO:-} --mathqa=${MATHQA:-} --haystack=${HAYSTACK:-}"
    if [ -n "${RELEASED:-}" ]; then
      DATA="--tokenizer=$MODEL --scale=1 --max_tokens=16384 --released=$RELEASED"
    elif [ -n "${FILTER_COUNTS:-}" ]; then
      DATA="$DATA --filter_counts=$FILTER_COUNTS"
    elif [ "${FILTER_MODEL:-}" != none ]; then
      DATA="$DATA --filter_model=${FILTER_MODEL:-Qwen/Qwen2.5-32B-Instruct}"; FILTER_ARGS="--engine=vllm --tp=$TP --batch=256"
    fi
    # paper: G=8, lr 1e-6, KL 0.001 (k3), clip 0.2, 16K documents (KeyChain rows up to ~21K with the chains on top)
    # + 4K response, ~256 prompts per step, ~24K tokens per GPU
    RL="--engine=vllm --batch_prompts=256 --group=8 --max_prompt_tokens=22528 --max_new_tokens=4096 --lr=1e-6 --kl_coef=0.001 --micro_tokens=24576 --tp=$TP --save_every=10"
    [ "$PRESET" = 7b-mi300x ] && RL="$RL --micro_tokens=49152"  # 192 GB HBM; no flash-attn wheel assumed: SDPA unless installed
    STEPS_WARMUP="--epochs=${WARMUP_EPOCHS:-1}"; STEPS_1="--epochs=${STAGE1_EPOCHS:-1}"; STEPS_2="--epochs=${STAGE2_EPOCHS:-1}"
    MINE="--engine=vllm --group=8 --temperature=0.6 --max_new_tokens=4096 --tp=$TP"
    # LongBench and the general benchmarks need their files: EVAL_DATA=dir EVAL_BENCHMARKS=longbench,ruler,niah,...
    EVAL="--engine=vllm --prompt_style=train --benchmarks=${EVAL_BENCHMARKS:-ruler,niah} --data_dir=${EVAL_DATA:-data/eval} --ruler_lengths=4096,8192,16384,32768"
    ;;
  "") die "usage: bash train.sh PRESET   (tiny | 7b | 14b | 7b-mi300x)" ;;
  *) die "unknown preset '$PRESET' (tiny | 7b | 14b | 7b-mi300x)" ;;
esac

NODE_RANK=${NODE_RANK:-0}; MASTER_PORT=${MASTER_PORT:-29500}
int NNODES "$NNODES"; int NODE_RANK "$NODE_RANK"; int NPROC_PER_NODE "$NPROC"; int MASTER_PORT "$MASTER_PORT"
[ "$NNODES" -ge 1 ] && [ "$NPROC" -ge 1 ] || die "NNODES and NPROC_PER_NODE must be at least 1"
[ "$NODE_RANK" -lt "$NNODES" ] || die "NODE_RANK=$NODE_RANK must be below NNODES=$NNODES"
if [ "$NNODES" -gt 1 ]; then
  [ -n "${MASTER_ADDR:-}" ] || die "NNODES=$NNODES needs MASTER_ADDR (the address of node 0)"
  LAUNCH="--nnodes=$NNODES --node_rank=$NODE_RANK --master_addr=$MASTER_ADDR --master_port=$MASTER_PORT"
else
  LAUNCH="--standalone"
fi
RUN=${RUN_DIR:-runs/$PRESET}
TORCHRUN="$PY -m torch.distributed.run $LAUNCH --nproc_per_node=$NPROC"
say() { echo; echo "==== [$PRESET] $*"; }

# fail before any heavy work: raw files, the model, this node's GPUs
$PY curriculum.py check --preset="$PRESET" --run_dir="$RUN" --model="$MODEL" --nproc="$GPUS" $DATA

if [ -n "$FILTER_ARGS" ]; then  # every node samples its share of the pass counts
  if [ -f "$RUN/data/filter/counts.jsonl" ]; then
    say "difficulty filter: done, skipping"
  else
    say "difficulty filter: every raw QA item answered 8 times by the filter model"
    $TORCHRUN curriculum.py filter --preset="$PRESET" --run_dir="$RUN" $FILTER_ARGS $DATA
  fi
fi

say "data -> $RUN/data"
if [ "$NODE_RANK" = 0 ]; then
  $PY curriculum.py prepare --preset="$PRESET" --run_dir="$RUN" $DATA
  touch "$RUN/data/.ready"
else  # RUN_DIR must be on a filesystem all nodes share: node 0 builds, the others wait for it
  until [ -f "$RUN/data/.ready" ] && [ "$RUN/data/.ready" -nt "$0" ]; do sleep 10; done
fi

prev=$MODEL
for stage in warmup stage1; do
  if [ -f "$RUN/$stage/hf/config.json" ]; then
    say "$stage: done, skipping"
  else
    steps=$STEPS_1; [ $stage = warmup ] && steps=$STEPS_WARMUP
    say "$stage: GRPO from $prev"
    $TORCHRUN grpo.py --data="$RUN/data/$stage.jsonl" --model="$prev" --out_dir="$RUN/$stage" $RL $steps
  fi
  prev=$RUN/$stage/hf
done

if [ -f "$RUN/mining/report.json" ] && [ -f "$RUN/data/stage2.jsonl" ]; then
  say "hard mining: done, skipping"
else
  say "hard mining: every Stage I item sampled G times with $prev"
  $TORCHRUN curriculum.py mine --preset="$PRESET" --run_dir="$RUN" --model="$prev" --mine_mode="${MINE_MODE:-sample}" $MINE $DATA
fi

if [ -f "$RUN/stage2/hf/config.json" ]; then
  say "stage2: done, skipping"
else
  say "stage2: GRPO on the mined items from $prev"
  $TORCHRUN grpo.py --data="$RUN/data/stage2.jsonl" --model="$prev" --out_dir="$RUN/stage2" $RL $STEPS_2
fi

if [ "$NODE_RANK" = 0 ]; then
  if [ -f "$RUN/eval/results.md" ]; then
    say "evaluation: done, skipping"
  elif [ -f eval.py ]; then
    say "evaluation of $RUN/stage2/hf"
    $PY eval.py --model="$RUN/stage2/hf" --out_dir="$RUN/eval" $EVAL
  fi
  say "summary"
  $PY curriculum.py summary --run_dir="$RUN"
  echo "results: $RUN (summary.md, */log.jsonl, */rollouts/, mining/report.json, eval/)"
fi
