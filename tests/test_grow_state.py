"""Growing a run keeps what it learned about its data and teachers (trainer/grow.py, the methods'
growth hooks in trainer/methods/base.py): ECL's kept set, round counter and scores carry into the
grown stage; PSD's own teacher is grown with the student's operator (or restarted from the
student by ``psd.inherit_teacher=false``); the methods' schedules continue from the source run's
position (``growth.schedules=continue``, the default) or restart."""
from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import check, data_overrides, read_metrics, run_trainer
from test_growth import _cfg, _trained_like
from test_train_e2e import CONFIG, FAST

STEPS1 = 5   # stage 1: ECL rounds at steps 2 and 4 (keep 0.75: 256 -> 192 -> 144 pairs)
GROWN = ["model.vision_layers=6", "model.vision_width=256", "model.vision_heads=8", "model.text_layers=5"]


# ------------------------------------------------------------------ in process (fast)

@pytest.fixture(scope="module")
def tokenizer(demo_data):
    from trainer.data import load_tokenizer
    return load_tokenizer(str(demo_data / "tokenizer"))


def test_schedules_continue_from_the_source_position_or_restart(demo_data, tokenizer):
    """``growth.schedules=continue`` evaluates ECLIPSE's keep rate and momentum and PSD's a_t at the
    source run's position + t over the source's length (what ``grow`` writes into the grown
    config); ``restart`` at t over max_steps. Checked through the methods the train step calls,
    against the schedules' closed forms."""
    from trainer.methods.eclipse import Eclipse, attach
    from trainer.methods.psd import Psd
    from trainer.model import build_model
    from trainer.methods.evit import keep_rate_of
    tok = str(demo_data / "tokenizer")
    common = ["max_steps=10", "optim.warmup_steps=2", "eclipse.enabled=true", "eclipse.keep_rate=0.5",
              "eclipse.momentum=0.9", "eclipse.momentum_final=1.0", "psd.enabled=true", "psd.alpha_max=0.4"]
    # the grown config of a source run stopped at step 30 of a 100-step schedule
    grown = ["growth.schedule_start=30", "growth.schedule_steps=100"]
    expect = {
        # continue: position 30 + t of 100
        # (the keep rate: 1 through the warm-up of 2, then a cosine over a third of the schedule's length)
        "continue": lambda t: (0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * min(1.0, (30 + t - 2) / 33))),
                               1.0 - 0.1 * 0.5 * (1 + math.cos(math.pi * (30 + t) / 100)), 0.4 * (30 + t) / 100),
        # restart: t of max_steps = 10, keep rate 1 through the warm-up again
        "restart": lambda t: (1.0 if t <= 2 else 0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * min(1.0, (t - 2) / 3))),
                              1.0 - 0.1 * 0.5 * (1 + math.cos(math.pi * t / 10)), 0.4 * t / 10)}
    for mode, formula in expect.items():
        cfg = _cfg([*common, *grown, f"growth.schedules={mode}"], tok)
        model = build_model(cfg.model, tokenizer, 0)
        attach(model, cfg)
        engine = SimpleNamespace(module=model, dp_world_size=1, device=torch.device("cpu"))
        ecl, psd = Eclipse(cfg, engine), Psd(cfg, engine)
        for t in (1, 4, 9):
            keep, momentum, alpha = formula(t)
            ecl.prepare(t)
            assert keep_rate_of(model.vision_model) == pytest.approx(keep, abs=1e-9), (mode, t)
            assert ecl.teacher.momentum(t) == pytest.approx(momentum, abs=1e-9), (mode, t)
            assert psd.alpha(t) == pytest.approx(alpha, abs=1e-9), (mode, t)
    # a run that is no later stage (the keys at their defaults) sees its own steps
    from trainer.methods.base import schedule_clock
    plain = _cfg(common, tok)
    assert [schedule_clock(plain, t) for t in (1, 10)] == [(1, 10), (10, 10)]


