#!/bin/bash
# GrowCLIP's evidence with the shape the search picks (deeper-text: 4 + 6 layers; see
# bench/growclip_search.sh and bench/results/growclip_search.md): small-s1 (130 steps of the tiny
# model, the same runs as bench/results/sweep-growclip's) -> grow text 4 -> 6 layers -> train to
# the rest of the 260-step baseline's training FLOPs (sweep --budget-flops), 2 seeds.
#
#   python -m trainer make-demo-data --out runs/demo-data-noise30 --noise-rate 0.3
#   bash bench/growclip_searched.sh        # re-running skips whatever is finished
#
# Writes runs/growclip-searched/ (stage 1 and the grown weights; not committed) and
# bench/results/sweep-growclip-searched.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${DATA:-runs/demo-data-noise30}
PY=${PYTHON:-.venv/bin/python}
OUT=runs/growclip-searched
common=(data.train_shards=$D/train data.val_shards=$D/val tokenizer.path=$D/tokenizer
        eval.zeroshot=$D/zeroshot.json eval.every_steps=50 log.progress=false)
mkdir -p $OUT
printf 'seeds: [0, 1]\nsmall-s1: {max_steps: 130}\n' > $OUT/stage1.yaml
$PY -m trainer sweep --config trainer/configs/demo.yaml --variants $OUT/stage1.yaml --out $OUT/stage1 \
    --nproc 2 "${common[@]}"
for seed in 0 1; do
    src=$OUT/stage1/runs/small-s1/seed$seed
    [ -f $OUT/grown/pim0.9/seed$seed/grow.json ] || \
        $PY -m trainer grow --checkpoint $src --out $OUT/grown/pim0.9/seed$seed model.text_layers=6 --pim-beta 0.9 > /dev/null
    [ -f $OUT/grown/exact/seed$seed/grow.json ] || \
        $PY -m trainer grow --checkpoint $src --out $OUT/grown/exact/seed$seed model.text_layers=6 --pim-beta 1 > /dev/null
done
BUDGET=$($PY - "${common[@]}" 2>/dev/null <<'PYEOF' | tail -1
import sys
from trainer.config import load_config
from trainer.methods import train_flops
cfg = load_config("trainer/configs/demo.yaml", sys.argv[1:])
print(f"{train_flops(cfg, 130, 2):.8g}")   # the baseline's 260 small steps minus stage 1's 130
PYEOF
)
$PY -m trainer sweep --config trainer/configs/demo.yaml --variants bench/sweeps/growclip-searched.yaml \
    --out bench/results/sweep-growclip-searched --nproc 2 --budget-flops "$BUDGET" "${common[@]}"
