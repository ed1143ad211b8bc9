#!/bin/bash
# ECL's score: which confidence makes the ensemble of a run's checkpoints beat its members
# (docs/methods.md). Run from the repository root with the venv built (`make venv`):
#
#   bash bench/ecl_scores.sh            # ~10 min on 2 idle CPU cores
#
# 1. 5,000 demo pairs with 30 % caption noise;
# 2. plain CLIP, the demo config for 160 steps on 2 ranks, checkpoints at 80 and 160, recording
#    the free scores (select.free_scores=true: reads the training forward, changes no update);
# 3. `bench select --checkpoints`: every candidate score's AUROC for each checkpoint and their
#    sum, and the free scores with the last checkpoint -> bench/results/ecl_scores_cpu.{json,md}.
set -euo pipefail
PY=${PY:-.venv/bin/python}
D=${DATA:-runs/demo-noise30-5k}
W=${WORK:-runs/ecl5k-free}
export OMP_NUM_THREADS=1
[ -d "$D/train" ] || $PY -m trainer make-demo-data --out "$D" --num-train 5000 --noise-rate 0.3
[ -f "$W/eval.json" ] || $PY -m torch.distributed.run --nproc_per_node 2 -m trainer train --config trainer/configs/demo.yaml \
    output_dir="$W" max_steps=160 data.train_num_samples=5000 data.train_shards="$D/train" data.val_shards="$D/val" \
    tokenizer.path="$D/tokenizer" eval.zeroshot="$D/zeroshot.json" log.progress=false checkpoint.every_steps=80 \
    checkpoint.keep_last=2 select.free_scores=true
$PY -m trainer bench select --checkpoints "$W/checkpoints/step_80" "$W/checkpoints/step_160" --data "$D/train" \
    --work runs/ecl-scores-free --free "$W" --out bench/results/ecl_scores_cpu.json
