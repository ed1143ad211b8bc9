"""train.accum_negatives: with K accumulation steps, the contrastive loss over all K x b x world
pairs of the step, exactly as one batch of K x b per rank (GradCache). The reference is the same
run made with one large micro-batch and no accumulation: the loader draws every sample by its
index, so K micro-batches of b are the large batch's samples in the same order."""
from __future__ import annotations

import pytest
import torch

from conftest import check, data_overrides, read_metrics, run_trainer

CONFIG = "trainer/configs/demo.yaml"
B, K, STEPS = 8, 3, 4
# No loader workers (not what this tests; tests/test_worker_start.py and the e2e tests run them).
FAST = ["model.context_length=24", "data.workers=0", "data.shuffle_buffer=64", "data.train_num_samples=192",
        "optim.warmup_steps=1", "optim.lr=2e-3", "log.every_steps=1", "log.progress=false", "eval.batch_size=48",
        f"max_steps={STEPS}", f"checkpoint.every_steps={STEPS}", "eval.every_steps=0"]


def train(data, out, *extra, nproc=2):
    check(run_trainer(["train", "--config", CONFIG, *data_overrides(data, out), *FAST, *extra], nproc=nproc))
    return {m["step"]: m for m in read_metrics(out)}


@pytest.mark.full
@pytest.mark.parametrize("stage", [1, 3])
def test_cached_negatives_equal_one_large_batch(demo_data, tmp_path, stage):
    from trainer.sources import fp32_state_dict

    zero = f"deepspeed.zero_stage={stage}"
    big = train(demo_data, tmp_path / "big", f"data.batch_size={K * B}", zero)
    cached = train(demo_data, tmp_path / "cached", f"data.batch_size={B}", f"train.grad_accum_steps={K}",
                   "train.accum_negatives=true", zero)
    plain = train(demo_data, tmp_path / "plain", f"data.batch_size={B}", f"train.grad_accum_steps={K}", zero)
    assert sorted(cached) == sorted(big) == list(range(1, STEPS + 1))
    for s in big:   # the same loss over 48 pairs, step after step: the gradients were the large batch's
        assert cached[s]["clip"] == pytest.approx(big[s]["clip"], rel=2e-5), s
    # at step 1 (same weights) a loss over 48 negatives vs the mean of three over 16 each (at
    # uniform logits log 48 vs log 16): plain accumulation is visibly not the large batch
    assert big[1]["clip"] - plain[1]["clip"] > 0.3
    want = fp32_state_dict(tmp_path / "big" / "checkpoints", f"step_{STEPS}")
    got = fp32_state_dict(tmp_path / "cached" / "checkpoints", f"step_{STEPS}")
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=2e-6, msg=name)
    moved = fp32_state_dict(tmp_path / "plain" / "checkpoints", f"step_{STEPS}")
    assert max((moved[n] - want[n]).abs().max().item() for n in want) > 1e-4   # the check can fail


@pytest.mark.parametrize("extra, message", [
    (["train.accum_negatives=true"], "needs train.grad_accum_steps >= 2"),
    (["train.accum_negatives=true", "train.grad_accum_steps=2", "psd.enabled=true"],
     "the enabled method(s) psd need more of the training forward"),
])
def test_accum_negatives_bad_input_names_the_problem(extra, message):
    """What `train` checks before any process starts (the CLI prints it as one error line, exit 2)."""
    from trainer import methods
    from trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        methods.check(load_config(CONFIG, extra))
