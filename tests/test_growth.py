"""GrowCLIP's checkpoint surgery (trainer/methods/growth.py): every growth operator preserves the
function (embeddings and loss within 1e-5 in fp32, with beta = 1), through the trainer's model
and through the exported ``transformers`` model; PIM moves the weights by exactly
``(1 - beta) (fresh - grown)``; a ZeRO-3 checkpoint of a 2-rank ECLIPSE run grows (teacher too)
and training continues from it at the ungrown model's loss; shapes no operator reaches, and
half-written or foreign output directories, are refused with exit 2."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import check, data_overrides, read_metrics, run_trainer
from test_train_e2e import CONFIG, FAST

SOURCE_STEPS = 4


def _cfg(overrides=(), tokenizer="runs/none"):
    from trainer.config import load_config
    return load_config(CONFIG, [*FAST, f"tokenizer.path={tokenizer}", "model.attn_implementation=eager",
                                *overrides])


@pytest.fixture(scope="module")
def tokenizer(demo_data):
    from trainer.data import load_tokenizer
    return load_tokenizer(str(demo_data / "tokenizer"))


def _trained_like(cfg, tokenizer, seed=0):
    """A model of ``cfg``'s shape with every weight moved off its init (zero biases too), so an
    operator that drops or misplaces any tensor shows in the outputs."""
    from trainer.model import build_model
    model = build_model(cfg.model, tokenizer, seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def _outputs(model, tokenizer, shape):
    from trainer.grow import _probe
    image, text, scale = _probe(model, tokenizer, shape, seed=3)
    logits = scale * image @ text.T
    labels = torch.arange(len(image))
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return image, text, loss


def _grow_in_process(old_cfg, new_cfg, tokenizer, model, **kw):
    from trainer.methods.growth import grow_state_dict
    from trainer.model import ClipTrainModel, build_clip_config, build_model, preset_shape
    fresh = build_model(new_cfg.model, tokenizer, 7).state_dict()
    sd = grow_state_dict(model.state_dict(), preset_shape(old_cfg.model), preset_shape(new_cfg.model), fresh, **kw)
    grown = ClipTrainModel(build_clip_config(new_cfg.model, tokenizer)).eval()
    grown.load_state_dict(sd)
    return grown, sd, fresh


WIDTH2 = ["model.vision_width=256", "model.vision_heads=8", "model.text_width=256", "model.text_heads=8"]
OPERATORS = {
    "depth": (["model.vision_layers=7", "model.text_layers=5"], []),
    "width-x2-heads-x2": (WIDTH2, []),
    "width-x2-heads-same": (["model.vision_width=256", "model.text_width=256"], []),   # head dim x2
    "width-x4-heads-x2": (["model.vision_width=512", "model.vision_heads=8"], []),
    "mlp-ratio": (["model.mlp_ratio=6"], []),
    "shared-new": (["model.vision_layers=6", "model.text_layers=6", "model.shared_layers=2"], []),
    "shared-more": (["model.vision_layers=5", "model.text_layers=5", "model.shared_layers=2"],
                    ["model.shared_layers=1"]),
    "combined": ([*WIDTH2, "model.mlp_ratio=5", "model.vision_layers=7", "model.text_layers=6",
                  "model.shared_layers=2"], []),
}


@pytest.mark.parametrize("split", ["equal", "random"])
@pytest.mark.parametrize("op", list(OPERATORS))
def test_operator_preserves_embeddings_and_loss(op, split, tokenizer, demo_data):
    from trainer.model import preset_shape
    new_over, old_over = OPERATORS[op]
    tok = str(demo_data / "tokenizer")
    old_cfg, new_cfg = _cfg(old_over, tok), _cfg([*old_over, *new_over], tok)
    model = _trained_like(old_cfg, tokenizer)
    grown, _, _ = _grow_in_process(old_cfg, new_cfg, tokenizer, model, split=split, seed=5)
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in model.parameters())
    shape = preset_shape(old_cfg.model)
    a, b = _outputs(model, tokenizer, shape), _outputs(grown, tokenizer, shape)
    for x, y, what in zip(a, b, ("image", "text", "loss")):
        assert torch.allclose(x, y, atol=1e-5, rtol=0), (op, split, what, float((x - y).abs().max()))
    if new_cfg.model.shared_layers:   # the grown model's shared layers are one module in both towers
        k, lv, lt = new_cfg.model.shared_layers, grown.config.vision_config.num_hidden_layers, \
            grown.config.text_config.num_hidden_layers
        assert grown.text_model.encoder.layers[lt - 1] is grown.vision_model.encoder.layers[lv - 1]
        assert grown.text_model.encoder.layers[lt - k - 1] is not grown.vision_model.encoder.layers[lv - k - 1]


def test_random_split_breaks_the_copies_symmetry(tokenizer, demo_data):
    """``--split random`` keeps the function but gives the stream copies different weights (so
    they can learn different things); the equal split makes exact copies."""
    tok = str(demo_data / "tokenizer")
    old_cfg, new_cfg = _cfg([], tok), _cfg(WIDTH2, tok)
    model = _trained_like(old_cfg, tokenizer)
    key = "vision_model.encoder.layers.1.mlp.fc1.weight"   # [4d, d] -> [8d, 2d]
    for split, differ in (("equal", False), ("random", True)):
        _, sd, _ = _grow_in_process(old_cfg, new_cfg, tokenizer, model, split=split, seed=5)
        w = sd[key]
        halves = w[:, :128], w[:, 128:]
        assert torch.allclose(halves[0] + halves[1], model.state_dict()[key].repeat(2, 1), atol=1e-6)
        assert (not torch.equal(halves[0], halves[1])) is differ


def test_pim_blends_with_the_fresh_init_by_beta(tokenizer, demo_data):
    tok = str(demo_data / "tokenizer")
    old_cfg, new_cfg = _cfg([], tok), _cfg(["model.vision_layers=6", "model.mlp_ratio=5"], tok)
    model = _trained_like(old_cfg, tokenizer)
    _, exact, fresh = _grow_in_process(old_cfg, new_cfg, tokenizer, model, beta=1.0)
    _, blended, _ = _grow_in_process(old_cfg, new_cfg, tokenizer, model, beta=0.7)
    for k, v in blended.items():
        if k.endswith("position_ids"):
            continue
        expected = exact[k] + 0.3 * (fresh[k] - exact[k])
        assert torch.allclose(v, expected, atol=1e-6), k
    moved = sum(float((blended[k] - exact[k]).norm() ** 2) for k in exact if not k.endswith("position_ids")) ** 0.5
    gap = sum(float((fresh[k] - exact[k]).norm() ** 2) for k in exact if not k.endswith("position_ids")) ** 0.5
    assert moved == pytest.approx(0.3 * gap, rel=1e-4)


# ------------------------------------------------------------------ through the verb, on a real run

@pytest.fixture(scope="module")
def source(demo_data, tmp_path_factory) -> Path:
    """A 2-rank ZeRO-3 run with an ECLIPSE teacher, checkpointed at step 4."""
    out = tmp_path_factory.mktemp("grow-source") / "small"
    check(run_trainer(["train", "--config", CONFIG, *data_overrides(demo_data, out), *FAST,
                       f"max_steps={SOURCE_STEPS}", "deepspeed.zero_stage=3", "eclipse.enabled=true",
                       "data.workers=0"], nproc=2))
    return out


GROWN = ["model.vision_width=256", "model.vision_heads=8", "model.vision_layers=6", "model.text_layers=5",
         "model.mlp_ratio=5"]


@pytest.fixture(scope="module")
def grown(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grown") / "g"
    check(run_trainer(["grow", "--checkpoint", str(source), "--out", str(out), "--pim-beta", "1",
                       "--split", "random", *GROWN]))
    return out


def _load(path):
    from trainer.data import load_tokenizer
    from trainer.methods import load_trained_model
    from trainer.sources import checkpoint_config
    cfg, root, tag = checkpoint_config(str(path))
    tok = load_tokenizer(cfg.tokenizer.path)
    return load_trained_model(cfg, root, tag, tok), tok, cfg


def test_grown_zero3_checkpoint_keeps_student_and_teacher_functions(source, grown):
    from trainer.model import preset_shape
    info = json.loads((grown / "grow.json").read_text())
    assert info["teacher"] and info["source_step"] == SOURCE_STEPS
    assert max(info["function_error"].values()) < 1e-5
    assert info["params"]["new"] > 2 * info["params"]["old"]
    small, tok, cfg = _load(source)
    big, _, big_cfg = _load(grown)
    assert preset_shape(big_cfg.model)["vision_width"] == 256 and big_cfg.checkpoint.init == str(grown)
    # EViT drops tokens in the same layers as before: 1, 2, 3 of 4 are 1, 3, 5 of 6 (new blocks
    # after layers 1 and 2), not the default relative depths of 6 (2, 3, 4)
    assert big_cfg.eclipse.drop_layers == [1, 3, 5]
    # the methods' schedules continue where the source's stood: step 4 of its 4
    assert (big_cfg.growth.schedules, big_cfg.growth.schedule_start, big_cfg.growth.schedule_steps) == \
        ("continue", SOURCE_STEPS, SOURCE_STEPS)
    shape = preset_shape(cfg.model)
    pixels = torch.randn(3, 3, shape["image_size"], shape["image_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for a, b in ((small.encode_image(pixels), big.encode_image(pixels)),
                     (small.teacher(pixels), big.teacher(pixels)),
                     _outputs(small, tok, shape)[1:2] + _outputs(big, tok, shape)[1:2]):
            assert torch.allclose(a, b, atol=1e-5, rtol=0), float((a - b).abs().max())
        # the teacher was grown from its own weights, not copied from the student
        assert not torch.allclose(big.teacher(pixels), big.encode_image(pixels), atol=1e-4)


def test_exported_grown_model_is_a_stock_clip_with_the_small_models_embeddings(source, grown, tmp_path):
    from transformers import CLIPModel
    from trainer.model import preset_shape
    small, tok, cfg = _load(source)
    shape = preset_shape(cfg.model)
    check(run_trainer(["export-hf", "--checkpoint", str(grown), "--out", str(tmp_path / "hf")]))
    hf = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.vision_config.hidden_size == 256 and hf.config.vision_config.num_hidden_layers == 6
    pixels = torch.randn(3, 3, shape["image_size"], shape["image_size"], generator=torch.Generator().manual_seed(1))
    enc = tok(["a red circle", "two blue squares on green", "x"], padding="max_length", truncation=True,
              max_length=shape["context_length"], return_tensors="pt")
    with torch.no_grad():
        ours_img, ours_txt = small.encode_image(pixels), small.encode_text(enc["input_ids"], enc["attention_mask"])
        img = F.normalize(hf.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        txt = F.normalize(hf.get_text_features(**enc).pooler_output, dim=-1)
    assert torch.allclose(img, ours_img, atol=1e-5) and torch.allclose(txt, ours_txt, atol=1e-5)


@pytest.mark.full   # the fast tier evaluates the grown weights in process (test_grown_zero3_checkpoint_keeps_...) and exports them
def test_eval_of_grown_directory_matches_its_source(source, grown, tmp_path):
    results = []
    for path in (source, grown):
        out = tmp_path / f"{path.name}.json"
        check(run_trainer(["eval", "--checkpoint", str(path), "--out", str(out)]))
        results.append(json.loads(out.read_text()))
    assert results[1]["step"] == SOURCE_STEPS
    for key in ("zeroshot_top1", "i2t_r1", "t2i_r5", "teacher/zeroshot_top1"):
        assert results[0][key] == pytest.approx(results[1][key], abs=2e-3), key


@pytest.mark.full   # trains the grown model again; its function preservation is checked in process by test_grown_zero3_checkpoint_keeps_student_and_teacher_functions
def test_training_from_the_grown_model_starts_at_the_small_models_loss(source, grown, tmp_path):
    """Both runs start their data stream at the beginning with the same seed, so their first batch
    is the same: the grown model (beta = 1) must give the ungrown model's loss on it, and a fresh
    model of the grown shape must not. The grown config continues the ECLIPSE schedules from the
    source's step 4 (keep rate at its end value, 0.7); the ungrown run is put at the same place."""
    common = ["max_steps=2", "deepspeed.zero_stage=3", "log.every_steps=1"]
    runs = {"ungrown": ["--config", str(source / "config.yaml"), f"checkpoint.init={source}",
                        f"growth.schedule_start={SOURCE_STEPS}", f"growth.schedule_steps={SOURCE_STEPS}"],
            "grown": ["--config", str(grown / "config.yaml")],
            "fresh": ["--config", str(grown / "config.yaml"), "checkpoint.init=null"]}
    first = {}
    for name, args in runs.items():
        out = tmp_path / name
        text = check(run_trainer(["train", *args, f"output_dir={out}", *common], nproc=2))
        assert ("started from the weights" in text) is (name != "fresh")
        first[name] = read_metrics(out)[0]
    assert first["grown"]["loss"] == pytest.approx(first["ungrown"]["loss"], abs=1e-5)
    assert first["grown"]["teacher_kl"] == pytest.approx(first["ungrown"]["teacher_kl"], abs=1e-5)
    assert abs(first["fresh"]["loss"] - first["grown"]["loss"]) > 1e-2


