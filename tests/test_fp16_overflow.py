"""fp16 loss-scale overflows are DeepSpeed's loss scaling at work, not faults.

DeepSpeed's dynamic loss scaling starts high and halves the scale at each overflow. The trainer
used to count every micro-batch of an overflowed step as bad, so an fp16 run with
``grad_accum_steps = 5`` stopped (exit 1) at its first overflow. tests/fp16_probe.py runs the
trainer's ``train_step`` through DeepSpeed's real ZeRO fp16 optimizers on CPU (see its doc) with
the scale started at 2^18 (2^20 for the floor case), above what these gradients fit in fp16.

ZeRO-0 is not covered: DeepSpeed 0.19.8's ``engine.backward`` scales the loss only for its ZeRO
optimizers, so its stage-0 fp16 optimizer never sees a scaled gradient overflow (it divides
unscaled gradients by the scale instead; AdamW hides most of that).
"""
import json
import sys

import pytest

from conftest import ROOT, run_child, trainer_env


def _probe(tmp_path, demo_data, stage: int, scale_power: int, min_scale: float, steps: int) -> dict:
    out = tmp_path / f"fp16-{stage}-{min_scale}.json"
    cmd = [sys.executable, str(ROOT / "tests" / "fp16_probe.py"), str(out), str(stage), str(scale_power),
           str(min_scale), str(steps), f"output_dir={tmp_path / 'run'}", f"data.train_shards={demo_data}/train",
           "data.val_shards=", f"tokenizer.path={demo_data}/tokenizer", "eval.zeroshot=", "data.batch_size=8",
           "train.grad_accum_steps=5", "train.max_bad_microbatches=5", "data.workers=0"]
    proc = run_child(cmd, timeout=600, cwd=ROOT, env=trainer_env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("stage", [1, pytest.param(3, marks=pytest.mark.full)])
def test_overflows_above_the_floor_lower_the_scale_and_are_not_faults(stage, demo_data, tmp_path):
    r = _probe(tmp_path, demo_data, stage, scale_power=18, min_scale=1, steps=2)
    assert r["stopped"] is None and r["bad_total"] == 0
    rows = r["rows"]
    assert [x["step"] for x in rows] == [1, 2]
    # DeepSpeed halved the scale once per overflow (hysteresis 1), and the trainer counted each one
    assert r["fp16_overflows"] >= 1
    assert rows[0]["scale_before"] == 2.0 ** 18
    assert rows[-1]["scale_after"] == 2.0 ** (18 - r["fp16_overflows"])
    # every step the trainer counts applied an update (overflowed attempts were started over)
    assert all(x["moved"] > 0 for x in rows)
    assert all(x["loss"] == x["loss"] and 0 < x["loss"] < 20 for x in rows)


@pytest.mark.full
def test_an_overflow_at_the_scale_floor_is_a_fault(demo_data, tmp_path):
    """With the floor at the starting scale the gradients are non-finite at every scale DeepSpeed
    may use: a real fault, counted per micro-batch; five in a row stop the run (exit 1 in ``train``)."""
    r = _probe(tmp_path, demo_data, 1, scale_power=20, min_scale=2.0 ** 20, steps=2)
    assert r["stopped"] == "5" and r["bad_total"] == 5 and r["fp16_overflows"] == 0 and r["rows"] == []
