#!/bin/bash
# GrowCLIP on the demo data, as five SLURM stages (slurm/README.md, "Model growth as stages"):
#
#   train tiny (4+4 layers, width 128)  on the first third of the shards   -> RUNS/g1
#   grow depth 4 -> 8                                                       -> RUNS/g1-grown
#   train the grown model               on the first two thirds             -> RUNS/g2
#   grow width 128 -> 256 (heads 4 -> 8)                                    -> RUNS/g2-grown
#   train the grown model               on all of the shards                -> RUNS/g3
#
#   slurm/growclip_demo.sh [--dry-run] [--after JOBID]
#
# Submit from the repository root, after `python -m trainer make-demo-data --out runs/demo-data`
# (10 shards of 1,000 pairs; the shares are the first 4, 7 and 10 of them). --dry-run and --after
# go to slurm/pipeline.sh (print the sbatch commands / wait for a job first). Sized for CPU nodes
# (gloo, one task per node, no GPUs): on 2 cores the three training stages run at 1.0, 1.7 and 4.5 s
# per step (global batch 128), about 3, 3 and 5 minutes with the default STEPS.
# Resubmitting the same command is safe: finished stages exit at once (a train stage resumes at
# its max_steps and only re-evaluates; a grow stage is a no-op), unfinished ones continue.
#
# Knobs (environment):
#   DEMO_DATA      the demo data set (default runs/demo-data)
#   RUNS           where the stages write (default runs/growclip-demo; logs in RUNS/logs)
#   NODES          nodes per training stage (default 2), one task each
#   CPUS           --cpus-per-task of every stage (default 2)
#   STEPS          max_steps of the three training stages (default "160 100 60")
#   PIM_BETA       grow's --pim-beta (default 0.9, GrowCLIP's PIM; 1 = exact inheritance)
set -u

NAME=growclip_demo.sh
USAGE="slurm/growclip_demo.sh [--dry-run] [--after JOBID]"
source "$(dirname "$0")/stages.sh" || exit 2
parse_args --slurm -- "$@"

cd "$(dirname "$0")/.." || die "cannot cd to the repository root"
DATA=${DEMO_DATA:-runs/demo-data}
RUNS=${RUNS:-runs/growclip-demo}
NODES=${NODES:-2}
CPUS=${CPUS:-2}
read_steps "160 100 60"
PIM_BETA=${PIM_BETA:-0.9}

# The shards, and the three shares: the first ceil(k/3) of them for stage k.
if [ -f "$DATA/manifest.json" ]; then
    n=$(ls "$DATA"/train/train-*.tar 2>/dev/null | wc -l)
    total=$(sed -n 's/.*"num_train": *\([0-9]*\).*/\1/p' "$DATA/manifest.json")
    [ "$n" -gt 0 ] && [ -n "$total" ] || die "$DATA/manifest.json is there but $DATA/train holds no shard"
elif [ "$dry" = 1 ]; then
    n=10 total=10000   # make-demo-data's defaults, to show the commands
else
    no_demo_data
fi
share() {  # k -> data.train_shards=... data.train_num_samples=... of the first ceil(k n / 3) shards
    local last=$(( (($1 * n + 2) / 3) - 1 ))
    printf 'data.train_shards=%s/train/train-{%06d..%06d}.tar\n' "$DATA" 0 "$last"
    echo "data.train_num_samples=$(( total * (last + 1) / n ))"
}
mapfile -t share1 < <(share 1)
mapfile -t share2 < <(share 2)
mapfile -t share3 < <(share 3)

[ "$dry" = 1 ] || mkdir -p "$RUNS/logs" || die "cannot create $RUNS/logs"
common=(--output "$RUNS/logs/%x-%j.out")
train=(-N "$NODES" --ntasks-per-node 1 --gpus-per-node 0 --cpus-per-task "$CPUS" "${common[@]}")
grow=(-N 1 --cpus-per-task "$CPUS" "${common[@]}")
data=(data.val_shards="$DATA/val" tokenizer.path="$DATA/tokenizer" eval.zeroshot="$DATA/zeroshot.json")

exec slurm/pipeline.sh "${opts[@]}" \
    -J growclip-g1 "${train[@]}" slurm/train.sbatch trainer/configs/demo.yaml output_dir="$RUNS/g1" \
        max_steps="${STEPS[0]}" "${data[@]}" "${share1[@]}" :: \
    -J growclip-grow1 "${grow[@]}" slurm/run.sbatch python -m trainer grow --checkpoint "$RUNS/g1" \
        --out "$RUNS/g1-grown" --pim-beta "$PIM_BETA" model.vision_layers=8 model.text_layers=8 :: \
    -J growclip-g2 "${train[@]}" slurm/train.sbatch "$RUNS/g1-grown/config.yaml" output_dir="$RUNS/g2" \
        max_steps="${STEPS[1]}" "${share2[@]}" :: \
    -J growclip-grow2 "${grow[@]}" slurm/run.sbatch python -m trainer grow --checkpoint "$RUNS/g2" \
        --out "$RUNS/g2-grown" --pim-beta "$PIM_BETA" model.vision_width=256 model.vision_heads=8 \
        model.text_width=256 model.text_heads=8 :: \
    -J growclip-g3 "${train[@]}" slurm/train.sbatch "$RUNS/g2-grown/config.yaml" output_dir="$RUNS/g3" \
        max_steps="${STEPS[2]}" "${share3[@]}"
