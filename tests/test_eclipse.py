"""ECLIPSE end to end on 2 gloo ranks: the momentum teacher is the closed-form EMA of the
student's fp32 master weights under ZeRO 1, 2 and 3 (partitioned under ZeRO-3), the stages agree,
a SIGKILL + rerun continues exactly, and eval/export of the student and the teacher agree with
the trainer's own embeddings."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import check, data_overrides, kill_group, read_metrics, run_trainer, start_trainer

CONFIG = "trainer/configs/eclipse.yaml"
M = 0.8   # a fast EMA so that a few steps move the teacher well away from its start
STEPS = 6
FAST = ["model.context_length=24", "data.batch_size=16", "data.workers=1", "data.shuffle_buffer=64",
        "data.train_num_samples=192", "optim.warmup_steps=2", "optim.lr=2e-3", "log.every_steps=1",
        "log.progress=false", "eval.batch_size=48", f"eclipse.momentum={M}", "eclipse.keep_warmup_steps=1",
        "checkpoint.every_steps=1", f"checkpoint.keep_last={STEPS}", f"max_steps={STEPS}"]


def train_args(data, out, *extra):
    return ["train", "--config", CONFIG, *data_overrides(data, out), *FAST, *extra]


def losses(out: Path, key: str = "loss") -> dict[int, float]:
    return {m["step"]: m[key] for m in read_metrics(out)}


@pytest.fixture(scope="module")
def stages(demo_data, tmp_path_factory) -> dict[int, Path]:
    """One 6-step run per ZeRO stage, a checkpoint after every step."""
    runs = {}
    for stage in (1, 2, 3):
        out = tmp_path_factory.mktemp(f"eclipse-zero{stage}")
        check(run_trainer(train_args(demo_data, out, f"deepspeed.zero_stage={stage}"), nproc=2))
        runs[stage] = out
    return runs


def _initial_student(out: Path) -> dict[str, torch.Tensor]:
    from trainer.config import load_config
    from trainer.data import load_tokenizer
    from trainer.model import build_model

    cfg = load_config(out / "config.yaml")
    return {k: v.float() for k, v in build_model(cfg.model, load_tokenizer(cfg.tokenizer.path), cfg.seed)
            .state_dict().items()}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_teacher_is_the_closed_form_ema_of_the_student(stages, stage):
    """teacher_0 = student_0; teacher_t = m teacher_(t-1) + (1 - m) student_t, with student_t the
    consolidated fp32 weights of checkpoint t (DeepSpeed's own zero_to_fp32 reader)."""
    from trainer.export import fp32_state_dict
    from trainer.methods.eclipse import teacher_state_dict

    root = stages[stage] / "checkpoints"
    want = {k: v for k, v in _initial_student(stages[stage]).items()
            if k.startswith(("vision_model.", "visual_projection.")) and not k.endswith("position_ids")}
    for t in range(1, STEPS + 1):
        student = fp32_state_dict(root, f"step_{t}")
        want = {k: M * v + (1 - M) * student[k] for k, v in want.items()}
        got = teacher_state_dict(root, f"step_{t}")
        assert sorted(got) == sorted(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=f"step {t} {k}")
    # and it moved: after 6 steps at m = 0.8 the teacher is far from the initial weights
    init = _initial_student(stages[stage])
    assert (got["visual_projection.weight"] - init["visual_projection.weight"]).abs().max() > 1e-3


def test_zero3_teacher_holds_only_its_partition(stages):
    """Each rank's EMA state (and teacher weights) is 1/world of the tower, up to padding."""
    step = stages[3] / "checkpoints" / f"step_{STEPS}" / "trainer_state"
    per_rank = [torch.load(f, weights_only=False)["eclipse"] for f in sorted(step.glob("rank_*.pt"))]
    assert len(per_rank) == 2 and all(s["kind"] == "zero3" for s in per_rank)
    full = sum(torch.Size(s["shape"]).numel() for s in per_rank[0]["slots"].values())
    held = [sum(s["shadow"].numel() for s in r["slots"].values()) for r in per_rank]
    assert sum(held) == full
    for h in held:
        assert abs(h - full / 2) <= len(per_rank[0]["slots"])   # each param splits evenly, +-1 element
    # the replicated stages hold the whole tower's EMA split across ranks too (optimizer fragments)
    frag = stages[1] / "checkpoints" / f"step_{STEPS}" / "trainer_state"
    per_rank = [torch.load(f, weights_only=False)["eclipse"] for f in sorted(frag.glob("rank_*.pt"))]
    assert all(s["kind"] == "fragment" for s in per_rank)
    assert sum(sum(s["shadow"].numel() for s in r["slots"].values()) for r in per_rank) == full
    for r in per_rank:
        assert all(s["shadow"].dtype == torch.float32 for s in r["slots"].values())


def test_zero_stages_give_the_same_losses(stages):
    want = losses(stages[1])
    assert sorted(want) == list(range(1, STEPS + 1))
    for stage in (2, 3):
        assert losses(stages[stage]) == pytest.approx(want, rel=2e-4), stage
        assert losses(stages[stage], "teacher_kl") == pytest.approx(losses(stages[1], "teacher_kl"), rel=2e-3, abs=1e-5)
    kl = losses(stages[1], "teacher_kl")
    assert kl[1] == pytest.approx(0.0, abs=1e-6)       # step 1: teacher == student, keep rate 1
    assert all(kl[s] > 1e-4 for s in range(2, STEPS + 1))
    clip = losses(stages[1], "clip")
    for s, total in want.items():
        assert total == pytest.approx(clip[s] + kl[s], rel=1e-5)   # loss = clip + 1.0 * teacher_kl
