"""The weights a teacher's forward uses equal the closed-form teacher at every step, under ZeRO-1
and ZeRO-3, with no checkpoint in between (a save re-gathers parameters and hides a stale copy).

ZeRO-3 keeps small parameters (most of the tiny preset) gathered between forwards and re-gathers
them only at the end of its own optimizer step; an EMA written after that step used to reach those
copies one step late (ECLIPSE's teacher lagged by a step; PSD's ``previous`` teacher ran its old
snapshot for one step after every refresh: errors of 1e-4 here). tests/teacher_probe.py reads
what the teacher's submodules compute with, through forward pre-hooks, against the EMA of the
student's full fp32 masters (DeepSpeed's ``safe_get_full_fp32_param``), kept in float64.
"""
import json
import sys

import pytest

from conftest import ROOT, run_child, trainer_env

CASES = {
    "eclipse-zero3": ("trainer/configs/eclipse.yaml", ["deepspeed.zero_stage=3", "eclipse.momentum=0.5"]),
    "eclipse-zero1": ("trainer/configs/eclipse.yaml", ["deepspeed.zero_stage=1", "eclipse.momentum=0.5"]),
    "psd-previous-zero3": ("trainer/configs/psd.yaml", ["deepspeed.zero_stage=3", "psd.teacher=previous",
                                                        "psd.refresh_every=2"]),
    "psd-momentum-zero3": ("trainer/configs/psd.yaml", ["deepspeed.zero_stage=3", "psd.teacher=momentum",
                                                        "psd.momentum=0.5"]),
}


FULL = {"eclipse-zero1", "psd-momentum-zero3", "psd-previous-zero3"}   # fast tier: ECLIPSE under ZeRO-3


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.full) if c in FULL else c for c in CASES])
def test_teacher_forward_uses_this_steps_teacher(case, demo_data, tmp_path):
    config, extra = CASES[case]
    out = tmp_path / "probe.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "teacher_probe.py"), str(out), config, f"output_dir={tmp_path / 'run'}",
           f"data.train_shards={demo_data}/train", "data.val_shards=", f"tokenizer.path={demo_data}/tokenizer",
           "eval.zeroshot=", "max_steps=5", "data.workers=0", *extra]
    proc = run_child(cmd, timeout=600, cwd=ROOT, env=trainer_env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    rows = json.loads(out.read_text())
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["params_seen"] == r["params"] > 0 for r in rows)   # every teacher weight was read
    # fp32 training: only the EMA's own rounding (fp32 in the trainer, float64 here) is left
    assert max(r["max_abs"] for r in rows) < 1e-6, rows
