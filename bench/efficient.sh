#!/usr/bin/env bash
# All four methods vs plain CLIP at equal training FLOPs on the 30 %-noise demo data, 3 seeds
# (bench/sweeps/efficient.yaml). The budget is plain CLIP's 260 steps on 2 ranks of the demo
# config: python -c prints it from the trainer's own analytic count.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-runs/demo-data-noise30}
OUT=${OUT:-bench/results/sweep-efficient}
MULT=${MULT:-1}     # 4: the 4x budget
[ -d "$DATA" ] || $PY -m trainer make-demo-data --out "$DATA" --noise-rate 0.3
ARGS=(data.train_shards=$DATA/train data.val_shards=$DATA/val tokenizer.path=$DATA/tokenizer
      eval.zeroshot=$DATA/zeroshot.json text_lm.shards=$DATA/text eval.every_steps=50 log.progress=false)
BUDGET=$($PY - "${ARGS[@]}" 2>/dev/null <<PYEOF | tail -1
import sys
from trainer.config import load_config
from trainer.methods import train_flops
cfg = load_config("trainer/configs/demo.yaml", [a for a in sys.argv[1:] if not a.startswith("text_lm.")])
print(f"{$MULT * train_flops(cfg, cfg.max_steps, 2):.6g}")
PYEOF
)
echo "budget: $BUDGET training FLOPs (plain CLIP, demo config, $((260 * MULT)) steps x 2 ranks)"
$PY -m trainer sweep --config trainer/configs/efficient.yaml --variants bench/sweeps/efficient.yaml \
    --out "$OUT" --nproc 2 --budget-flops "$BUDGET" "${ARGS[@]}"
