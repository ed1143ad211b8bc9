"""ECLIPSE end to end on 2 gloo ranks: the momentum teacher is the closed-form EMA of the
student's fp32 master weights under ZeRO 1, 2 and 3 (partitioned under ZeRO-3), the stages agree,
a SIGKILL + rerun continues exactly, and eval/export of the student and the teacher agree with
the trainer's own embeddings."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import (FULL_STAGES, LazyRuns, check, data_overrides, kill_group, read_metrics, run_trainer,
                      start_trainer, wait_for_step)

CONFIG = "trainer/configs/eclipse.yaml"
M = 0.8   # a fast EMA so that a few steps move the teacher well away from its start
STEPS = 6
# No loader workers: not what these tests are about, and each rank's worker server imports
# torch and the data pipeline again (~3 s of CPU); tests/test_worker_start.py and the e2e tests run them.
FAST = ["model.context_length=24", "data.batch_size=16", "data.workers=0", "data.shuffle_buffer=64",
        "data.train_num_samples=192", "optim.warmup_steps=2", "optim.lr=2e-3", "log.every_steps=1",
        "log.progress=false", "eval.batch_size=48", f"eclipse.momentum={M}", "eclipse.keep_warmup_steps=1",
        "checkpoint.every_steps=1", f"checkpoint.keep_last={STEPS}", f"max_steps={STEPS}"]


def train_args(data, out, *extra):
    return ["train", "--config", CONFIG, *data_overrides(data, out), *FAST, *extra]


def losses(out: Path, key: str = "loss") -> dict[int, float]:
    return {m["step"]: m[key] for m in read_metrics(out)}


@pytest.fixture(scope="module")
def stages(demo_data, tmp_path_factory) -> dict[int, Path]:
    """One 6-step run per ZeRO stage, a checkpoint after every step (each made when first read)."""
    def make(stage):
        out = tmp_path_factory.mktemp(f"eclipse-zero{stage}")
        check(run_trainer(train_args(demo_data, out, f"deepspeed.zero_stage={stage}"), nproc=2))
        return out
    return LazyRuns(make)


def _initial_student(out: Path) -> dict[str, torch.Tensor]:
    from trainer.config import load_config
    from trainer.data import load_tokenizer
    from trainer.model import build_model

    cfg = load_config(out / "config.yaml")
    return {k: v.float() for k, v in build_model(cfg.model, load_tokenizer(cfg.tokenizer.path), cfg.seed)
            .state_dict().items()}


# ZeRO-3's partitioned EMA in the full tier (with tests/test_teacher_fresh.py's ulp-level checks);
# the fast tier checks the closed form on ZeRO-1 and ZeRO-3's partition layout below.
@pytest.mark.parametrize("stage", [*FULL_STAGES[:3], pytest.param(3, marks=pytest.mark.full)])
def test_teacher_is_the_closed_form_ema_of_the_student(stages, stage):
    """teacher_0 = student_0; teacher_t = m teacher_(t-1) + (1 - m) student_t, with student_t the
    consolidated fp32 weights of checkpoint t (DeepSpeed's own zero_to_fp32 reader)."""
    from trainer.sources import fp32_state_dict
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
    # fp32 under ZeRO-1: every rank keeps the whole EMA (its module weights are the masters)
    rep = stages[1] / "checkpoints" / f"step_{STEPS}" / "trainer_state"
    per_rank = [torch.load(f, weights_only=False)["eclipse"] for f in sorted(rep.glob("rank_*.pt"))]
    assert all(s["kind"] == "full" for s in per_rank)
    for r in per_rank:
        assert sum(s["shadow"].numel() for s in r["slots"].values()) == full
        assert all(s["shadow"].dtype == torch.float32 for s in r["slots"].values())


@pytest.mark.parametrize("stage", [pytest.param(0, marks=pytest.mark.full), pytest.param(2, marks=pytest.mark.full), 3])
def test_zero_stages_give_the_same_losses(stages, stage):
    want = losses(stages[1])
    assert sorted(want) == list(range(1, STEPS + 1))
    assert losses(stages[stage]) == pytest.approx(want, rel=2e-4), stage
    assert losses(stages[stage], "teacher_kl") == pytest.approx(losses(stages[1], "teacher_kl"), rel=2e-3, abs=1e-5)
    kl = losses(stages[1], "teacher_kl")
    assert kl[1] == pytest.approx(0.0, abs=1e-6)       # step 1: teacher == student, keep rate 1
    assert all(kl[s] > 1e-4 for s in range(2, STEPS + 1))
    clip = losses(stages[1], "clip")
    for s, total in want.items():
        assert total == pytest.approx(clip[s] + kl[s], rel=1e-5)   # loss = clip + 1.0 * teacher_kl


def test_teacher_state_round_trips_through_a_checkpoint_in_process():
    """The EMA teacher's state (ECLIPSE's and PSD's momentum teacher: trainer/methods/ema.py), saved
    after 3 updates, written with torch.save and loaded into a fresh teacher of a fresh model:
    the teacher weights come back exactly and 3 more updates equal the uninterrupted 6, i.e.
    t_k = m t_(k-1) + (1 - m) s_k computed here. (The one real SIGKILL + rerun of the fast tier is
    tests/test_train_e2e.py; this method's own kill test is in the full tier.)"""
    import io
    from types import SimpleNamespace

    from trainer.methods.ema import ShadowTeacher

    def model(seed):
        torch.manual_seed(seed)
        m = torch.nn.Module()
        m.proj = torch.nn.Linear(5, 3)
        m.teacher = torch.nn.Module()
        m.teacher.proj = torch.nn.Linear(5, 3)
        return m

    def engine(m):
        return SimpleNamespace(module=m, dp_world_size=1)

    students = [{k: torch.randn_like(v) for k, v in model(0).proj.state_dict().items()} for _ in range(6)]

    def step(m, teacher, t):
        m.proj.load_state_dict(students[t - 1])           # "the optimizer step": new student weights
        teacher.update(t)

    a = model(0)
    ta = ShadowTeacher(engine(a), "teacher.", lambda step: M)
    want = {k: v.clone() for k, v in a.proj.state_dict().items()}
    for t in range(1, 4):
        step(a, ta, t)
    buf = io.BytesIO()
    torch.save(ta.state_dict(), buf)
    b = model(1)                                          # other initial weights everywhere
    b.proj.load_state_dict(students[2])                   # the resumed student (its own checkpoint)
    tb = ShadowTeacher(engine(b), "teacher.", lambda step: M)
    tb.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    for k, v in a.teacher.proj.state_dict().items():
        assert torch.equal(b.teacher.proj.state_dict()[k], v), k
    for t in range(4, 7):
        step(a, ta, t)
        step(b, tb, t)
    for t in range(1, 7):                                 # the closed form, from the initial student
        want = {k: M * v + (1 - M) * students[t - 1][k] for k, v in want.items()}
    for k in want:
        torch.testing.assert_close(a.teacher.proj.state_dict()[k], want[k], rtol=1e-6, atol=1e-7)
        assert torch.equal(b.teacher.proj.state_dict()[k], a.teacher.proj.state_dict()[k]), k


@pytest.mark.full   # a real SIGKILL per method is redundant with test_train_e2e's; state round trip above
def test_sigkill_and_rerun_continues_with_identical_losses(stages, demo_data, tmp_path):
    """Killed after step 3 (checkpoints every 2 steps), rerun: the teacher, the keep-rate
    schedule and the data come back, so every loss term equals the uninterrupted ZeRO-1 run's."""
    out = tmp_path / "killed"
    args = train_args(demo_data, out, "deepspeed.zero_stage=1", "checkpoint.every_steps=2")
    proc = start_trainer(args, nproc=2)
    wait_for_step(proc, out, 3)
    kill_group(proc)
    assert (out / "checkpoints" / "latest").read_text().strip() in ("step_2", "step_4")
    text = check(run_trainer(args, nproc=2))
    assert "resumed from" in text
    for key in ("loss", "clip", "teacher_kl"):
        got = losses(out, key)
        assert sorted(got) == list(range(1, STEPS + 1))
        assert got == pytest.approx(losses(stages[1], key), rel=1e-5, abs=1e-7), key


def test_eval_reports_student_fast_student_and_teacher(stages, tmp_path):
    """eval.json of the run has the three views; `eval --checkpoint` (1 process, consolidated
    weights, teacher assembled from the ranks' shadows) reproduces the ZeRO-3 run's values."""
    during = json.loads((stages[3] / "eval.json").read_text())
    for prefix in ("", "fast/", "teacher/"):
        for key in ("zeroshot_top1", "i2t_r1", "t2i_r1", "i2t_r5"):
            assert prefix + key in during, prefix + key
    # the expedited student is another forward than the full one (the teacher has no logit scale)
    assert during["val_loss"] != during["fast/val_loss"]
    out = tmp_path / "eval.json"
    check(run_trainer(["eval", "--checkpoint", str(stages[3] / "checkpoints"), "--out", str(out)]))
    single = json.loads(out.read_text())
    for key, value in during.items():
        assert single[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_export_of_student_and_teacher_matches_the_trainer(stages, tmp_path, which):
    from transformers import CLIPModel

    from trainer.data import load_tokenizer
    from trainer.methods import load_trained_model
    from trainer.sources import checkpoint_config

    hf_dir = tmp_path / which
    check(run_trainer(["export-hf", "--checkpoint", str(stages[3] / "checkpoints"), "--out", str(hf_dir),
                       "--which", which]))
    hf = CLIPModel.from_pretrained(hf_dir).eval()
    cfg, root, tag = checkpoint_config(str(stages[3] / "checkpoints"))
    ours = load_trained_model(cfg, root, tag, load_tokenizer(cfg.tokenizer.path))
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(5, 40, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        img_hf = torch.nn.functional.normalize(hf.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        txt_hf = torch.nn.functional.normalize(hf.get_text_features(input_ids=ids).pooler_output, dim=-1)
        student, txt, _, teacher = ours(pixel_values=pixels, input_ids=ids, with_teacher=True)
    want = teacher if which == "teacher" else student
    torch.testing.assert_close(img_hf, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(txt_hf, txt, rtol=1e-5, atol=1e-5)
    assert (student - teacher).abs().max() > 1e-4   # the two towers really differ


@pytest.mark.full   # bf16 training end to end stays in the fast tier (test_train_precision)
def test_bf16_teacher_accumulates_in_fp32_from_the_master_weights(demo_data, tmp_path):
    """bf16 training (ZeRO-1): the shadows are fp32 and follow the closed-form EMA of the fp32
    master weights, which a bf16 EMA could not (0.2 x a step's change is below bf16's resolution
    for most weights); the teacher the forward uses is their bf16 rounding."""
    from trainer.sources import fp32_state_dict
    from trainer.methods.eclipse import teacher_state_dict

    out = tmp_path / "bf16"
    steps = 3
    check(run_trainer(train_args(demo_data, out, "deepspeed.precision=bf16", f"max_steps={steps}",
                                 "eval.every_steps=0", "data.val_shards=null"), nproc=2))
    root = out / "checkpoints"
    # step 0's masters: DeepSpeed makes them from the module after casting it to bf16
    want = {k: v.to(torch.bfloat16).float() for k, v in _initial_student(out).items()
            if k.startswith(("vision_model.", "visual_projection.")) and not k.endswith("position_ids")}
    for t in range(1, steps + 1):
        student = fp32_state_dict(root, f"step_{t}")
        want = {k: M * v + (1 - M) * student[k] for k, v in want.items()}
    got = teacher_state_dict(root, f"step_{steps}")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    states = [torch.load(f, weights_only=False)["eclipse"] for f in (root / f"step_{steps}" / "trainer_state").glob("*.pt")]
    assert all(st["kind"] == "fragment" for st in states)       # each rank: its slices of the masters
    assert all(slot["shadow"].dtype == torch.float32 for st in states for slot in st["slots"].values())
    full = sum(torch.Size(s["shape"]).numel() for s in states[0]["slots"].values())
    assert sum(slot["shadow"].numel() for st in states for slot in st["slots"].values()) == full
    module = torch.load(root / f"step_{steps}" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    w = module["teacher.visual_projection.weight"]
    assert w.dtype == torch.bfloat16
    torch.testing.assert_close(w, got["visual_projection.weight"].to(torch.bfloat16), rtol=0, atol=0)


def test_teacher_kl_term_equals_a_materialised_reference():
    """compute_loss with {clip: 1, teacher_kl: lambda} (one streaming pass) == CLIP CE + lambda x
    KL(softmax(s Xt Y^T) || softmax(s X sg(Y)^T)) over rows and columns, written out here; the
    text gradient of the KL is stopped; teacher == student gives KL 0."""
    import torch.nn.functional as F

    from trainer.config import LossConfig
    from trainer.losses import LossContext, build_terms, compute_loss

    g = torch.Generator().manual_seed(3)
    n, d, lam, s = 10, 8, 0.7, torch.tensor(12.0)
    x0 = F.normalize(torch.randn(n, d, generator=g), dim=1)
    y0 = F.normalize(torch.randn(n, d, generator=g), dim=1)
    xt = F.normalize(x0 + 0.5 * torch.randn(n, d, generator=g), dim=1)
    terms = build_terms(LossConfig(impl="chunked", terms={"clip": 1.0}), {"teacher_kl": lam})

    def ours(x, y, teacher):
        return compute_loss(terms, LossContext(x, y, s, step=1, impl="chunked",
                                               extras={"teacher_image": teacher, "teacher_text_grad": False}))

    def reference(x, y, teacher):
        logits = s * x @ y.T
        labels = torch.arange(n)
        clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        student_i, student_t = s * x @ y.detach().T, s * y.detach() @ x.T
        teacher_i = s * teacher @ y.detach().T   # the teacher distribution is a target (no gradient)
        kl = lambda t, st: (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(st, 1))).sum(1)
        return clip, (kl(teacher_i, student_i) + kl(teacher_i.T, student_t)).sum() / (2 * n)

    x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
    total, parts = ours(x, y, xt)
    total.backward()
    xr, yr = x0.clone().requires_grad_(), y0.clone().requires_grad_()
    clip, kl = reference(xr, yr, xt)
    (clip + lam * kl).backward()
    assert parts["clip"].item() == pytest.approx(clip.item(), rel=1e-5)
    assert parts["teacher_kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert total.item() == pytest.approx((clip + lam * kl).item(), rel=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(y.grad, yr.grad, rtol=1e-4, atol=1e-6)
    assert kl.item() > 1e-3
    _, same = ours(x0, y0, x0)
    assert same["teacher_kl"].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("override,message", [
    ("eclipse.drop_layers=[1,4]", "config key 'eclipse.drop_layers' must hold layer indices in [0, 4)"),
    pytest.param("eclipse.expedite=bogus", "config key 'eclipse.expedite' must be one of evit, random, none", marks=pytest.mark.full),
    pytest.param("eclipse.keep_rate=0", "config key 'eclipse.keep_rate' must be >= 0.05", marks=pytest.mark.full),
    pytest.param("eclipse.momentum_final=0.9", "config key 'eclipse.momentum_final' must be in [eclipse.momentum, 1]", marks=pytest.mark.full),
    pytest.param("loss.terms={clip: 0.0}", "config key 'loss.terms.clip' must be > 0", marks=pytest.mark.full),
])
def test_bad_eclipse_values_exit_2_naming_the_key(demo_data, tmp_path, override, message):
    proc = run_trainer(["train", "--config", CONFIG, *data_overrides(demo_data, tmp_path / "bad"), override])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]


@pytest.mark.full   # an error path that trains a run first
def test_export_of_the_teacher_without_eclipse_is_a_clear_error(demo_data, tmp_path):
    out = tmp_path / "plain"
    check(run_trainer(["train", "--config", "trainer/configs/demo.yaml", *data_overrides(demo_data, out),
                       *FAST[:-5], "max_steps=1", "data.val_shards=null", "data.workers=0"]))
    proc = run_trainer(["export-hf", "--checkpoint", str(out), "--out", str(tmp_path / "hf"), "--which", "teacher"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "has no momentum teacher (eclipse.enabled was off)" in proc.stderr


def test_momentum_and_keep_rate_schedules_follow_their_closed_forms():
    """m: constant, or a cosine from eclipse.momentum to eclipse.momentum_final at max_steps; the
    student's keep rate: 1 through the warm-up, then a cosine down to keep_rate (or constant)."""
    import math

    from trainer.config import load_config
    from trainer.methods.eclipse import keep_window, mean_keep_rate, momentum_at, student_keep_rate

    base = ["max_steps=100", "optim.warmup_steps=10"]
    cfg = load_config(CONFIG, base)
    assert [momentum_at(cfg, t) for t in (0, 50, 100)] == [0.995] * 3
    cfg = load_config(CONFIG, [*base, "eclipse.momentum_final=1.0"])
    ms = [momentum_at(cfg, t) for t in range(0, 101)]
    assert ms[0] == pytest.approx(0.995) and ms[100] == pytest.approx(1.0) and ms[50] == pytest.approx(0.9975)
    assert ms[25] == pytest.approx(1.0 - 0.005 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert all(a <= b for a, b in zip(ms, ms[1:])) and momentum_at(cfg, 150) == pytest.approx(1.0)

    # EViT's window: 1 through the warm-up (10), a cosine over a third of the run (33 steps), then held
    ks = {t: student_keep_rate(cfg, t) for t in (1, 10, 11, 30, 43, 44, 100)}
    assert ks[1] == ks[10] == 1.0                                  # the warm-up keeps every token
    assert ks[30] == pytest.approx(0.7 + 0.3 * 0.5 * (1 + math.cos(math.pi * 20 / 33)))
    assert ks[43] == ks[44] == ks[100] == pytest.approx(0.7) and 0.7 < ks[11] < 1.0
    # the mean keep rate over the run: the window's mean (0.85) for 33 steps, 1 for 10, 0.7 for 57
    mean = sum(student_keep_rate(cfg, t) for t in range(1, 101)) / 100
    assert mean_keep_rate(cfg) == pytest.approx(mean) and mean == pytest.approx((10 + 33 * 0.85 + 57 * 0.7) / 100, abs=2e-3)
    cfg = load_config(CONFIG, [*base, "eclipse.keep_shrink_steps=90"])  # the old schedule: target at the last step
    assert student_keep_rate(cfg, 55) == pytest.approx(0.7 + 0.3 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert student_keep_rate(cfg, 99) > 0.7 and student_keep_rate(cfg, 100) == pytest.approx(0.7)
    cfg = load_config(CONFIG, [*base, "eclipse.keep_shrink_steps=500"])  # cut to fit the run
    assert keep_window(cfg) == (10, 90)
    cfg = load_config(CONFIG, [*base, "eclipse.keep_schedule=constant", "eclipse.keep_rate=0.6"])
    assert student_keep_rate(cfg, 1) == 0.6
    cfg = load_config(CONFIG, [*base, "eclipse.keep_warmup_steps=40"])
    assert student_keep_rate(cfg, 40) == 1.0 and student_keep_rate(cfg, 41) < 1.0
    cfg = load_config(CONFIG, [*base, "eclipse.expedite=none"])
    assert student_keep_rate(cfg, 100) == 1.0


# The ECLIPSE keys and defaults as documented (docs/methods.md "ECLIPSE"), written out here
# rather than read from the dataclass that generates the help text.
DOCUMENTED_ECLIPSE_DEFAULTS = {
    "enabled": False, "momentum": 0.995, "momentum_final": None, "keep_rate": 0.7, "keep_schedule": "cosine",
    "keep_warmup_steps": None, "keep_shrink_steps": None, "drop_layers": [], "fuse_tokens": True, "expedite": "evit", "kl_weight": 1.0,
    "text_stop_grad": True,
}


def test_help_config_and_a_loaded_config_give_the_documented_eclipse_defaults(capsys):
    """`train --help-config` lists exactly the documented ECLIPSE keys, each with its documented
    default and a help text; a config that sets none of them loads with those values."""
    import ast

    from trainer.cli import main
    from trainer.config import load_config

    assert main(["train", "--help-config"]) == 0
    listed = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("eclipse."):
            key, rest = line.removeprefix("eclipse.").split(" = ", 1)
            value, help_text = rest.split("  # ", 1)
            listed[key] = ast.literal_eval(value)
            assert len(help_text) > 10, key
    assert listed == DOCUMENTED_ECLIPSE_DEFAULTS
    cfg = load_config("trainer/configs/demo.yaml", [])
    assert {k: getattr(cfg.eclipse, k) for k in DOCUMENTED_ECLIPSE_DEFAULTS} == DOCUMENTED_ECLIPSE_DEFAULTS
