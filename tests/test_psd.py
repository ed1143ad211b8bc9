"""Progressive self-distillation (trainer/methods/psd.py): the soft targets of every teacher change
the gradient and equal a materialised reference; the subset is one global draw per step shared by
the ranks; the teacher copies follow their closed forms under ZeRO 0-3 (an EMA of both towers; a
snapshot at each refresh); the stages agree; a SIGKILL + rerun continues exactly."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import (LazyRuns, check, data_overrides, first_fast, kill_group, read_metrics, run_trainer,
                      start_trainer, wait_for_step)

CONFIG = "trainer/configs/psd.yaml"
M = 0.7        # a fast EMA, so that a few steps move the teacher well away from its start
STEPS = 6
# No loader workers: not what these tests are about, and each rank's worker server imports
# torch and the data pipeline again (~3 s of CPU); tests/test_worker_start.py and the e2e tests run them.
FAST = ["model.context_length=24", "data.batch_size=16", "data.workers=0", "data.shuffle_buffer=64",
        "data.train_num_samples=192", "optim.warmup_steps=2", "optim.lr=2e-3", "log.every_steps=1",
        "log.progress=false", "eval.batch_size=48", "checkpoint.every_steps=1", f"checkpoint.keep_last={STEPS}",
        f"max_steps={STEPS}", "psd.alpha_max=0.8", "psd.schedule=constant", "data.val_shards=null"]


def train_args(data, out, *extra):
    return ["train", "--config", CONFIG, *data_overrides(data, out), *FAST, *extra]


def losses(out: Path, key: str = "loss") -> dict[int, float]:
    return {m["step"]: m[key] for m in read_metrics(out)}


# ----------------------------------------------------------------------------- the loss

def _textbook(x, y, s, alpha, mask, tau, xp=None, yp=None):
    """Float64, one process, logits materialised as a leaf: the soft-target CE of docs/methods.md,
    rows and columns, and the logits' gradient. ``xp, yp``: teacher embeddings (None: this pass)."""
    x, y = x.double().detach().requires_grad_(), y.double().detach().requires_grad_()
    n = x.shape[0]
    logits = s * x @ y.T
    logits.retain_grad()
    teacher = logits.detach() if xp is None else s * xp.double() @ yp.double().T
    a = alpha * mask.double()
    eye = torch.eye(n, dtype=torch.float64)
    rows = (1 - a)[:, None] * eye + a[:, None] * F.softmax(teacher / tau, 1)        # target of row i
    cols = (1 - a)[None, :] * eye + a[None, :] * F.softmax(teacher / tau, 0)        # target of column j
    loss = (-(rows * F.log_softmax(logits, 1)).sum() - (cols * F.log_softmax(logits, 0)).sum()) / (2 * n)
    loss.backward()
    # the down-weighted hard-label gradient (1 - a)(p - e) of each direction
    hard = ((1 - a)[:, None] * (F.softmax(logits, 1) - eye) + (1 - a)[None, :] * (F.softmax(logits, 0) - eye)) / (2 * n)
    return loss.detach(), logits.grad, hard.detach(), x.grad, y.grad


TEACHERS = ["self-tau2", "self-tau0.5", "momentum", "previous", "eclipse-momentum", "self-tau1"]


