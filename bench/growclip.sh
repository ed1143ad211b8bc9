#!/bin/bash
# GrowCLIP's evidence on the noisy demo data: the large model from scratch, the small
# model alone and the grown schedule (small -> grown), with and without PIM and shared layers, at
# equal training FLOPs, 2 seeds each; then the FLOP report.
#
#   python -m trainer make-demo-data --out runs/demo-data-noise30 --noise-rate 0.3
#   bash bench/growclip.sh          # re-running skips whatever is finished
#
# Writes bench/results/sweep-growclip (stage 1 and the controls), .../grown (the surgery; the
# weights are not committed), bench/results/sweep-growclip-stage2 and bench/results/growclip_flops.md.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${DATA:-runs/demo-data-noise30}
PY=${PYTHON:-.venv/bin/python}
OUT=bench/results/sweep-growclip
common=(data.train_shards=$D/train data.val_shards=$D/val tokenizer.path=$D/tokenizer
        eval.zeroshot=$D/zeroshot.json eval.every_steps=50 log.progress=false)
$PY -m trainer sweep --config trainer/configs/demo.yaml --variants bench/sweeps/growclip.yaml --out $OUT \
    --nproc 2 "${common[@]}"
deeper=(model.vision_layers=8 model.text_layers=8)
for seed in 0 1; do
    src=$OUT/runs/small-s1/seed$seed
    $PY -m trainer grow --checkpoint $src --out $OUT/grown/pim0.9/seed$seed "${deeper[@]}" --pim-beta 0.9 > /dev/null
    $PY -m trainer grow --checkpoint $src --out $OUT/grown/exact/seed$seed "${deeper[@]}" --pim-beta 1 > /dev/null
    $PY -m trainer grow --checkpoint $src --out $OUT/grown/shared/seed$seed "${deeper[@]}" model.shared_layers=4 \
        --pim-beta 0.9 > /dev/null
done
$PY -m trainer sweep --config trainer/configs/demo.yaml --variants bench/sweeps/growclip-stage2.yaml \
    --out $OUT-stage2 --nproc 2 "${common[@]}"
$PY -m trainer bench growth --stage1 $OUT --stage2 $OUT-stage2 --out bench/results/growclip_flops.md
