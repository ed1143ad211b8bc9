#!/bin/bash
# Submit a chain of SLURM jobs, each starting only after the previous one succeeded.
#
#   slurm/pipeline.sh [--after JOBID] [--dry-run] STAGE [:: STAGE ...]
#
# Each STAGE is what you would pass to sbatch (options, then the script and its arguments);
# stages are separated by a lone `::`. Every stage after the first is submitted with
# `--dependency=afterok:<previous job> --kill-on-invalid-dep=yes`: it starts only when the previous
# job completed with status 0 (a job that requeues itself, e.g. train.sbatch after a preemption
# signal, is not complete until its last run finishes), and is cancelled if the previous one fails.
# A stage that is a job array waits for all of its tasks.
#
# Prints the job ids, one per line, in order (stage descriptions go to stderr).
# If a submission fails, the stages already submitted are cancelled.
#
# Example: train -> eval -> train on (the third stage resumes from the run's latest checkpoint)
#   slurm/pipeline.sh \
#     -N 2 slurm/train.sbatch trainer/configs/demo.yaml output_dir=runs/p1 max_steps=2000 :: \
#     -N 1 slurm/run.sbatch python -m trainer eval --checkpoint runs/p1 --out runs/p1/eval-2000.json :: \
#     -N 2 slurm/train.sbatch trainer/configs/demo.yaml output_dir=runs/p1 max_steps=4000
# Model growth (train -> grow -> train, a `python -m trainer grow` stage by slurm/run.sbatch in the
# middle): "Model growth as stages" in slurm/README.md, and slurm/growclip_demo.sh on the demo data.
#
# Options:
#   --after JOBID  the first stage also waits for JOBID (append a pipeline to a running job)
#   --dry-run      print the sbatch commands instead of submitting them
set -u

prog=$(basename "$0")
usage() { sed -n '2,/^set -u/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2; }

after=
dry=0
while [ $# -gt 0 ]; do
    case "$1" in
        --after) [ $# -ge 2 ] || usage; after=$2; shift 2 ;;
        --after=*) after=${1#--after=}; shift ;;
        --dry-run) dry=1; shift ;;
        -h|--help) usage ;;
        *) break ;;
    esac
done
[ $# -gt 0 ] || usage

SBATCH=${SBATCH:-sbatch}
submitted=()
stage=()
n=0

cancel_submitted() {
    if [ ${#submitted[@]} -gt 0 ] && [ "$dry" = 0 ]; then
        echo "$prog: cancelling the stages already submitted: ${submitted[*]}" >&2
        scancel "${submitted[@]}" || true
    fi
}

submit_stage() {
    n=$((n + 1))
    if [ ${#stage[@]} -eq 0 ]; then
        echo "$prog: error: stage $n is empty" >&2
        cancel_submitted
        exit 2
    fi
    local dep=()
    if [ -n "$after" ]; then
        dep=(--dependency="afterok:$after" --kill-on-invalid-dep=yes)
    fi
    if [ "$dry" = 1 ]; then
        printf '%q ' "$SBATCH" --parsable "${dep[@]}" "${stage[@]}"
        echo
        after="STAGE$n"
        return
    fi
    local out id
    if ! out=$("$SBATCH" --parsable "${dep[@]}" "${stage[@]}"); then
        echo "$prog: error: sbatch failed for stage $n: ${stage[*]}" >&2
        cancel_submitted
        exit 1
    fi
    id=${out%%;*}
    case "$id" in
        ''|*[!0-9]*) echo "$prog: error: unexpected sbatch output for stage $n: $out" >&2; cancel_submitted; exit 1 ;;
    esac
    submitted+=("$id")
    echo "$prog: stage $n: job $id${after:+ (after $after)}: ${stage[*]}" >&2
    echo "$id"
    after=$id
}

for arg in "$@"; do
    if [ "$arg" = "::" ]; then
        submit_stage
        stage=()
    else
        stage+=("$arg")
    fi
done
submit_stage
