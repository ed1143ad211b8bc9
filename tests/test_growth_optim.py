"""``grow --optimizer transform`` (trainer/methods/growth.py): the source's AdamW moments, read with
DeepSpeed's ``ds_to_universal`` (ZeRO 1/3) and from torch's state (ZeRO-0), agree with each other
and with the live optimizer's; the moment map matches the gradients a grown model really gets
(``g' = c gather(g)``, on width/heads/depth/MLP/shared-layer growth); a next stage started from
the transformed moments takes the ungrown model's first update on every inherited parameter (ZeRO
1/3 and 0 loading), unlike a reset start; a checkpoint without optimizer state is refused (exit 2).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import check, data_overrides, read_metrics, run_trainer

CONFIG = "trainer/configs/demo.yaml"
SRC_STEPS = 3
SRC = [f"max_steps={SRC_STEPS}", "data.batch_size=16", "data.workers=0", "deepspeed.precision=fp32",
       "log.progress=false", "log.every_steps=1"]
# One step at a constant learning rate, no clipping (the global norm would mix in the new blocks' gradients).
ONE_STEP = ["max_steps=1", "optim.warmup_steps=0", "optim.min_lr_ratio=1", "optim.grad_clip=0", "log.every_steps=1",
            "log.progress=false"]
DEPTH_MLP = ["model.vision_layers=6", "model.text_layers=5", "model.mlp_ratio=6"]
BETAS = (0.9, 0.98)   # trainer/configs/demo.yaml's optim.betas (the config default)


@pytest.fixture(scope="session")
def sources(demo_data, tmp_path_factory):
    """``sources(stage)``: a 2-rank, 3-step run at that ZeRO stage (the same seed and data for all)."""
    runs = {}

    def get(stage: int) -> Path:
        if stage not in runs:
            out = tmp_path_factory.mktemp(f"optim-src-z{stage}") / "run"
            check(run_trainer(["train", "--config", CONFIG, *data_overrides(demo_data, out), *SRC,
                               f"deepspeed.zero_stage={stage}"], nproc=2))
            runs[stage] = out
        return runs[stage]
    return get


def _moments(run: Path, work: Path):
    """(weights, step, exp_avg, exp_avg_sq) of a run's latest checkpoint, through grow's reader."""
    from trainer.sources import checkpoint_config, fp32_state_dict
    from trainer.grow import source_moments
    cfg, root, tag = checkpoint_config(str(run))
    weights = fp32_state_dict(root, tag)
    work.mkdir(parents=True, exist_ok=True)
    step, m, v = source_moments(root, tag, cfg, weights, work)
    assert not any(work.iterdir()), "the universal-checkpoint copy must be removed"
    return weights, step, m, v


def _agree(a: dict, b: dict, rel: float = 1e-5) -> None:
    """Equal up to fp32 rounding of two runs: per tensor within ``rel`` of its own scale, plus
    1e-6 of the whole state's (k_proj's bias has a zero gradient, so its moments are pure rounding)."""
    assert a.keys() == b.keys()
    scale = max(float(t.abs().max()) for t in a.values())
    for k in a:
        err = float((a[k] - b[k]).abs().max())
        assert err <= rel * float(a[k].abs().max()) + 1e-6 * scale, (k, err, float(a[k].abs().max()))


# ------------------------------------------------------------------------------ reading the moments

@pytest.mark.full   # a ZeRO-0 source run on top; the fast tier's transform tests read ZeRO-1 and ZeRO-3 moments and train from them on ZeRO 0, 1, 3
def test_moments_read_from_zero_0_1_3_agree_with_the_live_torch_state(sources, tmp_path):
    from trainer.config import load_config
    from trainer.data import load_tokenizer
    from trainer.methods import attach
    from trainer.model import build_model, param_groups

    got = {z: _moments(sources(z), tmp_path / f"z{z}") for z in (0, 1, 3)}
    trainable = {k for k in got[0][0] if not k.endswith("position_ids")}
    for z, (_, step, m, v) in got.items():
        assert step == SRC_STEPS and m.keys() == v.keys() == trainable, z
        assert all(float(t.abs().max()) > 0 for t in v.values()), z
    for a, b in ((0, 1), (1, 3), (0, 3)):
        _agree(got[a][2], got[b][2])
        _agree(got[a][3], got[b][3])

    # The reference: torch AdamW's own state of the ZeRO-0 run, in the engine's param-group order.
    ckpt = sources(0) / "checkpoints" / f"step_{SRC_STEPS}"
    cfg = load_config(ckpt / "config.yaml")
    model = build_model(cfg.model, load_tokenizer(cfg.tokenizer.path), cfg.seed)
    attach(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in param_groups(model, cfg.optim.weight_decay) for p in g["params"]]
    state = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["optimizer"]
    ref_m = {order[i]: s["exp_avg"] for i, s in state["state"].items()}
    ref_v = {order[i]: s["exp_avg_sq"] for i, s in state["state"].items()}
    assert {float(s["step"]) for s in state["state"].values()} == {float(SRC_STEPS)}
    for z in (1, 3):   # DeepSpeed's universal conversion of the partitioned states
        _agree(ref_m, {k: t.reshape(ref_m[k].shape) for k, t in got[z][2].items()})
        _agree(ref_v, {k: t.reshape(ref_v[k].shape) for k, t in got[z][3].items()})
    for k in ("visual_projection.weight", "vision_model.encoder.layers.0.mlp.fc1.weight"):
        assert torch.equal(got[0][2][k], ref_m[k])


# ------------------------------------------------------------------------------ the moment map

def _cfg(tokenizer_path, overrides=()):
    from trainer.config import load_config
    return load_config(CONFIG, ["model.context_length=24", "model.attn_implementation=eager",
                                f"tokenizer.path={tokenizer_path}", *overrides])


def _grads(model, tok, shape) -> dict:
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(4, 3, shape["image_size"], shape["image_size"], generator=g)
    enc = tok(["a photo of a red circle", "two blue squares", "a green triangle on grey", "x"], padding="max_length",
              truncation=True, max_length=shape["context_length"], return_tensors="pt")
    model.zero_grad()
    image, text, scale = model(pixel_values=pixels, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])[:3]
    logits = scale * image @ text.T
    labels = torch.arange(len(image))
    ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2).backward()
    return {n: p.grad.detach().clone().reshape(()) if n == "logit_scale" else p.grad.detach().clone()
            for n, p in model.named_parameters()}


WIDTH2 = ["model.vision_width=256", "model.vision_heads=8", "model.text_width=256", "model.text_heads=8"]
MAPS = {   # name: (old shape overrides, new shape overrides)
    "width-x2-heads-x2": ([], WIDTH2),
    "width-x2-heads-same": ([], ["model.vision_width=256", "model.text_width=256"]),   # q: sqrt(r) / f
    "width-x4-heads-x2": ([], ["model.vision_width=512", "model.vision_heads=8"]),
    "depth-mlp": ([], DEPTH_MLP),
    "shared-width-depth": (["model.vision_layers=5", "model.text_layers=5", "model.shared_layers=1"],
                           [*WIDTH2, "model.vision_layers=6", "model.text_layers=6", "model.shared_layers=2",
                            "model.mlp_ratio=5"]),
}


@pytest.mark.parametrize("case", list(MAPS))
def test_grown_models_gradients_are_the_mapped_old_gradients(case, demo_data):
    """At the function-preserving point (equal split, beta = 1) the grown model's gradient is
    ``c gather(g)`` on everything inherited: the rule ``m' = c gather(m)``, ``v' = c^2 gather(v)``
    keeps Adam's moments consistent with the gradients to come, independently of Adam."""
    from trainer.data import load_tokenizer
    from trainer.sources import fill_shared_layers
    from trainer.methods.growth import grow_moments, grow_state_dict
    from trainer.model import ClipTrainModel, build_clip_config, build_model, preset_shape

    tok = load_tokenizer(str(demo_data / "tokenizer"))
    old_o, new_o = MAPS[case]
    old_cfg, new_cfg = _cfg(demo_data / "tokenizer", old_o), _cfg(demo_data / "tokenizer", [*old_o, *new_o])
    old, new = preset_shape(old_cfg.model), preset_shape(new_cfg.model)
    model = build_model(old_cfg.model, tok, 0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():   # off the init, so zero biases and identity LayerNorms do not hide a wrong map
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    g_old = _grads(model, tok, old)
    fill_shared_layers(g_old, old, Path(case))
    fresh = build_model(new_cfg.model, tok, 7).state_dict()
    grown = ClipTrainModel(build_clip_config(new_cfg.model, tok))
    grown.load_state_dict(grow_state_dict(model.state_dict(), old, new, fresh, beta=1.0, split="equal"))
    g_new = _grads(grown, tok, old)

    m_map = grow_moments(g_old, old, new, fresh, 1)
    v_map = grow_moments({k: g * g for k, g in g_old.items()}, old, new, fresh, 2)
    inherited = grow_moments({k: torch.ones_like(g) for k, g in g_old.items()}, old, new, fresh, 0)
    assert set(g_new) <= set(m_map)
    scale = max(float(g.abs().max()) for g in g_new.values())
    for k, g in g_new.items():
        mask = inherited[k] != 0
        assert torch.equal(mask, (inherited[k] == 1)), k
        assert float(((g - m_map[k]) * mask).abs().max()) < 1e-5 * max(1.0, scale), k
        assert float(((g * g - v_map[k]) * mask).abs().max()) < 1e-5 * max(1.0, scale) ** 2, k
        assert not (m_map[k] * ~mask).any() and not (v_map[k] * ~mask).any(), k   # new: zero moments
    new_params = sum(int((~(inherited[k] != 0)).sum()) for k in g_new)
    assert (new_params > 0) == (case in ("depth-mlp", "shared-width-depth"))


def test_exactness_is_reported_for_the_random_split_and_pim():
    from trainer.methods.growth import TowerPlan, moments_exactness
    plans = {t: TowerPlan(f=2, g=1, heads=4, m=512, m2=1024, private=(4, 4), shared=(0, 0)) for t in ("vision", "text")}
    assert moments_exactness(plans, "equal", 1.0)["exact"]
    rnd = moments_exactness(plans, "random", 1.0)
    assert not rnd["exact"] and "--split random" in rnd["approximate"][0]
    assert "--pim-beta 0.9" in moments_exactness(plans, "equal", 0.9)["approximate"][0]


# ------------------------------------------------------------------------------ the next stage

def _grow(src: Path, out: Path, overrides=(), optimizer="transform") -> Path:
    from trainer.grow import grow
    return grow(str(src), str(out), list(overrides), beta=1.0, split="equal", optimizer=optimizer)


def _train_one_step(grown: Path, out: Path, stage: int) -> tuple[dict, dict]:
    check(run_trainer(["train", "--config", str(grown / "config.yaml"), f"output_dir={out}", *ONE_STEP,
                       f"deepspeed.zero_stage={stage}"], nproc=2))
    return read_metrics(out)[0], out


@pytest.mark.full   # fast tier: the ZeRO-3 source grown through the verb matches ZeRO-1
def test_transformed_start_takes_the_ungrown_models_first_update(sources, tmp_path):
    """Three next stages from the same ZeRO-1 checkpoint, each one step on the same first batch:
    A the identity growth (the ungrown model with its own moments), B depth + MLP growth (f = 1,
    so the map is exact), both ``--optimizer transform``, and C = B's growth with ``reset``.
    B's inherited parameters must take A's step; C's must not. B minus C also shows that the
    moments and step were set in the engine: ``m_B - m_C = beta1 m0``, ``v_B - v_C = beta2 v0``."""
    from trainer.methods.growth import grow_moments
    from trainer.model import preset_shape
    from trainer.sources import checkpoint_config

    src = sources(1)
    a, b, c = (_grow(src, tmp_path / "A"), _grow(src, tmp_path / "B", DEPTH_MLP),
               _grow(src, tmp_path / "C", DEPTH_MLP, optimizer="reset"))
    assert not list(tmp_path.glob(".*tmp*")), "grow's tmp dir (and the universal copy in it) must be gone"
    assert (a / "optimizer.pt").is_file() and (b / "optimizer.pt").is_file() and not (c / "optimizer.pt").exists()
    info = json.loads((b / "grow.json").read_text())["optimizer"]
    assert info["mode"] == "transform" and info["step"] == SRC_STEPS and info["exact"]

    runs = {"A": _train_one_step(a, tmp_path / "run-A", 1), "B": _train_one_step(b, tmp_path / "run-B", 3),
            "C": _train_one_step(c, tmp_path / "run-C", 3), "A0": _train_one_step(a, tmp_path / "run-A0", 0)}
    assert runs["B"][0]["loss"] == pytest.approx(runs["A"][0]["loss"], abs=1e-5)   # the same batch and function
    after = {name: _moments(out, tmp_path / f"work-{name}") for name, (_, out) in runs.items()}

    old_cfg, _, _ = checkpoint_config(str(a))
    new_cfg, _, _ = checkpoint_config(str(b))
    old, new = preset_shape(old_cfg.model), preset_shape(new_cfg.model)
    fresh = {k: torch.zeros_like(t) for k, t in torch.load(b / "weights.pt").items()}
    weights = lambda name: {k: t.detach() for k, t in after[name][0].items() if not k.endswith("position_ids")}  # noqa: E731
    inherited = grow_moments({k: torch.ones_like(t) for k, t in weights("A").items()}, old, new, fresh, 0)
    a_grown = grow_moments(weights("A"), old, new, fresh, 0)   # f = 1: the weights' map is the plain gather
    before = {k: t for k, t in torch.load(b / "weights.pt").items() if not k.endswith("position_ids")}
    worst_b = worst_c = moved = 0.0
    for k, wb in weights("B").items():
        mask = inherited[k].reshape(wb.shape) != 0
        ref = a_grown[k].reshape(wb.shape)
        worst_b = max(worst_b, float(((wb - ref) * mask).abs().max()))
        worst_c = max(worst_c, float(((weights("C")[k] - ref) * mask).abs().max()))
        moved = max(moved, float(((wb - before[k].reshape(wb.shape)) * mask).abs().max()))
    assert moved > 1e-4                      # the step did something
    assert worst_b < 1e-5, worst_b           # B took A's step on every inherited parameter
    assert worst_c > 1e-4, worst_c           # ... which a reset optimizer does not
    _agree(weights("A"), weights("A0"))      # ZeRO-0 loads the moments too (torch's AdamW directly)

    m0 = torch.load(b / "optimizer.pt")
    assert after["B"][1] == SRC_STEPS + 1 and after["C"][1] == 1 and after["A"][1] == SRC_STEPS + 1
    for i, key, beta in ((2, "exp_avg", BETAS[0]), (3, "exp_avg_sq", BETAS[1])):
        diff = {k: after["B"][i][k] - after["C"][i][k] for k in after["B"][i]}
        want = {k: beta * m0[key][k].reshape(diff[k].shape) for k in diff}
        scale = max(float(t.abs().max()) for t in after["B"][i].values())
        for k in diff:
            assert float((diff[k] - want[k]).abs().max()) < 1e-5 * scale, (key, k)


def test_zero3_source_grows_through_the_verb_and_matches_zero1(sources, tmp_path):
    from trainer.sources import OPTIM, grown_weights
    out3 = tmp_path / "g3"
    text = check(run_trainer(["grow", "--checkpoint", str(sources(3)), "--out", str(out3), "--pim-beta", "1",
                              "--optimizer", "transform", *WIDTH2]))
    assert "moments transformed at step 3 (exact)" in text
    info = json.loads((out3 / "grow.json").read_text())
    assert info["request"]["optimizer"] == "transform" and info["optimizer"]["exact"]
    out1 = _grow(sources(1), tmp_path / "g1", WIDTH2)
    s3, s1 = torch.load(out3 / OPTIM), torch.load(out1 / OPTIM)
    assert s3["step"] == s1["step"] == SRC_STEPS
    assert set(s3["exp_avg"]) == {k for k in grown_weights(out3) if not k.endswith("position_ids")}
    _agree(s1["exp_avg"], s3["exp_avg"])
    _agree(s1["exp_avg_sq"], s3["exp_avg_sq"])
    assert not list(tmp_path.glob(".*tmp*"))


def test_transform_without_optimizer_state_exits_2(sources, tmp_path, capsys):
    from trainer.cli import main
    ckpt = sources(1) / "checkpoints" / f"step_{SRC_STEPS}"
    bare = tmp_path / "bare" / "step_3"
    shutil.copytree(ckpt, bare, ignore=shutil.ignore_patterns("*optim_states.pt"))
    assert main(["grow", "--checkpoint", str(bare), "--out", str(tmp_path / "g"), "--optimizer", "transform"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "has no optimizer state" in err and "--optimizer reset" in err, err
    reset = _grow(ckpt, tmp_path / "reset", optimizer="reset")
    assert main(["grow", "--checkpoint", str(reset), "--out", str(tmp_path / "g"), "--optimizer", "transform"]) == 2
    err = capsys.readouterr().err
    assert "without optimizer.pt" in err and "Traceback" not in err, err
    assert not (tmp_path / "g").exists() and not list(tmp_path.glob(".*tmp*"))
