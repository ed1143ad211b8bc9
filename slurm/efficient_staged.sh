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

NAME=efficient_staged.sh
USAGE="slurm/efficient_staged.sh [--dry-run] [--after JOBID] [key=value ...]"
source "$(dirname "$0")/stages.sh" || exit 2
parse_args --slurm --extra -- "$@"

cd "$(dirname "$0")/.." || die "cannot cd to the repository root"
DATA=${DEMO_DATA:-runs/demo-data}
RUNS=${RUNS:-runs/efficient-staged}
NODES=${NODES:-2}
CPUS=${CPUS:-2}
PIM_BETA=${PIM_BETA:-0.9}
read_steps "120 100 80"
[ "$dry" = 1 ] || [ -f "$DATA/manifest.json" ] || no_demo_data
efficient_stages   # stages.sh: the same stages as scripts/efficient_staged.sh

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