def test_grow_is_idempotent_and_refuses_another_request(source, grown):
    before = (grown / "weights.pt").stat().st_mtime_ns
    text = check(run_trainer(["grow", "--checkpoint", str(source), "--out", str(grown), "--pim-beta", "1",
                              "--split", "random", *GROWN]))
    assert "already holds this growth" in text and (grown / "weights.pt").stat().st_mtime_ns == before
    text = check(run_trainer(["grow", "--checkpoint", str(source), "--out", str(grown), *GROWN]), 2)
    assert "already exists and is not this growth" in text


@pytest.mark.parametrize("overrides, words", [
    (["model.vision_width=192"], "whole factors"),
    (["model.vision_width=256", "model.vision_heads=16"], "heads can only grow with the width"),
    (["model.vision_layers=3"], "never removes"),
    (["model.mlp_ratio=3"], "MLP can only grow"),
    (["model.embed_dim=128"], "model.embed_dim 64 -> 128"),
    (["optim.lr=0.1"], "not a model.* key"),
    (["model.vision_widht=256"], "vision_widht"),
])
def test_unreachable_shapes_exit_2_saying_why(source, tmp_path, overrides, words, capsys):
    from trainer.cli import main
    assert main(["grow", "--checkpoint", str(source), "--out", str(tmp_path / "g"), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and words in err and "Traceback" not in err, err
    assert not (tmp_path / "g").exists()


def test_half_written_or_mismatched_inits_are_refused(source, grown, tmp_path, demo_data, capsys):
    from trainer.cli import main
    partial = tmp_path / "partial"   # what a grow killed before its rename could never leave, but a copy might
    partial.mkdir()
    shutil.copy(grown / "weights.pt", partial / "weights.pt")
    shutil.copy(grown / "config.yaml", partial / "config.yaml")
    base = ["train", "--config", CONFIG, *data_overrides(demo_data, tmp_path / "run"), *FAST]
    assert main([*base, f"checkpoint.init={partial}", *GROWN]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err
    assert main([*base, f"checkpoint.init={grown}"]) == 2   # the demo shape, not the grown one
    err = capsys.readouterr().err
    assert "another shape" in err and "vision_width: 256 there, 128 here" in err, err


# ------------------------------------------------------------------ FLOPs and the growth search

@pytest.mark.parametrize("overrides", [[], ["model.vision_width=256", "model.vision_heads=8", "model.text_layers=6",
                                            "model.mlp_ratio=3", "model.shared_layers=2"]])
def test_flop_count_equals_torchs_flop_counter(overrides, tokenizer, demo_data):
    """The closed form equals what torch's FlopCounterMode counts in a real forward of one pair
    (every matmul, convolution and attention product; shared layers run in both towers)."""
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.experiments.growth_search import forward_flops_per_sample
    from trainer.model import build_model, preset_shape
    if "model.shared_layers=2" in overrides:
        overrides = [*overrides, "model.text_width=256", "model.text_heads=8"]
    cfg = _cfg(overrides, str(demo_data / "tokenizer"))
    model = build_model(cfg.model, tokenizer, 0).eval()
    s = preset_shape(cfg.model)
    ids = torch.randint(0, 100, (1, s["context_length"]))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=torch.randn(1, 3, s["image_size"], s["image_size"]), input_ids=ids,
              attention_mask=torch.ones_like(ids))
    assert forward_flops_per_sample(s) == counter.get_total_flops()


def test_default_search_leaves_out_candidates_the_run_cannot_train(source, capsys):
    """The ECLIPSE source drops tokens at layers 1-3 (EViT), so shared layers on top would drop
    text tokens too: the default shared candidate is left out, the others kept; a given one errs."""
    from trainer.config import ConfigError
    from trainer.experiments.growth_search import _trainable, default_candidates
    from trainer.sources import checkpoint_config
    from trainer.model import preset_shape
    cfg, root, tag = checkpoint_config(str(source))
    cands = default_candidates(preset_shape(cfg.model))
    assert set(cands) == {"deeper-vision", "deeper-text", "shared+2", "wider-x2"}
    kept = _trainable(cands, root / tag, [], 2, given=False)
    assert set(kept) == {"deeper-vision", "deeper-text", "wider-x2"}
    assert "'shared+2' left out" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="search candidate 'shared\\+2'"):
        _trainable(cands, root / tag, [], 2, given=True)


@pytest.mark.full   # the growth search trains every candidate; the grow verb itself is fast-tier tested above
def test_search_trains_candidates_at_equal_flops_and_picks_the_lowest_val_loss(source, tmp_path):
    import yaml

    from trainer.config import load_config
    cands = {"deeper": {"model.vision_layers": 6}, "wider": {"model.vision_width": 256, "model.vision_heads": 8}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cands))
    out = tmp_path / "search"
    check(run_trainer(["grow", "--checkpoint", str(source), "--out", str(out), "--search", str(tmp_path / "c.yaml"),
                       "--search-steps", "4", "--nproc", "1", "--pim-beta", "1", "data.workers=0"]))
    result = json.loads((out / "search.json").read_text())
    runs = {name: out / "sweep" / "runs" / name / "seed0" for name in cands}
    val = {name: json.loads((d / "eval.json").read_text())["val_loss"] for name, d in runs.items()}
    assert result["winner"] == min(val, key=val.get)
    assert (out / "winner").read_text().strip() == str((out / "candidates" / result["winner"]).resolve())
    assert {c["candidate"]: c["val_loss"] for c in result["candidates"]} == pytest.approx(val)
    # equal compute: the cheaper candidate trains 4 steps, the dearer the step count whose training
    # FLOPs (trainer/flops.py, ECLIPSE's teacher and dropped tokens included) come nearest
    from trainer import methods
    cfgs = {name: load_config(runs[name] / "config.yaml") for name in cands}
    spent = {name: methods.train_flops(c, c.max_steps, 1) for name, c in cfgs.items()}
    steps = {c["candidate"]: c["steps"] for c in result["candidates"]}
    cheap = min(cands, key=lambda n: spent[n] / steps[n])
    assert steps[cheap] == 4
    for name in cands:
        assert abs(spent[name] - spent[cheap]) <= 0.55 * spent[name] / steps[name]
        assert read_metrics(runs[name])[-1]["step"] == steps[name]
        assert read_metrics(runs[name])[-1]["flops"] == pytest.approx(spent[name], rel=1e-12)
        assert cfgs[name].optim.warmup_steps < steps[name]   # each its own warm-up
    assert "| candidate |" in (out / "search.md").read_text()
