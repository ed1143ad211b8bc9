#!/usr/bin/env bash
# `make gpu-check`: what runs first whenever a GPU is at hand. Under 10 minutes on one H100; writes
# bench/results/gpu-DATE/ (logs/, env.json, the benchmarks' rows, steps.jsonl, summary.md).
#   make gpu-check                 # or: bash scripts/gpu_check.sh
#   make gpu-check DRY_RUN=1       # CPU, seconds: print the plan, check that every command resolves
#   make gpu-check PY=python3      # a machine whose python already holds torch (no .venv made)
# Each step runs under its own timeout, capped by what is left of GPU_CHECK_BUDGET_S (570 s), so the
# whole stays under 10 minutes; a step that fails is recorded as failed and the next one runs; a step
# this machine cannot run (one GPU: no NCCL run; a missing package) is recorded as skipped, with why.
# Exit status: 1 if a step failed (or, in a dry run, a command does not resolve), else 0.
set -euo pipefail
ROOT=${GPU_CHECK_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}
cd "$ROOT"
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || command -v "$PY" >/dev/null || PY=python3
DRY_RUN=${DRY_RUN:-0}
DATE=$(date +%F)
OUT=${GPU_CHECK_OUT:-bench/results/gpu-$DATE}
RUN=${GPU_CHECK_RUNS:-runs/gpu-check-$DATE}           # bulky: data, checkpoints, the exported model
BUDGET_S=${GPU_CHECK_BUDGET_S:-570}
DATA=$RUN/data
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

# the plan adapts to what this python has (a dry run checks the commands this machine would run)
GPUS=0 MISSING=""
if [ "$DRY_RUN" = 1 ]; then eval "$("$PY" scripts/gpu_check.py probe)"; else eval "$("$PY" scripts/gpu_check.py probe --gpus)"; fi
has() { [[ " $MISSING " != *" $1 "* ]]; }

# ---------------------------------------------------------------------------------------- the plan
# step NAME ESTIMATE_S TIMEOUT_S NEEDS -- COMMAND...   NEEDS: comma list of gpu, gpu2, mod:NAME, step:NAME
NAMES=() ; declare -A EST TMO NEEDS CMD NOTE
quote() {   # the arguments as one shell-readable line (quoted only where needed)
  local a out=()
  for a in "$@"; do
    if [[ $a =~ ^[][A-Za-z0-9_./=:,@+%-]+$ ]]; then out+=("$a"); else out+=("$(printf '%q' "$a")"); fi
  done
  echo "${out[*]}"
}
step() {
  local name=$1; NAMES+=("$name"); EST[$name]=$2; TMO[$name]=$3; NEEDS[$name]=$4; shift 5
  CMD[$name]=$(quote "$@")
}

step env 10 60 - -- "$PY" scripts/gpu_check.py env --out "$OUT"

# The interpreter tests' cases, compiled (tests/test_kernels_triton.py: fp32 at 1e-5, half at 3e-2),
# plus every tile the tuner may pick. Cold Triton cache: ~100 compiles of a few seconds each, spread
# over 8 pytest-xdist workers where it is installed.
XDIST=(); KERNELS_EST=150 KERNELS_TMO=200
if has xdist; then XDIST=(-n 8); KERNELS_EST=60 KERNELS_TMO=150; fi
step kernels $KERNELS_EST $KERNELS_TMO gpu,mod:triton,mod:pytest -- env -u TRITON_INTERPRET KERNELS_TRITON_CHILD=1 \
  TRAINER_TRITON_DEVICE=cuda "$PY" -m pytest -q -rs -p no:cacheprovider "${XDIST[@]}" tests/test_kernels_triton.py

# b = N = 32768, bf16: Triton (tuned; its tile in the row) vs the old 128 x 128 default tile vs
# open_clip's ClipLoss vs the torch reference, against a cuBLAS GEMM of the same shape.
LOSS_IMPLS=torch,open_clip,triton
has open_clip || NOTE[bench-loss]="open_clip not importable: its row says skipped"
step bench-loss 90 150 gpu,mod:triton -- "$PY" -m kernels.bench --b 32768 --dim 512 1024 --dtype bf16 \
  --impls "$LOSS_IMPLS" --tiles 128x128x64:8:3 --reps 10 --warmup 2 --out "$OUT" --tag loss

step demo-data 15 60 mod:transformers -- "$PY" -m trainer make-demo-data --out "$DATA" --num-train 4096 --num-val 512

DATA_ARGS=(data.train_shards="$DATA/train" data.val_shards="$DATA/val" tokenizer.path="$DATA/tokenizer"
           eval.zeroshot="$DATA/zeroshot.json" data.train_num_samples=4096)

# ViT-B/32 (context 77) on one GPU, bf16, 256 a step: open_clip's step, the bare loop, ours, and
# ours with ECLIPSE (keep rate 0.7 from the first step). ~35 s per impl: start-up + 5 + 20 steps.
TRAIN_IMPLS=openclip,bare,ours,eclipse
if ! has open_clip; then TRAIN_IMPLS=bare,ours,eclipse; NOTE[bench-train]="openclip left out: open_clip not importable"; fi
step bench-train 150 210 gpu,mod:deepspeed,mod:webdataset,step:demo-data -- "$PY" -m trainer bench train \
  --config trainer/configs/demo.yaml --nproc 1 --impls "$TRAIN_IMPLS" --steps 20 --warmup 5 --out "$OUT" \
  --tag vitb32_bf16 model.preset=vit-b-32 model.context_length=77 deepspeed.precision=bf16 \
  data.batch_size=256 data.workers=8 "${DATA_ARGS[@]}"

