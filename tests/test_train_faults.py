"""Faults during training through the real CLI: non-finite losses and corrupt data."""
from __future__ import annotations

import math
import shutil

import pytest

from conftest import check, data_overrides, read_metrics, run_trainer

FAST = ["model.context_length=24", "data.batch_size=16", "data.workers=1", "data.shuffle_buffer=64",
        "optim.warmup_steps=2", "log.every_steps=1", "log.progress=false", "eval.batch_size=48",
        "checkpoint.every_steps=100"]


def nan_run(demo_data, out, *extra):
    return run_trainer(["train", "--config", "trainer/configs/demo.yaml", *data_overrides(demo_data, out),
                        *FAST, "max_steps=5", "debug.inject_nan_steps=[3]", "data.workers=0", *extra], nproc=2)


@pytest.fixture(scope="module")
def nan_in_loss(demo_data, tmp_path_factory):
    """2 ranks, ZeRO-1: rank 0's loss is NaN at step 3 (the reference for where else a NaN arises)."""
    out = tmp_path_factory.mktemp("nan-loss")
    return out, check(nan_run(demo_data, out))


def test_non_finite_loss_on_one_rank_is_skipped_by_all_and_counted(nan_in_loss):
    out, text = nan_in_loss
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]  # step 3 was retried with the next micro-batch
    assert [m["bad_microbatches"] for m in metrics] == [0, 0, 1, 1, 1]
    assert all(math.isfinite(m["loss"]) for m in metrics)  # no NaN (nor an infinity) reached the metrics
    assert "step 3: non-finite loss, micro-batch dropped (1 in a row)" in text


@pytest.mark.parametrize("where, stage", [("forward", 1), pytest.param("grad", 1, marks=pytest.mark.full), pytest.param("grad", 3, marks=pytest.mark.full),
                                         ("grad", 0)])
def test_nan_in_the_forward_or_only_in_the_gradients_is_dropped_like_a_nan_loss(nan_in_loss, demo_data, tmp_path,
                                                                              where, stage):
    """A NaN that arises inside rank 0's vision tower, or a finite loss whose gradients are NaN on
    rank 0 only: every rank drops the micro-batch, no weight or optimizer moment moves, and the run
    continues exactly as when the loss itself was NaN. DeepSpeed checks gradients itself only for
    some stages (ZeRO-1/2 here); ZeRO-3 and stage 0 in fp32 rely on the trainer's guard."""
    out = tmp_path / f"{where}-{stage}"
    text = check(nan_run(demo_data, out, f"debug.inject_nan_where={where}", f"deepspeed.zero_stage={stage}"))
    got, want = read_metrics(out), read_metrics(nan_in_loss[0])
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5]
    assert [m["bad_microbatches"] for m in got] == [0, 0, 1, 1, 1]
    assert all(math.isfinite(m["loss"]) for m in got)
    assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in want], rel=2e-4)
    if where == "grad":
        assert "step 3: non-finite gradients, update skipped and its 1 micro-batch(es) dropped" in text
    else:
        assert "step 3: non-finite loss, micro-batch dropped" in text