def test_psd_teacher_grows_with_the_students_operator(demo_data, tokenizer):
    """PSD's two-tower teacher (``psd_teacher.*``), here different from the student, is grown by
    the student's operator (deeper, shared layers on top of both towers, a wider MLP): the grown
    teacher computes the old teacher's embeddings. (Width growth of a copy: ECLIPSE's teacher in
    test_growth.py, PSD's in the full-tier run below.)"""
    from trainer.methods.growth import TEACHER, grow_state_dict
    from trainer.methods.psd import PREFIX, PairTeacher
    from trainer.model import build_model, preset_shape
    tok = str(demo_data / "tokenizer")
    old_cfg = _cfg([], tok)
    new_cfg = _cfg(["model.vision_layers=6", "model.text_layers=6", "model.shared_layers=2", "model.mlp_ratio=5"], tok)
    student, other = _trained_like(old_cfg, tokenizer, 0), _trained_like(old_cfg, tokenizer, 5)
    teacher = PairTeacher(other).eval()
    sd = {**student.state_dict(), **{PREFIX + k: v for k, v in teacher.state_dict().items()}}
    fresh = build_model(new_cfg.model, tokenizer, 7).state_dict()
    grown = grow_state_dict(sd, preset_shape(old_cfg.model), preset_shape(new_cfg.model), fresh,
                            copies=(TEACHER, PREFIX))
    big = PairTeacher(build_model(new_cfg.model, tokenizer, 0)).eval()
    big.load_state_dict({k[len(PREFIX):]: v for k, v in grown.items() if k.startswith(PREFIX)})
    shape = preset_shape(old_cfg.model)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, shape["image_size"], shape["image_size"], generator=g)
    enc = tokenizer(["a red circle", "two blue squares on green", "x"], padding="max_length", truncation=True,
                    max_length=shape["context_length"], return_tensors="pt")
    with torch.no_grad():
        before = teacher(pixels, enc["input_ids"], enc["attention_mask"])
        after = big(pixels, enc["input_ids"], enc["attention_mask"])
        own = student.encode_image(pixels)
    for a, b in zip(before, after):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), float((a - b).abs().max())
    assert not torch.allclose(before[0], own, atol=1e-3)   # the teacher is its own, not the student


def test_selection_continues_the_carried_rounds_only_on_their_kept_set(demo_data, tmp_path):
    """A grown stage's selection takes the carried round counter and kept set when its
    ``data.manifest`` is that kept set (the grown config's); other data restarts the rounds."""
    from trainer.methods.base import Inherited
    from trainer.methods.selection import Selection
    kept = str(tmp_path / "select" / "round_002")
    carried = Inherited(tmp_path, state={"select": {"rounds": 2, "manifest": kept}})
    base = [f"data.train_shards={demo_data}/train", "select.enabled=true", "select.every_steps=3"]
    sel = Selection(_cfg([*base, f"data.manifest={kept}"]), 0, 1)
    sel.inherit(carried)
    assert sel.state == {"rounds": 2, "manifest": kept, "last_step": 0} and sel.data_manifest() == kept
    assert sel.due(3) and not sel.due(2)
    other = Selection(_cfg(base), 0, 1)
    other.inherit(carried)
    assert other.state == {"rounds": 0, "manifest": None, "last_step": 0}


