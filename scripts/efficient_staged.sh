#!/bin/bash
# All four methods (trainer/configs/efficient.yaml) in a staged run with GrowCLIP between the
# stages, on this machine (torchrun, no SLURM; the SLURM form is slurm/efficient_staged.sh, with the
# same stages):
#
#   train 2+2 layers, width 64 (heads 2), all four   -> RUNS/s1       (ECL round 1 halfway)
#   grow depth 2 -> 4                                 -> RUNS/s1-grown
#   train the grown model, all four                   -> RUNS/s2       (ECL round 2 halfway)
#   grow width 64 -> 128 (heads 2 -> 4)               -> RUNS/s2-grown
#   train the grown model (efficient.yaml's shape)    -> RUNS/s3       (on round 2's kept set)
#
#   scripts/efficient_staged.sh [--dry-run] [key=value ...]
#
# Every grown stage carries the source run's method state (docs/methods.md, "Staged: growing the
# all-four model"): ECL's kept set and round count (the grown config's data.manifest), ECLIPSE's
# teacher (which is PSD's) grown with the student's operator, EViT's drop layers moved with their
# layers, and the methods' schedules, which span the whole pipeline (stage 1 sets
# growth.schedule_steps to the sum of STEPS). key=value arguments go to stage 1; the grown stages
# train the grown config.yaml, which is stage 1's config with the grown shape, so they inherit them.
# Rerunning is safe: a finished training stage is skipped (its eval.json is at its max_steps), a
# finished grow stage is a no-op (grow: "already holds this growth"), an unfinished stage resumes.
# --dry-run prints the commands instead of running them. With the default STEPS each stage takes
# 3 to 5 minutes on 2 shared CPU cores (bench/results/efficient_staged_cpu_2026-12-07.md).
#
# Knobs (environment):
#   DEMO_DATA   the demo data set (default runs/demo-data; `python -m trainer make-demo-data --out DIR`)
#   RUNS        where the stages write (default runs/efficient-staged)
#   NPROC       ranks per training stage (default 2)
#   STEPS       max_steps of the three training stages (default "120 100 80")
#   PIM_BETA    grow's --pim-beta (default 0.9; 1 = exact inheritance)
#   PY          the interpreter (default .venv/bin/python)
set -u

NAME=efficient_staged.sh
USAGE="scripts/efficient_staged.sh [--dry-run] [key=value ...]"
source "$(dirname "$0")/../slurm/stages.sh" || exit 2
parse_args --extra -- "$@"

cd "$(dirname "$0")/.." || die "cannot cd to the repository root"
DATA=${DEMO_DATA:-runs/demo-data}
RUNS=${RUNS:-runs/efficient-staged}
NPROC=${NPROC:-2}
PY=${PY:-.venv/bin/python}
PIM_BETA=${PIM_BETA:-0.9}
read_steps "120 100 80"
[ "$dry" = 1 ] || [ -f "$DATA/manifest.json" ] || no_demo_data
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false

efficient_stages   # slurm/stages.sh: the same stages as slurm/efficient_staged.sh

run() {  # print (--dry-run) or run a command; a failure ends the script with its status
    if [ "$dry" = 1 ]; then
        printf '%q ' "$@"
        echo
        return
    fi
    echo "== $*" >&2
    "$@" || { rc=$?; echo "efficient_staged.sh: error: stage failed with status $rc: $*" >&2; exit "$rc"; }
}

trained() {  # run-dir steps -> whether the stage finished (its last evaluation is at max_steps)
    [ -f "$1/eval.json" ] && "$PY" -c 'import json, sys; sys.exit(json.load(open(sys.argv[1]))["step"] != int(sys.argv[2]))' \
        "$1/eval.json" "$2" 2>/dev/null
}

train() {  # run-dir steps config key=value...
    local dir=$1 steps=$2
    shift 2
    if [ "$dry" = 0 ] && trained "$dir" "$steps"; then
        echo "== $dir: finished at step $steps, skipped" >&2
        return
    fi
    run "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m trainer train --config "$@"
}

grow() {  # source-dir out-dir model.key=value...
    # no skip here: grow itself does nothing when out holds this growth (the same source
    # checkpoint and request), and exits 2 when it holds another (e.g. after a longer stage)
    local src=$1 out=$2
    shift 2
    run "$PY" -m trainer grow --checkpoint "$src" --out "$out" --pim-beta "$PIM_BETA" "$@"
}

train "$RUNS/s1" "${STEPS[0]}" trainer/configs/efficient.yaml output_dir="$RUNS/s1" "${data[@]}" "${small[@]}" \
    "${first[@]}" "${stage1[@]}" "${extra[@]}"
grow "$RUNS/s1" "$RUNS/s1-grown" "${deeper[@]}"
train "$RUNS/s2" "${STEPS[1]}" "$RUNS/s1-grown/config.yaml" output_dir="$RUNS/s2" "${stage2[@]}"
grow "$RUNS/s2" "$RUNS/s2-grown" "${wider[@]}"
train "$RUNS/s3" "${STEPS[2]}" "$RUNS/s2-grown/config.yaml" output_dir="$RUNS/s3" "${stage3[@]}"
[ "$dry" = 1 ] || echo "== done: $RUNS/s3 (eval.json, metrics.jsonl, checkpoints/)" >&2