def test_renamed_key_is_a_clear_error(demo_data, tmp_path):
    proc = run_trainer(["train", "--config", "trainer/configs/demo.yaml", *data_overrides(demo_data, tmp_path / "r"),
                        "train.max_bad_steps=3"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "config key 'train.max_bad_steps' was renamed to train.max_bad_microbatches" in proc.stderr


def test_too_many_consecutive_bad_microbatches_stop_the_run_with_a_message(demo_data, tmp_path):
    proc = run_trainer(["train", "--config", "trainer/configs/demo.yaml", *data_overrides(demo_data, tmp_path / "s"),
                        *FAST, "max_steps=8", "debug.inject_nan_steps=[2]", "train.max_bad_microbatches=1",
                        "data.workers=0"], nproc=1)
    assert proc.returncode == 1
    assert ("stopping: 1 consecutive micro-batches dropped for a non-finite loss or gradient "
            "(train.max_bad_microbatches=1)") in proc.stderr
    assert [m["step"] for m in read_metrics(tmp_path / "s")] == [1]


def test_corrupt_shard_is_skipped_and_counted_in_metrics(demo_data, tmp_path):
    train = tmp_path / "train"
    shutil.copytree(demo_data / "train", train)
    for i in (1, 2):  # 4 of the 6 shards go bad (the resampler draws them early): garbage ...
        (train / f"train-00000{i}.tar").write_bytes(b"\x17not a tar" * 500)
    for i in (3, 4):  # ... and empty (zero blocks are a valid, empty tar)
        (train / f"train-00000{i}.tar").write_bytes(b"\x00" * 10240)
    out = tmp_path / "run"
    check(run_trainer(["train", "--config", "trainer/configs/demo.yaml", *data_overrides(demo_data, out), *FAST,
                       f"data.train_shards={train}", "max_steps=12", "data.shuffle_buffer=16"], nproc=1))
    metrics = read_metrics(out)
    assert len(metrics) == 12 and metrics[-1]["data/skipped"] >= 1
    assert all(a["data/skipped"] <= b["data/skipped"] for a, b in zip(metrics, metrics[1:]))


def test_an_exception_on_one_rank_ends_the_job_instead_of_hanging(demo_data, tmp_path):
    """Rank 0 raises mid-run with loader workers alive. The workers ignore SIGTERM (so SLURM's
    signal leaves them running while the rank checkpoints); multiprocessing's exit handler used
    to SIGTERM-and-join them forever, so the failed rank never exited and the job hung."""
    proc = run_trainer(["train", "--config", "trainer/configs/demo.yaml", *data_overrides(demo_data, tmp_path / "r"),
                        *FAST, "max_steps=6", "debug.raise_at_step=2"], nproc=2, timeout=180)
    assert proc.returncode != 0
    assert "debug.raise_at_step: injected failure after step 2" in proc.stderr
    assert [m["step"] for m in read_metrics(tmp_path / "r")] == [1]   # raised before step 2 was logged


def test_non_finite_flags_any_nan_or_infinity_and_no_large_finite_value():
    """The arithmetic of the gradient check: any NaN, +inf or -inf element (also +inf and -inf
    together, which cancel to NaN in a plain sum) sets the flag; large finite fp16 gradients, whose
    fp16 sum and L1 norm overflow, do not (the norms accumulate in float32)."""
    import torch

    from trainer.faults import non_finite

    def flag(*tensors) -> float:
        return float(non_finite(list(tensors), "cpu"))

    finite = torch.randn(5, 3)
    assert flag(finite, torch.randn(4)) == 0.0 and flag() == 0.0
    for bad in (float("nan"), float("inf"), float("-inf")):
        g = torch.randn(4)
        g[2] = bad
        assert flag(finite, g) == 1.0, bad
        assert flag(finite, g.bfloat16()) == 1.0, bad
    assert flag(torch.tensor([float("inf"), float("-inf"), 1.0])) == 1.0
    big = torch.full((64,), 60000.0, dtype=torch.float16)        # finite; its fp16 sum is not
    assert torch.isinf(big.sum()) and flag(big, finite) == 0.0


def test_grad_guard_checks_deepspeeds_reduced_partitions_at_every_stage(tmp_path):
    """2 ranks, accumulation 2, ZeRO 0-3 in fp32 and bf16 (tests/grad_guard_probe.py): rank 1
    alone writes a NaN into one gradient element of its second micro-batch. GradGuard, reading
    DeepSpeed's reduced buffers once at the boundary, flags that step exactly when the independent
    reference (every full gradient via DeepSpeed's safe_get_full_grad, element by element) does.
    Under ZeRO 1-3 only rank 0, whose partition holds the element, sees it locally, which is why
    the ranks agree in an all-reduce; the skipped step leaves the weights finite and the next clean
    step unflagged (no NaN left behind in a flat buffer). ZeRO-3 checks one flat buffer, ZeRO-1/2
    one per parameter group."""
    import json

    from conftest import ROOT, run_child, torchrun, trainer_env

    out = tmp_path / "guard.json"
    proc = run_child([*torchrun(2), str(ROOT / "tests" / "grad_guard_probe.py"), str(out),
                      str(ROOT / "trainer" / "configs" / "demo.yaml")], timeout=300, cwd=ROOT, env=trainer_env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    rows = json.loads(out.read_text())
    assert {(r["stage"], r["precision"]) for r in rows} == {(0, "fp32"), (0, "bf16"), (1, "bf16"), (2, "fp32"),
                                                         (2, "bf16"), (3, "fp32"), (3, "bf16")}
    for r in rows:
        case = (r["stage"], r["precision"], r["step"])
        assert r["agreed"] == r["reference"] == (1.0 if r["step"] == 1 else 0.0), case
        assert r["weight_finite"], case
        poisoned = r["step"] == 1
        assert r["local"] == ([1.0, 1.0] if poisoned and r["stage"] == 0 else [1.0, 0.0] if poisoned
                              else [0.0, 0.0]), case
        assert r["tensors"] == {0: 4, 1: 2, 2: 2, 3: 1}[r["stage"]], case