@pytest.mark.parametrize("text_width", [256, pytest.param(384, marks=pytest.mark.full)], ids=["x2", "x3"])
def test_text_lm_term_is_preserved_by_width_growth(demo_data, tokenizer, text_width):
    """The text stream's tied head ``h @ E^T``: width growth x f tiles both ``h`` (after the final
    LayerNorm) and the token embedding ``E``, so the dot products come out f times larger; the
    grown config's ``text_lm.head_scale`` (1/f, written by the method's grown_config) gives the
    grown model the source's next-token loss on the same texts. Depth growth leaves it alone.
    (The method hands the scale to the forward: the staged run's first loss after a width growth,
    tests/test_efficient_staged.py.)"""
    from trainer.grow import spelled_out
    from trainer.methods import grown_config
    from trainer.methods.growth import check_growth, grow_state_dict, grown_layer_index
    from trainer.methods.text_lm import clm_labels
    from trainer.model import ClipTrainModel, build_clip_config, build_model, preset_shape
    tok = str(demo_data / "tokenizer")
    lm = ["text_lm.enabled=true", f"text_lm.shards={demo_data}/text"]
    old_cfg = _cfg(lm, tok)
    new_cfg = _cfg([*lm, f"model.text_width={text_width}", f"model.text_heads={text_width // 32}",
                    "model.text_layers=5"], tok)
    old_shape, new_shape = preset_shape(old_cfg.model), preset_shape(new_cfg.model)
    model = _trained_like(old_cfg, tokenizer)
    fresh = build_model(new_cfg.model, tokenizer, 7).state_dict()
    grown = ClipTrainModel(build_clip_config(new_cfg.model, tokenizer)).eval()
    grown.load_state_dict(grow_state_dict(model.state_dict(), old_shape, new_shape, fresh, beta=1.0))
    plans = check_growth(old_shape, new_shape)
    raw = spelled_out(new_cfg, new_shape)
    grown_config(raw, old_cfg, {}, lambda tower, i: grown_layer_index(plans[tower], i))
    scale = raw["text_lm"]["head_scale"]
    assert scale == pytest.approx(128 / text_width)
    enc = tokenizer(["a red circle on a blue square", "two green triangles", "x"], padding="max_length",
                    truncation=True, max_length=old_shape["context_length"], return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        before = float(model.text_lm_loss(ids, mask, clm_labels(ids, mask)))
        after = float(grown.text_lm_loss(ids, mask, clm_labels(ids, mask), head_scale=scale))
        unscaled = float(grown.text_lm_loss(ids, mask, clm_labels(ids, mask)))   # what the old code trained on
    assert before > 1.0
    assert after == pytest.approx(before, abs=1e-5), (before, after)
    assert abs(unscaled - before) > 0.01, (unscaled, before)
    deeper = spelled_out(_cfg([*lm, "model.text_layers=6"], tok), preset_shape(_cfg(["model.text_layers=6"], tok).model))
    grown_config(deeper, old_cfg, {}, lambda tower, i: i)
    assert deeper["text_lm"]["head_scale"] == 1.0


# ------------------------------------------------------------------ through the verbs, on real runs (full)

@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> Path:
    from trainer.demo_data import make_demo_data
    out = tmp_path_factory.mktemp("grow-state-data")
    make_demo_data(out, num_train=256, num_val=32, num_text=8, noise_rate=0.3, seed=4, shard_size=128)
    return out


# select.score=cosine: the carried-scores test recomputes each score as the cosine of the grown model
# (ECL's default score became the self-confidence, select.score, after this test was written).
COMMON = [*FAST, "data.workers=0", "data.val_shards=null", "checkpoint.every_steps=100", "select.batch_size=64",
          "select.score=cosine",
          "psd.enabled=true", "psd.teacher=momentum", "psd.momentum=0.5", "psd.schedule=constant",
          "psd.teacher_tau=1.0"]


@pytest.fixture(scope="module")
def noisy_tok(noisy):
    from trainer.data import load_tokenizer
    return load_tokenizer(str(noisy / "tokenizer"))


def _load_all_but_buffers(module: torch.nn.Module, sd: dict) -> None:
    missing, unexpected = module.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing[:3], unexpected[:3])


@pytest.fixture(scope="module")
def stage1(noisy, tmp_path_factory) -> Path:
    """A run with two ECL rounds and a PSD momentum teacher of its own (ECLIPSE off)."""
    out = tmp_path_factory.mktemp("grow-state-s1") / "small"
    check(run_trainer(["train", "--config", CONFIG, *data_overrides(noisy, out), *COMMON, f"max_steps={STEPS1}",
                       "select.enabled=true", "select.every_steps=2", "select.keep=0.75"]))
    return out