# Host syncs per optimizer step on the GPU (issue "Ready for a thousand GPUs" §6): the tensor reads
# by caller and the synchronizing CUDA calls torch's sync-debug mode reports, tiny preset, bf16,
# accumulation 4 (bench/results/host_syncs.md has the CPU count to compare with).
step host-syncs 30 90 gpu,mod:deepspeed,mod:webdataset,step:demo-data -- "$PY" -m trainer bench train \
  --config trainer/configs/demo.yaml --nproc 1 --impls ours --profile timers --steps 4 --warmup 2 --out "$OUT" \
  --tag host_syncs_accum4 deepspeed.precision=bf16 train.grad_accum_steps=4 log.every_steps=2 "${DATA_ARGS[@]}"

# 2 ranks over NCCL end to end: bf16, ZeRO-3, the Triton loss, checkpoints, the final evaluation
# (eval.json), then export-hf.
step nccl-train 90 150 gpu2,mod:deepspeed,mod:webdataset,step:demo-data -- "$PY" -m torch.distributed.run \
  --standalone --nproc_per_node 2 -m trainer train --config trainer/configs/demo.yaml \
  output_dir="$RUN/nccl" max_steps=60 deepspeed.zero_stage=3 deepspeed.precision=bf16 loss.impl=triton \
  checkpoint.every_steps=30 log.progress=false "${DATA_ARGS[@]}"
step nccl-export 20 60 step:nccl-train -- "$PY" -m trainer export-hf --checkpoint "$RUN/nccl/checkpoints" \
  --out "$RUN/nccl/hf"

total_est=0; for n in "${NAMES[@]}"; do total_est=$((total_est + EST[$n])); done
echo "== gpu-check plan ($total_est s estimated in all, budget $BUDGET_S s; results in $OUT)"
for n in "${NAMES[@]}"; do
  printf '%-12s ~%4s s (timeout %3s s, needs %s)\n    %s\n' "$n" "${EST[$n]}" "${TMO[$n]}" "${NEEDS[$n]}" "${CMD[$n]}"
done

if [ "$DRY_RUN" = 1 ]; then
  plan=$(mktemp)
  trap 'rm -f "$plan"' EXIT
  for n in "${NAMES[@]}"; do printf '%s\t%s\n' "$n" "${CMD[$n]}" >>"$plan"; done
  echo "== dry run: resolving every command (nothing runs)"
  "$PY" scripts/gpu_check.py resolve "$plan"
  exit $?
fi

# ---------------------------------------------------------------------------------------- the run
mkdir -p "$OUT/logs"
: >"$OUT/steps.jsonl"
declare -A STATUS
start_all=$(date +%s)

unmet() {   # why NEEDS ($1) are not met here, or nothing
  local need
  for need in ${1//,/ }; do
    case $need in
      gpu) [ "$GPUS" -ge 1 ] || { echo "no GPU visible"; return; } ;;
      gpu2) [ "$GPUS" -ge 2 ] || { echo "needs 2 GPUs, $GPUS visible"; return; } ;;
      mod:*) has "${need#mod:}" || { echo "python module ${need#mod:} not importable by $PY"; return; } ;;
      step:*) [ "${STATUS[${need#step:}]:-}" = ok ] || { echo "step ${need#step:} did not succeed"; return; } ;;
    esac
  done
}

record() {  # NAME STATUS RC SECONDS REASON LOG
  local n=$1
  STATUS[$n]=$2
  "$PY" scripts/gpu_check.py record "$OUT" --step "$n" --status "$2" ${3:+--rc "$3"} --seconds "$4" \
    --estimate "${EST[$n]}" --timeout "${TMO[$n]}" --reason "$5" --log "$6" --command "${CMD[$n]}"
  printf '== %-12s %s (%s s)%s\n' "$n" "$2" "$4" "${5:+: $5}"
}

for n in "${NAMES[@]}"; do
  left=$((BUDGET_S - ($(date +%s) - start_all)))
  timeout_s=$(( TMO[$n] < left ? TMO[$n] : left ))
  why=$(unmet "${NEEDS[$n]}")
  if [ -z "$why" ] && [ "$timeout_s" -lt 10 ]; then why="no time left in the $BUDGET_S s budget"; fi
  if [ -n "$why" ]; then record "$n" skipped "" 0 "$why" ""; continue; fi
  log=$OUT/logs/$n.log
  echo "== $n (~${EST[$n]} s, timeout $timeout_s s): ${CMD[$n]}"
  t0=$(date +%s)
  if eval "timeout -k 15 $timeout_s ${CMD[$n]}" >"$log" 2>&1; then rc=0; else rc=$?; fi
  secs=$(( $(date +%s) - t0 ))
  tail -n 3 "$log" | sed 's/^/    /'
  if [ "$rc" = 0 ]; then
    record "$n" ok 0 "$secs" "${NOTE[$n]:-}" "$log"
  else
    case $rc in 124|137) reason="timed out after $timeout_s s" ;; *) reason="exit $rc" ;; esac
    record "$n" failed "$rc" "$secs" "$reason${NOTE[$n]:+; ${NOTE[$n]}}" "$log"
  fi
done

# the NCCL run's evidence (its checkpoints and exported weights stay under $RUN)
if [ "${STATUS[nccl-train]:-}" = ok ]; then
  mkdir -p "$OUT/nccl"
  cp "$RUN/nccl/eval.json" "$RUN/nccl/metrics.jsonl" "$RUN/nccl/config.yaml" "$OUT/nccl/" 2>/dev/null || true
fi

"$PY" scripts/gpu_check.py summary "$OUT" >/dev/null
echo "== summary: $OUT/summary.md ($(( $(date +%s) - start_all )) s)"
if grep -q '"status": "failed"' "$OUT/steps.jsonl"; then exit 1; fi
