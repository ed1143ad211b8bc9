#!/bin/bash
# All four methods (trainer/configs/efficient.yaml) as five SLURM stages, with GrowCLIP between the
# training stages (slurm/README.md, "All four methods, staged (efficient.yaml with growth)"):
#
#   train 2+2 layers, width 64 (heads 2), all four   -> RUNS/s1       (ECL round 1 halfway)
#   grow depth 2 -> 4                                 -> RUNS/s1-grown
#   train the grown model, all four                   -> RUNS/s2       (ECL round 2 halfway)
#   grow width 64 -> 128 (heads 2 -> 4)               -> RUNS/s2-grown
#   train the grown model (efficient.yaml's shape)    -> RUNS/s3       (on round 2's kept set)
#
#   slurm/efficient_staged.sh [--dry-run] [--after JOBID] [key=value ...]
#
# Submit from the repository root, after `python -m trainer make-demo-data --out runs/demo-data`.
# Every grown stage carries the source run's method state: ECL's kept set and round count (the
# grown config's data.manifest; every stage reads all of the shards, as a kept set covers only
# the shards it scored), ECLIPSE's teacher (PSD's soft targets come from it) grown with the
# student's operator, EViT's drop layers moved with their layers, and the methods' schedules,
# which span the three stages (stage 1 sets growth.schedule_steps to the sum of STEPS); the
# learning rate warms up again in each stage. key=value arguments go to stage 1; the grown stages
# train the grown config.yaml (stage 1's config with the grown shape), so they inherit them.
# --dry-run and --after go to slurm/pipeline.sh (print the sbatch commands / wait for a job
# first). scripts/efficient_staged.sh runs the same stages without SLURM (3 to 5 minutes a stage
# with 2 ranks on 2 CPU cores and the default STEPS).
# Resubmitting the same command is safe: finished stages exit at once (a train stage resumes at
# its max_steps and only re-evaluates; a grow stage is a no-op), unfinished ones continue.
#
# Knobs (environment):
#   DEMO_DATA      the demo data set (default runs/demo-data)
#   RUNS           where the stages write (default runs/efficient-staged; logs in RUNS/logs)
#   NODES          nodes per training stage (default 2), one task each
#   CPUS           --cpus-per-task of every stage (default 2)
#   STEPS          max_steps of the three training stages (default "120 100 80")
#   PIM_BETA       grow's --pim-beta (default 0.9, GrowCLIP's PIM; 1 = exact inheritance)
set -u

die() { echo "efficient_staged.sh: error: $*" >&2; exit 2; }

opts=()
extra=()
dry=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry=1; opts+=("$1"); shift ;;
        --after) [ $# -ge 2 ] || die "--after needs a job id"; opts+=("$1" "$2"); shift 2 ;;
        --after=*) opts+=("$1"); shift ;;
        -h|--help) sed -n '2,/^set -u/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2 ;;
        *=*) extra+=("$1"); shift ;;
        *) die "unknown argument '$1' (usage: slurm/efficient_staged.sh [--dry-run] [--after JOBID] [key=value ...])" ;;
    esac
done

cd "$(dirname "$0")/.." || die "cannot cd to the repository root"
DATA=${DEMO_DATA:-runs/demo-data}
RUNS=${RUNS:-runs/efficient-staged}
NODES=${NODES:-2}
CPUS=${CPUS:-2}
PIM_BETA=${PIM_BETA:-0.9}
read -r -a STEPS <<< "${STEPS:-120 100 80}"
[ ${#STEPS[@]} -eq 3 ] || die "STEPS must be three numbers (one per training stage), got '${STEPS[*]}'"
for s in "${STEPS[@]}"; do
    case "$s" in ''|*[!0-9]*|0) die "STEPS must be positive integers, got '${STEPS[*]}'" ;; esac
done
[ "$dry" = 1 ] || [ -f "$DATA/manifest.json" ] \
    || die "no demo data in $DATA: run \`python -m trainer make-demo-data --out $DATA\` first (or set DEMO_DATA)"

# The stages' arguments (scripts/efficient_staged.sh spells out the same ones).
total=$(( STEPS[0] + STEPS[1] + STEPS[2] ))
small=(model.vision_layers=2 model.text_layers=2 model.vision_width=64 model.vision_heads=2
       model.text_width=64 model.text_heads=2)
deeper=(model.vision_layers=4 model.text_layers=4)
wider=(model.vision_width=128 model.vision_heads=4 model.text_width=128 model.text_heads=4)
data=(data.train_shards="$DATA/train" data.val_shards="$DATA/val" tokenizer.path="$DATA/tokenizer"
      eval.zeroshot="$DATA/zeroshot.json" text_lm.shards="$DATA/text")
# one ECL round halfway through each of the first two stages (keep 0.85 each: 72 % of the pairs
# after both), the methods' schedules over all three stages
stage() {  # k -> the key=value arguments every training stage k sets
    echo "max_steps=${STEPS[$1 - 1]}"
    echo "select.every_steps=$(( (STEPS[$1 - 1] + 1) / 2 ))"
}
mapfile -t stage1 < <(stage 1)
mapfile -t stage2 < <(stage 2)
mapfile -t stage3 < <(stage 3)
first=(select.keep=0.85 select.max_rounds=2 growth.schedule_steps="$total")

[ "$dry" = 1 ] || mkdir -p "$RUNS/logs" || die "cannot create $RUNS/logs"
common=(--output "$RUNS/logs/%x-%j.out")
train=(-N "$NODES" --ntasks-per-node 1 --gpus-per-node 0 --cpus-per-task "$CPUS" "${common[@]}")
grow=(-N 1 --cpus-per-task "$CPUS" "${common[@]}")

exec slurm/pipeline.sh "${opts[@]}" \
    -J efficient-s1 "${train[@]}" slurm/train.sbatch trainer/configs/efficient.yaml output_dir="$RUNS/s1" \
        "${data[@]}" "${small[@]}" "${first[@]}" "${stage1[@]}" "${extra[@]}" :: \
    -J efficient-grow1 "${grow[@]}" slurm/run.sbatch python -m trainer grow --checkpoint "$RUNS/s1" \
        --out "$RUNS/s1-grown" --pim-beta "$PIM_BETA" "${deeper[@]}" :: \
    -J efficient-s2 "${train[@]}" slurm/train.sbatch "$RUNS/s1-grown/config.yaml" output_dir="$RUNS/s2" \
        "${stage2[@]}" :: \
    -J efficient-grow2 "${grow[@]}" slurm/run.sbatch python -m trainer grow --checkpoint "$RUNS/s2" \
        --out "$RUNS/s2-grown" --pim-beta "$PIM_BETA" "${wider[@]}" :: \
    -J efficient-s3 "${train[@]}" slurm/train.sbatch "$RUNS/s2-grown/config.yaml" output_dir="$RUNS/s3" \
        "${stage3[@]}"
