"""The demo training config, a few steps on 2 gloo ranks, with loss.impl=torch and with
loss.impl=triton (Triton's interpreter on CPU): the loss curves match.

fp32 so that the comparison is tight: both runs start from the same weights and see the same
batches, so step 1 agrees to fp32 roundoff and later steps only drift by what the last
optimizer updates amplify."""
from __future__ import annotations

import pytest

from conftest import check, data_overrides, read_metrics, run_trainer

CONFIG = "trainer/configs/demo.yaml"
FAST = ["model.context_length=24", "data.batch_size=16", "data.workers=0", "data.train_num_samples=192",
        "log.every_steps=1", "log.progress=false", "eval.every_steps=0", "checkpoint.every_steps=1000",
        "deepspeed.precision=fp32", "max_steps=4"]


def _curve(demo_data, out, impl: str) -> tuple[dict, str]:
    proc = run_trainer(["train", "--config", CONFIG, *data_overrides(demo_data, out), *FAST, f"loss.impl={impl}"],
                       nproc=2, TRITON_INTERPRET="1")
    text = check(proc)
    return {m["step"]: m["loss"] for m in read_metrics(out)}, text


def test_triton_loss_trains_like_torch(demo_data, tmp_path):
    torch_curve, torch_log = _curve(demo_data, tmp_path / "torch", "torch")
    triton_curve, triton_log = _curve(demo_data, tmp_path / "triton", "triton")
    # the runs really used what they asked for (kernels logs the resolved impl once per process)
    assert "impl=torch resolved to torch on cpu" in torch_log
    assert "impl=triton resolved to triton on cpu (Triton interpreter)" in triton_log
    assert sorted(torch_curve) == sorted(triton_curve) == [1, 2, 3, 4]
    assert triton_curve[1] == pytest.approx(torch_curve[1], rel=1e-6)
    for step in torch_curve:
        assert triton_curve[step] == pytest.approx(torch_curve[step], rel=1e-4), (step, torch_curve, triton_curve)
    assert torch_curve[4] < torch_curve[1]   # the curve is a training curve, not a constant
