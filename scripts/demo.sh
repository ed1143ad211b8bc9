#!/usr/bin/env bash
# `make demo`: synthetic data -> 2-rank training (all GPUs when there are GPUs) -> eval -> summary.
# Usage: scripts/demo.sh [DATA_DIR] [RUN_DIR] [NPROC]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-runs/demo-data}
OUT=${2:-runs/demo}
NPROC=${3:-2}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false

# make-demo-data writes manifest.json last: its presence means a complete data set.
if [ ! -f "$DATA/manifest.json" ]; then
  echo "== making the demo data set in $DATA"
  $PY -m trainer make-demo-data --out "$DATA" --num-train 10000 --num-val 1000 --noise-rate 0.0 >/dev/null
fi

EXTRA=()
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -gt 0 ]; then NPROC=$GPUS; EXTRA+=(deepspeed.precision=bf16); fi

echo "== training on $NPROC ranks (a fresh run in $OUT)"
rm -rf "$OUT"
start=$(date +%s)
$PY -m torch.distributed.run --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29533}" -m trainer train \
  --config trainer/configs/demo.yaml output_dir="$OUT" \
  data.train_shards="$DATA/train" data.val_shards="$DATA/val" tokenizer.path="$DATA/tokenizer" \
  eval.zeroshot="$DATA/zeroshot.json" "${EXTRA[@]}"
secs=$(( $(date +%s) - start ))

$PY - "$OUT" "$secs" <<'PY'
import json, sys
from pathlib import Path
import yaml
out, secs = Path(sys.argv[1]), int(sys.argv[2])
ev = json.loads((out / "eval.json").read_text())
metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
cfg = yaml.safe_load((out / "config.yaml").read_text())
chance = 1 / len(json.loads(Path(cfg["eval"]["zeroshot"]).read_text())["classnames"])
sps = sorted(m["samples_per_s"] for m in metrics)[len(metrics) // 2]
print(f"""
== demo summary ({secs} s of training + eval)
zero-shot top-1    {ev['zeroshot_top1']:.3f}  ({ev['zeroshot_top1'] / chance:.1f}x chance of {chance:.3f}; top-5 {ev['zeroshot_top5']:.3f})
retrieval R@1      image->text {ev['i2t_r1']:.3f}   text->image {ev['t2i_r1']:.3f}   (R@5 {ev['i2t_r5']:.3f} / {ev['t2i_r5']:.3f}, {ev['num_samples']} pairs)
samples/s          {sps:.0f} (median over logged steps, global batch)
final loss         {metrics[-1]['loss']:.3f} at step {metrics[-1]['step']}
TensorBoard        tensorboard --logdir {out / 'tensorboard'}
checkpoints        {out / 'checkpoints'} (latest: {(out / 'checkpoints' / 'latest').read_text().strip()})
export             .venv/bin/python -m trainer export-hf --checkpoint {out / 'checkpoints'} --out {out / 'hf'}""")
PY
