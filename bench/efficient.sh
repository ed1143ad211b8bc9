#!/usr/bin/env bash
# All four methods vs plain CLIP at equal training FLOPs, 3 seeds, in the regimes of docs/methods.md
# ("All four together"). The budget is plain CLIP's STEPS steps on 2 ranks of the demo config:
# python -c prints it from the trainer's own analytic count, and every variant trains the steps its
# own cost allows (`sweep --budget-flops`). Finished runs are skipped when run again.
#   bash bench/efficient.sh                      # (a) 30 % caption noise, 260 plain steps
#   MULT=4 OUT=bench/results/sweep-efficient-4x bash bench/efficient.sh        # (a) at 4x the budget
#   REGIME=memorise bash bench/efficient.sh      # (b) 1,000 noisy pairs for 300 plain steps (38 epochs)
#   REGIME=clean bash bench/efficient.sh         # (c) no caption noise
#   VARIANTS=bench/sweeps/efficient-ablation.yaml OUT=bench/results/sweep-efficient-ablation bash bench/efficient.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
REGIME=${REGIME:-noisy}
MULT=${MULT:-1}     # 4: the 4x budget
case "$REGIME" in
  noisy)    DATA=${DATA:-runs/demo-data-noise30}; NUM_TRAIN=10000; STEPS=260; EVERY=50; NOISE=0.3
            OUT=${OUT:-bench/results/sweep-efficient} ;;
  memorise) DATA=${DATA:-runs/demo-data-1k-noise30}; NUM_TRAIN=1000; STEPS=300; EVERY=25; NOISE=0.3
            OUT=${OUT:-bench/results/sweep-efficient-memorise} ;;
  clean)    DATA=${DATA:-runs/demo-data}; NUM_TRAIN=10000; STEPS=260; EVERY=50; NOISE=0
            OUT=${OUT:-bench/results/sweep-efficient-clean} ;;
  *) echo "error: REGIME must be noisy, memorise or clean; got $REGIME" >&2; exit 2 ;;
esac
VARIANTS=${VARIANTS:-bench/sweeps/efficient.yaml}
[ -d "$DATA" ] || $PY -m trainer make-demo-data --out "$DATA" --num-train "$NUM_TRAIN" --noise-rate "$NOISE"
ARGS=(data.train_shards=$DATA/train data.val_shards=$DATA/val tokenizer.path=$DATA/tokenizer
      eval.zeroshot=$DATA/zeroshot.json text_lm.shards=$DATA/text eval.every_steps=$EVERY log.progress=false)
[ "$NUM_TRAIN" = 10000 ] || ARGS+=(data.train_num_samples=$NUM_TRAIN)
BUDGET=$($PY - "${ARGS[@]}" 2>/dev/null <<PYEOF | tail -1
import sys
from trainer.config import load_config
from trainer.methods import train_flops
cfg = load_config("trainer/configs/demo.yaml",
                  [a for a in sys.argv[1:] if not a.startswith("text_lm.")] + ["max_steps=$STEPS"])
print(f"{$MULT * train_flops(cfg, cfg.max_steps, 2):.6g}")
PYEOF
)
echo "budget: $BUDGET training FLOPs (plain CLIP, demo config, $((STEPS * MULT)) steps x 2 ranks), regime $REGIME"
$PY -m trainer sweep --config trainer/configs/efficient.yaml --variants "$VARIANTS" \
    --out "$OUT" --nproc 2 --budget-flops "$BUDGET" "${ARGS[@]}" ${EXTRA:-}
