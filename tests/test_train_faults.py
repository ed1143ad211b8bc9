"""Faults during training through the real CLI: non-finite losses and corrupt data."""
from __future__ import annotations

import shutil

from conftest import check, data_overrides, read_metrics, run_trainer

FAST = ["model.context_length=24", "data.batch_size=16", "data.workers=1", "data.shuffle_buffer=64",
        "optim.warmup_steps=2", "log.every_steps=1", "log.progress=false", "eval.batch_size=48",
        "checkpoint.every_steps=100"]


def test_non_finite_loss_on_one_rank_is_skipped_by_all_and_counted(demo_data, tmp_path):
    out = tmp_path / "nan"
    text = check(run_trainer(["train", "--config", "trainer/configs/demo.yaml", *data_overrides(demo_data, out),
                              *FAST, "max_steps=5", "debug.inject_nan_steps=[3]"], nproc=2))
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]  # step 3 was retried with the next micro-batch
    assert [m["bad_steps"] for m in metrics] == [0, 0, 1, 1, 1]
    assert all(m["loss"] == m["loss"] for m in metrics)  # no NaN reached the metrics
    assert "step 3: non-finite loss, micro-batch dropped (1 in a row)" in text


def test_too_many_consecutive_bad_steps_stop_the_run_with_a_message(demo_data, tmp_path):
    proc = run_trainer(["train", "--config", "trainer/configs/demo.yaml", *data_overrides(demo_data, tmp_path / "s"),
                        *FAST, "max_steps=8", "debug.inject_nan_steps=[2]", "train.max_bad_steps=1"], nproc=1)
    assert proc.returncode == 1
    assert "stopping: 1 consecutive micro-batches with a non-finite loss (train.max_bad_steps=1)" in proc.stderr
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
