#!/bin/bash
# Which growth the search picks from GrowCLIP's stage-1 model (bench/growclip.sh, `small-s1`, seed 0:
# 130 steps of the tiny model on the noisy demo data), next to the shape the committed evidence
# grew to (8 + 8 layers). Retrains small-s1 seed 0 (its checkpoint is not committed; the same
# config as bench/results/sweep-growclip, so the same run), then `grow --search` with the default
# candidates, each trained at equal training FLOPs with its own warm-up and decay.
#
#   python -m trainer make-demo-data --out runs/demo-data-noise30 --noise-rate 0.3
#   bash bench/growclip_search.sh         # re-running skips whatever is finished
#
# Writes runs/growclip-search/ (the runs; not committed) and copies the search's table to
# bench/results/growclip_search.md and .json.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${DATA:-runs/demo-data-noise30}
PY=${PYTHON:-.venv/bin/python}
STEPS=${SEARCH_STEPS:-50}
OUT=runs/growclip-search
common=(data.train_shards=$D/train data.val_shards=$D/val tokenizer.path=$D/tokenizer
        eval.zeroshot=$D/zeroshot.json log.progress=false)
mkdir -p $OUT
printf 'seeds: [0]\nsmall-s1: {max_steps: 130}\n' > $OUT/stage1.yaml
$PY -m trainer sweep --config trainer/configs/demo.yaml --variants $OUT/stage1.yaml --out $OUT/stage1 \
    --nproc 2 "${common[@]}" eval.every_steps=50
$PY -m trainer grow --checkpoint $OUT/stage1/runs/small-s1/seed0 --out $OUT/search --search \
    --search-steps $STEPS --nproc 2 "${common[@]}" eval.every_steps=0
cp $OUT/search/search.md bench/results/growclip_search.md
cp $OUT/search/search.json bench/results/growclip_search.json