@pytest.fixture(scope="module")
def grown1(stage1, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grow-state-g") / "g"
    check(run_trainer(["grow", "--checkpoint", str(stage1), "--out", str(out), "--pim-beta", "1", *GROWN]))
    return out


@pytest.fixture(scope="module")
def stage2(grown1, tmp_path_factory) -> Path:
    """The grown config trained 2 steps, with a round after step 1."""
    out = tmp_path_factory.mktemp("grow-state-s2") / "big"
    check(run_trainer(["train", "--config", str(grown1 / "config.yaml"), f"output_dir={out}", "max_steps=2",
                       "select.every_steps=1"]))
    return out


def _keys(manifest: Path) -> list[str]:
    return (manifest / "manifest.txt").read_text().split()


def _scores(d: Path) -> dict[str, float]:
    return {r["key"]: r["score"] for r in map(json.loads, (d / "scores.jsonl").read_text().splitlines())}


@pytest.mark.full   # three training runs and a grow (about a minute on 2 cores)
def test_grown_stage_reads_the_last_kept_set_and_starts_at_the_ungrown_loss(stage1, grown1, stage2, noisy, tmp_path):
    from trainer import data as D
    from trainer.config import load_config
    from trainer.train import TrainData
    last = (stage1 / "select" / "round_002").resolve()
    assert len(_keys(last)) == 144 and len(set(_keys(last))) == 144
    cfg = yaml.safe_load((grown1 / "config.yaml").read_text())
    assert cfg["data"]["manifest"] == str(last)
    info = json.loads((grown1 / "grow.json").read_text())
    assert info["carried"] == {"select": {"rounds": 2, "manifest": str(last)}}
    # the state the grown stage read its data with (checkpointed at step 1, before its round)
    state = torch.load(stage2 / "checkpoints" / "step_1" / "trainer_state" / "rank_0.pt", weights_only=False)
    assert state["select"] == {"rounds": 2, "manifest": str(last), "last_step": 0}
    run_cfg = load_config(stage2 / "config.yaml", ["data.workers=0"])
    tok = D.load_tokenizer(run_cfg.tokenizer.path)
    decoder = D.SampleDecoder(tok, 24, D.build_transforms(64, [0.5] * 3, [0.5] * 3, 0.9, train=True))
    td = TrainData(run_cfg, decoder, 0, 1, None, manifest=state["select"]["manifest"])
    seen = {k for _ in range(12) for k in td.next()["keys"]}
    assert seen <= set(_keys(last)) and len(seen) > 100
    # The same first batch: the ungrown model on the kept set gives the grown model's first loss.
    ref = tmp_path / "ungrown"
    check(run_trainer(["train", "--config", str(stage1 / "config.yaml"), f"checkpoint.init={stage1}",
                       f"output_dir={ref}", "max_steps=1", f"data.manifest={last}", "select.enabled=false"]))
    a, b = read_metrics(stage2)[0], read_metrics(ref)[0]
    assert a["step"] == b["step"] == 1
    assert a["self_distill"] > 0.1   # the teacher's soft targets are in the loss
    for term in ("loss", "clip", "self_distill"):
        assert a[term] == pytest.approx(b[term], abs=1e-5), term


@pytest.mark.full   # shares the runs of the test above
def test_grown_stage_continues_the_round_counter_and_the_carried_scores(stage1, grown1, stage2, noisy_tok):
    """Round 3 (not 1) follows in the grown stage, scores round 2's kept set, and each score is
    round 2's carried score plus the cosine of the grown model at that step (recomputed here from
    its checkpoint and the shards, read with tarfile)."""
    from trainer import data as D
    from trainer.methods import load_trained_model
    from trainer.sources import checkpoint_config
    last = (stage1 / "select" / "round_002").resolve()
    assert not (stage2 / "select" / "round_001").exists()
    rnd = stage2 / "select" / "round_003"
    summary = json.loads((rnd / "summary.json").read_text())
    assert summary["round"] == 3 and summary["step"] == 1 and summary["manifest_in"] == str(last)
    assert summary["scores_from"] == [str(last)] and summary["total"] == 144 and summary["kept"] == 108
    carried, now = _scores(last), _scores(rnd)
    assert set(now) == set(_keys(last)) and set(_keys(rnd)) <= set(now)
    cfg, root, tag = checkpoint_config(str(stage2 / "checkpoints" / "step_1"))
    model = load_trained_model(cfg, root, tag, noisy_tok)
    decoder = D.eval_decoder(cfg, noisy_tok)
    samples = {}
    for tar in sorted(Path(cfg.data.train_shards).glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                if key in now:
                    samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    keys = sorted(now)
    items = [decoder(samples[k]) for k in keys]
    batch = decoder.collate(items)
    with torch.no_grad():
        image, text, _ = model(pixel_values=D.model_pixels(cfg)(batch["image"], "cpu", torch.float32),
                               input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[:3]
    cos = (image * text).sum(-1).double()
    for k, c in zip(keys, cos.tolist()):
        assert now[k] == pytest.approx(carried[k] + c, abs=1e-5), k


@pytest.mark.full   # shares the runs of the tests above
def test_psd_teacher_is_grown_and_the_grown_stage_starts_from_it(stage1, grown1, stage2, noisy_tok):
    """grow writes PSD's teacher grown (it computes the source's teacher's embeddings, which are
    not the source student's), and the grown stage's EMA starts from it: after its step 1 the
    teacher is m * grown teacher + (1 - m) * student(step 1), m = psd.momentum = 0.5."""
    from trainer.methods.psd import PREFIX, PairTeacher, teacher_state_dict
    from trainer.model import build_model, preset_shape
    from trainer.sources import checkpoint_config, fp32_state_dict, grown_weights
    small_cfg, root, tag = checkpoint_config(str(stage1))
    big_cfg, _, _ = checkpoint_config(str(grown1))
    weights = grown_weights(grown1)
    grown_teacher = {k[len(PREFIX):]: v for k, v in weights.items() if k.startswith(PREFIX)}
    assert grown_teacher and json.loads((grown1 / "grow.json").read_text())["copies"] == [PREFIX]
    tokenizer = noisy_tok
    small = PairTeacher(build_model(small_cfg.model, tokenizer, 0)).eval()
    _load_all_but_buffers(small, teacher_state_dict(root, tag))
    big = PairTeacher(build_model(big_cfg.model, tokenizer, 0)).eval()
    _load_all_but_buffers(big, grown_teacher)
    student = build_model(small_cfg.model, tokenizer, 0).eval()
    _load_all_but_buffers(student, {k: v for k, v in fp32_state_dict(root, tag).items() if not k.startswith(PREFIX)})
    shape = preset_shape(small_cfg.model)
    pixels = torch.randn(4, 3, shape["image_size"], shape["image_size"], generator=torch.Generator().manual_seed(2))
    enc = tokenizer(["a red circle", "two blue squares", "a green triangle on grey", "x"], padding="max_length",
                    truncation=True, max_length=shape["context_length"], return_tensors="pt")
    with torch.no_grad():
        a = small(pixels, enc["input_ids"], enc["attention_mask"])
        b = big(pixels, enc["input_ids"], enc["attention_mask"])
        s = student.encode_image(pixels)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-5, rtol=0), float((x - y).abs().max())
    assert not torch.allclose(a[0], s, atol=1e-4)
    # the grown stage's teacher after its step 1, against the EMA of the grown teacher
    r2, t2 = stage2 / "checkpoints", "step_1"
    after = teacher_state_dict(r2, t2)
    student1 = fp32_state_dict(r2, t2)
    assert set(after) == set(grown_teacher)
    for k, v in after.items():
        expected = 0.5 * grown_teacher[k] + 0.5 * student1[k]
        assert torch.allclose(v, expected, atol=1e-6), (k, float((v - expected).abs().max()))