@pytest.mark.parametrize("impl", ["torch", "chunked"])
@pytest.mark.parametrize("teacher", TEACHERS)
def test_each_teacher_changes_the_gradient_and_matches_a_materialised_reference(teacher, impl):
    """Through the trainer's compute_loss: loss and embedding gradients equal the float64
    textbook; the logits' gradient differs from the down-weighted hard-label gradient for every
    teacher but the degenerate one (self at tau = 1), where it equals it exactly."""
    from trainer.config import LossConfig
    from trainer.losses import LossContext, build_terms, compute_loss
    from trainer.methods.psd import SoftTargets

    g = torch.Generator().manual_seed(7)
    n, d, alpha, s = 12, 8, 0.6, torch.tensor(10.0)
    x0 = F.normalize(torch.randn(n, d, generator=g), dim=1)
    y0 = F.normalize(torch.randn(n, d, generator=g), dim=1)
    # a momentum teacher sits near the student; a stale copy further away
    near = 0.3 if teacher == "momentum" else 0.8
    xp = F.normalize(x0 + near * torch.randn(n, d, generator=g), dim=1)
    yp = F.normalize(y0 + near * torch.randn(n, d, generator=g), dim=1)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[: n // 2]] = True
    tau = {"self-tau2": 2.0, "self-tau0.5": 0.5, "self-tau1": 1.0}.get(teacher, 1.0)
    method_terms = {"self_distill": 1.0}
    extras = {}
    if teacher.startswith("self"):
        soft, ref_teacher = SoftTargets(alpha, mask, tau), (None, None)
    elif teacher == "eclipse-momentum":   # ECLIPSE's image teacher + the shared (student) texts
        method_terms["teacher_kl"] = 0.0  # the KL is ECLIPSE's own test; here only the targets
        soft, ref_teacher = SoftTargets(alpha, mask, tau, from_eclipse=True), (xp, y0)
        extras = {"teacher_image": xp, "teacher_text_grad": False}
    else:
        soft, ref_teacher = SoftTargets(alpha, mask, tau, xp, yp), (xp, yp)
    terms = build_terms(LossConfig(impl=impl, terms={"clip": 1.0}), method_terms)
    x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
    total, parts = compute_loss(terms, LossContext(x, y, s, step=1, impl=impl, extras={**extras, "psd": soft}))
    total.backward()
    want, dlogits, hard, dx, dy = _textbook(x0, y0, s, alpha, mask, tau, *ref_teacher)
    assert total.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(x.grad.double(), dx, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(y.grad.double(), dy, rtol=1e-4, atol=1e-7)
    assert set(parts) >= {"clip", "self_distill"}
    differs = (dlogits - hard).abs().max() / hard.abs().max()
    if teacher == "self-tau1":
        assert differs < 1e-12      # the degenerate teacher: exactly the down-weighted hard labels
    else:
        assert differs > 0.05, differs


def test_the_subset_is_one_global_draw_per_step_shared_by_the_ranks():
    from trainer.config import Config, PsdConfig
    from trainer.methods.psd import subset_mask

    cfg = Config(seed=3, psd=PsdConfig(enabled=True, subset=0.5))
    whole = subset_mask(cfg, step=5, micro=0, rank=0, world=1, b=32)
    assert whole.sum().item() == 16
    for world in (2, 4):   # every rank's slice of the same draw: W ranks == one process
        b = 32 // world
        parts = [subset_mask(cfg, 5, 0, r, world, b) for r in range(world)]
        assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(subset_mask(cfg, 6, 0, 0, 1, 32), whole)          # resampled every step
    assert not torch.equal(subset_mask(cfg, 5, 1, 0, 1, 32), whole)          # and micro-batch
    assert torch.equal(subset_mask(cfg, 5, 0, 0, 1, 32), whole)              # a resumed run draws it again
    quarter = Config(seed=3, psd=PsdConfig(enabled=True, subset=0.25))
    assert subset_mask(quarter, 5, 0, 0, 1, 32).sum().item() == 8


def test_schedule_and_refresh_interval_follow_their_closed_forms():
    from trainer.config import Config, DataConfig, PsdConfig, TrainConfig
    from trainer.methods.psd import alpha_at, refresh_every

    cfg = Config(max_steps=200, psd=PsdConfig(enabled=True, alpha_max=0.4))
    assert [alpha_at(cfg, t) for t in (0, 50, 100, 200, 300)] == pytest.approx([0.0, 0.1, 0.2, 0.4, 0.4])
    const = Config(max_steps=200, psd=PsdConfig(enabled=True, alpha_max=0.4, schedule="constant"))
    assert alpha_at(const, 1) == 0.4
    # one data epoch in optimizer steps: 10000 samples / (64 per rank x 2 ranks x 2 accumulation)
    epoch = Config(data=DataConfig(train_num_samples=10000, batch_size=64), train=TrainConfig(grad_accum_steps=2))
    assert refresh_every(epoch, 2) == 39
    assert refresh_every(Config(psd=PsdConfig(refresh_every=7)), 2) == 7


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def momentum_runs(demo_data, tmp_path_factory) -> dict[int, Path]:
    """One 6-step run of PSD's own EMA teacher (both towers) per ZeRO stage, 2 ranks."""
    def make(stage):
        out = tmp_path_factory.mktemp(f"psd-momentum-zero{stage}")
        check(run_trainer(train_args(demo_data, out, f"deepspeed.zero_stage={stage}", "psd.teacher=momentum",
                                     f"psd.momentum={M}", "psd.teacher_tau=1.0"), nproc=2))
        return out
    return LazyRuns(make)


def _initial(out: Path) -> dict[str, torch.Tensor]:
    from trainer.config import load_config
    from trainer.data import load_tokenizer
    from trainer.model import build_model

    cfg = load_config(out / "config.yaml")
    model = build_model(cfg.model, load_tokenizer(cfg.tokenizer.path), cfg.seed)
    return {k: v.float() for k, v in model.state_dict().items()
            if not k.endswith("position_ids") and k not in ("logit_scale",)}


@pytest.mark.parametrize("stage", [pytest.param(s, marks=pytest.mark.full) for s in (0, 1, 2)] + [3])
def test_momentum_teacher_is_the_closed_form_ema_of_both_towers(momentum_runs, stage):
    """teacher_0 = student_0; teacher_t = m teacher_(t-1) + (1 - m) student_t (consolidated fp32
    checkpoints, DeepSpeed's zero_to_fp32 reader), for the image and the text tower."""
    from trainer.sources import fp32_state_dict
    from trainer.methods.psd import teacher_state_dict

    root = momentum_runs[stage] / "checkpoints"
    want = _initial(momentum_runs[stage])
    for t in range(1, STEPS + 1):
        student = fp32_state_dict(root, f"step_{t}")
        want = {k: M * v + (1 - M) * student[k] for k, v in want.items()}
        got = teacher_state_dict(root, f"step_{t}")
        assert sorted(got) == sorted(want)
        assert any(k.startswith("text_model.") for k in got) and any(k.startswith("vision_model.") for k in got)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=f"step {t} {k}")
    assert (got["text_projection.weight"] - _initial(momentum_runs[stage])["text_projection.weight"]).abs().max() > 1e-3


@pytest.mark.parametrize("stage", [pytest.param(0, marks=pytest.mark.full), pytest.param(2, marks=pytest.mark.full), 3])
def test_zero_stages_give_the_same_losses(momentum_runs, stage):
    want = {key: losses(momentum_runs[1], key) for key in ("loss", "clip", "self_distill")}
    assert sorted(want["loss"]) == list(range(1, STEPS + 1))
    for key, values in want.items():
        assert losses(momentum_runs[stage], key) == pytest.approx(values, rel=2e-4), (stage, key)
    # the soft targets act: the optimised loss is not the plain CLIP loss
    assert all(abs(want["loss"][t] - want["clip"][t]) > 1e-4 for t in range(2, STEPS + 1))


@pytest.mark.full   # the fast tier keeps the momentum teacher's closed form; the previous teacher is a variant
def test_previous_teacher_is_the_student_at_the_last_refresh(demo_data, tmp_path):
    """refresh every 2 steps under ZeRO-3: the teacher of checkpoint t is the student of
    checkpoint 2 * floor(t / 2) (the initial weights before the first refresh), and a_t = 0
    until that first refresh (the loss is the plain CLIP loss at steps 1 and 2)."""
    from trainer.sources import fp32_state_dict
    from trainer.methods.psd import teacher_state_dict

    out = tmp_path / "previous"
    check(run_trainer(train_args(demo_data, out, "deepspeed.zero_stage=3", "psd.teacher=previous",
                                 "psd.refresh_every=2"), nproc=2))
    root = out / "checkpoints"
    init = _initial(out)
    for t in range(1, STEPS + 1):
        got = teacher_state_dict(root, f"step_{t}")
        want = init if t < 2 else fp32_state_dict(root, f"step_{2 * (t // 2)}")
        for k in init:
            torch.testing.assert_close(got[k], want[k].float(), rtol=0, atol=0, msg=f"step {t} {k}")
    total, clip = losses(out), losses(out, "clip")
    assert total[1] == pytest.approx(clip[1], rel=1e-6) and total[2] == pytest.approx(clip[2], rel=1e-6)
    assert all(abs(total[t] - clip[t]) > 1e-4 for t in range(3, STEPS + 1))


@pytest.mark.full   # a real SIGKILL per method is redundant with test_train_e2e's; the EMA state round trip is test_eclipse's in-process test
def test_sigkill_and_rerun_continues_with_identical_losses(momentum_runs, demo_data, tmp_path):
    """Killed after step 3 (checkpoints every 2 steps), rerun: the EMA teacher, the subsets and
    the schedule come back, so every loss term equals the uninterrupted ZeRO-1 run's."""
    out = tmp_path / "killed"
    args = train_args(demo_data, out, "deepspeed.zero_stage=1", "psd.teacher=momentum", f"psd.momentum={M}",
                      "psd.teacher_tau=1.0", "checkpoint.every_steps=2")
    proc = start_trainer(args, nproc=2)
    wait_for_step(proc, out, 3)
    kill_group(proc)
    assert (out / "checkpoints" / "latest").read_text().strip() in ("step_2", "step_4")
    text = check(run_trainer(args, nproc=2))
    assert "resumed from" in text
    for key in ("loss", "clip", "self_distill"):
        got = losses(out, key)
        assert sorted(got) == list(range(1, STEPS + 1))
        assert got == pytest.approx(losses(momentum_runs[1], key), rel=1e-5, abs=1e-7), key


def test_export_of_a_psd_run_is_the_plain_student(momentum_runs, tmp_path):
    """The teacher copy is training state: export-hf writes a standard CLIPModel without it."""
    from transformers import CLIPModel

    from trainer.sources import fp32_state_dict

    out = tmp_path / "hf"
    check(run_trainer(["export-hf", "--checkpoint", str(momentum_runs[1]), "--out", str(out)]))
    hf = CLIPModel.from_pretrained(out).state_dict()
    student = fp32_state_dict(momentum_runs[1] / "checkpoints", f"step_{STEPS}")
    assert not any(k.startswith("psd_teacher.") for k in hf)
    for k in ("text_projection.weight", "visual_projection.weight"):
        torch.testing.assert_close(hf[k], student[k])


def test_psd_with_eclipse_reuses_its_teacher(demo_data, tmp_path):
    """psd.teacher=momentum with ECLIPSE on keeps no second copy (only ECLIPSE's image teacher
    in the checkpoint) and logs all three terms; loss = clip-with-soft-targets + teacher_kl."""
    out = tmp_path / "both"
    text = check(run_trainer(train_args(demo_data, out, "eclipse.enabled=true", "psd.teacher=momentum",
                                        "eclipse.momentum=0.8", "max_steps=3"), nproc=2))
    assert "ECLIPSE's momentum image teacher" in text
    module = torch.load(out / "checkpoints" / "step_3" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert any(k.startswith("teacher.") for k in module) and not any(k.startswith("psd_teacher.") for k in module)
    state = torch.load(out / "checkpoints" / "step_3" / "trainer_state" / "rank_0.pt", weights_only=False)
    assert state["psd"] == {} and "slots" in state["eclipse"]
    for key in ("clip", "self_distill", "teacher_kl"):
        assert len(losses(out, key)) == 3


@pytest.mark.parametrize("override,message", first_fast([
    ("psd.teacher=bogus", "config key 'psd.teacher' must be one of self, momentum, previous"),
    ("psd.alpha_max=1.5", "config key 'psd.alpha_max' must be <= 1.0"),
    ("psd.teacher_tau=0", "config key 'psd.teacher_tau' must be >= 0.001"),
    ("psd.subset=0", "config key 'psd.subset' is 0"),
    ("loss.terms={self_distill: 1.0}", "switched on by psd.enabled"),
]))
def test_bad_psd_values_exit_2_naming_the_key(demo_data, tmp_path, override, message):
    proc = run_trainer(["train", "--config", CONFIG, *data_overrides(demo_data, tmp_path / "bad"), override])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]


def test_degenerate_self_teacher_is_warned_about(demo_data, tmp_path):
    proc = run_trainer(["train", "--config", CONFIG, *data_overrides(demo_data, tmp_path / "deg"), *FAST,
                        "max_steps=1", "psd.teacher=self", "psd.teacher_tau=1.0", "data.workers=0"])
    check(proc)
    assert "is degenerate" in proc.stderr


def test_help_config_lists_every_psd_key_with_its_default():
    text = check(run_trainer(["train", "--help-config"]))
    for key in ("psd.enabled = False", "psd.teacher = 'self'", "psd.teacher_tau", "psd.alpha_max", "psd.subset = 0.5",
                "psd.schedule = 'linear'", "psd.momentum", "psd.refresh_every = None"):
        assert key in text, key
