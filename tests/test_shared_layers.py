"""GrowCLIP's shared encoder (``model.shared_layers = k``): the towers' top k layers are one set of
weights. References: an untied ``transformers.CLIPModel`` loaded with the same state dict (its
forward, its gradients summed over the two copies), parameter counts in closed form, and 2-rank
runs under ZeRO-0 (plain replicated weights) against ZeRO-3 (a module partitioned and gathered
twice per forward, once per tower)."""
from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel

from conftest import ROOT, check, data_overrides, read_metrics, run_trainer, trainer_cmd, trainer_env
from test_train_e2e import CONFIG, FAST as E2E_FAST

# Without loader workers: tied layers are not about the data path (tests/test_train_e2e.py runs two).
FAST = [*E2E_FAST, "data.workers=0"]

from trainer.config import ConfigError, load_config
from trainer.model import ClipTrainModel, build_clip_config, build_model, preset_shape

K = 2          # shared layers of the tiny preset's 4 + 4
STEPS = 6      # checkpoints at 3 and 6
SHARED = [f"model.shared_layers={K}"]


class Tok:  # the few tokenizer attributes the model needs
    eos_token_id, pad_token_id, bos_token_id = 3, 0, 2

    def __len__(self):
        return 500


def _inputs(context: int, n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 64, 64, generator=g)
    ids = torch.randint(4, 500, (n, context), generator=g)
    lengths = [context, 9, 5][:n]
    mask = torch.zeros(n, context, dtype=torch.long)
    for i, length in enumerate(lengths):   # padded captions: the end token, then pads the mask hides
        ids[i, length - 1], ids[i, length:] = 3, 0
        mask[i, :length] = 1
    return x, ids, mask


def _layer_numel(model, tower: str, i: int) -> int:
    return sum(p.numel() for p in getattr(model, tower).encoder.layers[i].parameters())


# --------------------------------------------------------------------------- the model, in process


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tied_model_matches_an_untied_clip_model(attn):
    cfg = load_config(CONFIG, [*SHARED, f"model.attn_implementation={attn}"])
    model = build_model(cfg.model, Tok(), seed=0).eval()
    vl, tl = model.vision_model.encoder.layers, model.text_model.encoder.layers
    for i in range(K):   # the layout the growth code relies on
        assert tl[len(tl) - K + i] is vl[len(vl) - K + i]
    for i in range(len(tl) - K):
        assert all(tl[i] is not v for v in vl)
    sd = model.state_dict()
    plain = CLIPModel(model.config)   # ignores config.shared_layers: an untied model
    assert list(sd) == list(plain.state_dict())   # CLIPModel's layout, both towers' keys
    for i in range(K):
        v, t = f"vision_model.encoder.layers.{2 + i}.mlp.fc1.weight", f"text_model.encoder.layers.{2 + i}.mlp.fc1.weight"
        assert sd[v].data_ptr() == sd[t].data_ptr()
    plain.load_state_dict(sd)
    plain.eval()
    # Parameters are counted once: the untied model has k more layers' worth.
    shared_numel = sum(_layer_numel(model, "vision_model", 2 + i) for i in range(K))
    assert shared_numel == K * (4 * (128 * 128 + 128) + 2 * 128 * 512 + 512 + 128 + 4 * 128)
    assert sum(p.numel() for p in plain.parameters()) - sum(p.numel() for p in model.parameters()) == shared_numel

    x, ids, mask = _inputs(cfg.model.context_length)
    with torch.no_grad():
        img, txt, _ = model(pixel_values=x, input_ids=ids, attention_mask=mask)
        want_img = F.normalize(plain.get_image_features(pixel_values=x).pooler_output, dim=-1)
        want_txt = F.normalize(plain.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, dim=-1)
    torch.testing.assert_close(img, want_img, rtol=0, atol=1e-6)
    torch.testing.assert_close(txt, want_txt, rtol=0, atol=1e-6)
    # The shared weights matter to the text tower: an untied model with the text tower's own
    # initial top layers gives other text embeddings (the tie is not a no-op).
    untied = ClipTrainModel(build_clip_config(load_config(CONFIG, []).model, Tok()))
    untied.load_state_dict({k: v for k, v in sd.items() if not k.startswith("text_model.encoder.layers.3")},
                           strict=False)
    with torch.no_grad():
        other = untied.eval().encode_text(ids, mask)
    assert (other - txt).abs().max() > 1e-3


def test_shared_gradient_is_the_sum_of_both_towers_gradients():
    cfg = load_config(CONFIG, SHARED)
    model = build_model(cfg.model, Tok(), seed=0).train()
    plain = CLIPModel(model.config)
    plain.load_state_dict(model.state_dict())
    x, ids, mask = _inputs(cfg.model.context_length, seed=1)

    def loss(img, txt, scale):
        return F.cross_entropy(scale * img @ txt.T, torch.arange(len(img)))
    loss(*model(pixel_values=x, input_ids=ids, attention_mask=mask)).backward()
    img = F.normalize(plain.get_image_features(pixel_values=x).pooler_output, dim=-1)
    txt = F.normalize(plain.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, dim=-1)
    loss(img, txt, plain.logit_scale.exp()).backward()
    ref = dict(plain.named_parameters())
    checked = 0
    for name, p in model.named_parameters():   # each shared tensor under one (the text tower's) name
        if name.startswith("text_model.encoder.layers.") and int(name.split(".")[3]) >= 4 - K:
            vision = name.replace("text_model", "vision_model", 1)
            want = ref[name].grad + ref[vision].grad
            assert ref[name].grad.abs().max() > 0 and ref[vision].grad.abs().max() > 0, name
            checked += 1
        else:
            want = ref[name].grad.reshape(p.shape)
        torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-7, msg=name)
    assert checked == K * 16


def test_a_clip_model_state_dict_loads_strictly_into_the_tied_model():
    cfg = load_config(CONFIG, SHARED)
    c = build_clip_config(cfg.model, Tok())
    assert c.shared_layers == K
    torch.manual_seed(5)
    source = CLIPModel(c).state_dict()   # untied: make the shared copies agree, as a trained tied model's do
    for i in range(K):
        for key in [k for k in source if k.startswith(f"vision_model.encoder.layers.{2 + i}.")]:
            source[key.replace(f"vision_model.encoder.layers.{2 + i}.", f"text_model.encoder.layers.{2 + i}.")] = \
                source[key].clone()
    model = ClipTrainModel(c)
    result = model.load_state_dict(source, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    got = model.state_dict()
    assert got.keys() == source.keys()
    for key in source:
        assert torch.equal(got[key].reshape(source[key].shape), source[key]), key
    # No sharing: the same key set, the towers' top layers distinct modules.
    plain = ClipTrainModel(build_clip_config(load_config(CONFIG, []).model, Tok()))
    assert not hasattr(plain.config, "shared_layers") or plain.config.shared_layers == 0
    assert plain.state_dict().keys() == got.keys()
    assert plain.text_model.encoder.layers[3] is not plain.vision_model.encoder.layers[3]


def test_fill_shared_layers_restores_a_dropped_name_and_refuses_two_different_copies():
    from trainer.sources import fill_shared_layers

    shape = preset_shape(load_config(CONFIG, SHARED).model)
    sd = {"vision_model.encoder.layers.3.mlp.fc1.weight": torch.ones(2), "text_model.encoder.layers.2.x": torch.zeros(1),
          "vision_model.encoder.layers.1.mlp.fc1.weight": torch.full((2,), 7.0)}
    fill_shared_layers(sd, shape, Path("ckpt"))
    assert torch.equal(sd["text_model.encoder.layers.3.mlp.fc1.weight"], torch.ones(2))
    assert torch.equal(sd["vision_model.encoder.layers.2.x"], torch.zeros(1))
    assert "text_model.encoder.layers.1.mlp.fc1.weight" not in sd   # layer 1 is not shared
    sd["text_model.encoder.layers.3.mlp.fc1.weight"] = torch.full((2,), 2.0)
    with pytest.raises(RuntimeError, match="vision_model.encoder.layers.3.mlp.fc1.weight and text_model"):
        fill_shared_layers(sd, shape, Path("ckpt"))


@pytest.mark.parametrize("override, message", [
    (["model.shared_layers=5"], "config key 'model.shared_layers' (5) must be at most the shallower tower's depth; "
                                "model.vision_layers is 4, model.text_layers is 4"),
    (["model.shared_layers=4", "model.text_layers=3"], "'model.shared_layers' (4) must be at most"),
    (["model.shared_layers=1", "model.text_width=96"],
     "config key 'model.shared_layers' (1): the shared layers need equal tower widths; model.vision_width is 128, "
     "model.text_width is 96"),
    (["model.shared_layers=2", "model.text_heads=2"],
     "config key 'model.shared_layers' (2): the shared layers need equal tower numbers of heads; "
     "model.vision_heads is 4, model.text_heads is 2"),
])
def test_bad_shared_shapes_name_the_keys(override, message):
    with pytest.raises(ConfigError) as err:
        preset_shape(load_config(None, override).model)
    assert message in str(err.value)


def test_shape_holds_shared_layers_and_unequal_towers_are_fine_without_sharing():
    assert preset_shape(load_config(None, []).model)["shared_layers"] == 0
    assert preset_shape(load_config(None, ["model.text_width=96"]).model)["text_width"] == 96
    assert preset_shape(load_config(None, ["model.shared_layers=4"]).model)["shared_layers"] == 4
    big = ["model.preset=vit-l-14", "model.text_width=1024", "model.text_heads=16", "model.shared_layers=12"]
    assert preset_shape(load_config(None, big).model)["shared_layers"] == 12   # all of the 12-layer text tower
    with pytest.raises(ConfigError, match="equal tower widths; model.vision_width is 768, model.text_width is 512"):
        preset_shape(load_config(None, ["model.preset=vit-b-32", "model.shared_layers=1"]).model)


def test_evit_drop_layers_inside_the_shared_range_are_refused():
    from trainer.methods import eclipse

    def run(*over):
        cfg = load_config(CONFIG, ["eclipse.enabled=true", *over])
        eclipse.check(cfg, preset_shape(cfg.model)["vision_layers"])
    run("model.shared_layers=2", "eclipse.drop_layers=[1]")              # below the shared layers 2, 3
    run("model.shared_layers=2", "eclipse.expedite=random")              # input patch dropout: no layer
    run("model.shared_layers=2", "eclipse.expedite=none")
    run()                                                                # no sharing: default [1, 2, 3]
    with pytest.raises(ConfigError) as err:
        run("model.shared_layers=2", "eclipse.drop_layers=[1,2]")
    assert "'eclipse.drop_layers' ([1, 2])" in str(err.value) and "'model.shared_layers' (2)" in str(err.value)
    assert "drop layers [2]" in str(err.value)
    with pytest.raises(ConfigError) as err:
        run("model.shared_layers=1")                                     # the default [1, 2, 3] hits layer 3
    assert "'eclipse.drop_layers' ([1, 2, 3], the default)" in str(err.value) and "drop layers [3]" in str(err.value)
    run("model.shared_layers=1", "eclipse.enabled=false")                # ECLIPSE off: nothing dropped


def test_cli_exits_2_naming_the_keys(demo_data, tmp_path):
    cases = {"too-deep": (["model.shared_layers=9"], "config key 'model.shared_layers' (9) must be at most"),
             "widths": (["model.shared_layers=2", "model.text_width=96"],
                        "model.vision_width is 128, model.text_width is 96")}
    procs = {name: subprocess.Popen(trainer_cmd(["train", "--config", CONFIG, *data_overrides(demo_data, tmp_path / name),
                                                 *over]), cwd=ROOT, env=trainer_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, (over, _) in cases.items()}   # side by side: most of each is the imports
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err[-3000:]
        assert cases[name][1] in err and "Traceback" not in err, err[-3000:]
        assert not (tmp_path / name / "checkpoints").exists()


# --------------------------------------------------------------------------- 2-rank training runs


def _train(data: Path, out: Path, stage: int, *extra) -> list[str]:
    return ["train", "--config", CONFIG, *data_overrides(data, out), *FAST, *SHARED, f"max_steps={STEPS}",
            "checkpoint.every_steps=3", "eval.every_steps=0", f"deepspeed.zero_stage={stage}", *extra]


def _losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(out)}


@pytest.fixture(scope="module")
def runs(demo_data, tmp_path_factory) -> dict[int, Path]:
    """Uninterrupted 2-rank fp32 runs under ZeRO-0 and ZeRO-3, checkpoints at steps 3 and 6."""
    out = {}
    for stage in (0, 3):
        out[stage] = tmp_path_factory.mktemp(f"shared-zero{stage}")
        text = check(run_trainer(_train(demo_data, out[stage], stage), nproc=2))
        assert f"zero_stage={stage}" in text
    return out


def test_zero0_and_zero3_give_the_same_losses(runs):
    z0, z3 = _losses(runs[0]), _losses(runs[3])
    assert sorted(z0) == sorted(z3) == list(range(1, STEPS + 1))
    assert z3 == pytest.approx(z0, rel=1e-4, abs=1e-5)
    assert z0[STEPS] < z0[1]


def test_checkpoints_hold_one_trained_tensor_in_both_towers(runs, demo_data):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from trainer.data import load_tokenizer
    from trainer.sources import fp32_state_dict, resolve_checkpoint

    init = build_model(load_config(CONFIG, SHARED).model, load_tokenizer(str(demo_data / "tokenizer")), seed=0)
    init_sd = init.state_dict()
    shared = [k for k in init_sd if k.startswith(("vision_model.encoder.layers.2.", "vision_model.encoder.layers.3."))]
    assert len(shared) == K * 16
    final = {}
    for stage, run in runs.items():
        root, tag = resolve_checkpoint(str(run))
        assert tag == f"step_{STEPS}"
        # What DeepSpeed itself writes, before the trainer's fill-in.
        if stage == 0:
            raw = torch.load(root / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        else:
            raw = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
            rank0 = torch.load(root / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt", map_location="cpu",
                               weights_only=False)
            names = [n for group in rank0["param_shapes"] for n in group]
            assert len(names) == len(set(names)) == len({id(p) for p in init.parameters()})   # stored once
            assert len(rank0["shared_params"]) == len(shared)                     # the other name, recorded
        sd = fp32_state_dict(root, tag)
        assert sd.keys() == init_sd.keys() == raw.keys()
        for v in shared:
            t = v.replace("vision_model", "text_model", 1)
            assert torch.equal(raw[v].float(), raw[t].float()) and torch.equal(sd[v], sd[t]), v
            assert torch.equal(sd[v], raw[v].float())
        # Every shared tensor was trained (lr 2e-3, Adam), but the key biases: softmax ignores a
        # constant added to every key's score, so their gradient is zero (up to rounding).
        moved = {v: (sd[v] - init_sd[v]).abs().max().item() for v in shared if not v.endswith("k_proj.bias")}
        assert len(moved) == K * 15 and min(moved.values()) > 1e-3, moved
        final[stage] = sd
    for v in shared:   # the two stages trained the same weights
        torch.testing.assert_close(final[3][v], final[0][v], rtol=0, atol=2e-4)


def _val_samples(data: Path, n: int = 4):
    images, captions = [], []
    from PIL import Image
    with tarfile.open(sorted((data / "val").glob("*.tar"))[0]) as tar:
        members = {m.name: m for m in tar.getmembers()}
        for name in sorted(k for k in members if k.endswith(".jpg"))[:n]:
            images.append(Image.open(io.BytesIO(tar.extractfile(members[name]).read())).convert("RGB"))
            captions.append(tar.extractfile(members[name[:-4] + ".txt"]).read().decode())
    return images, captions


def test_export_hf_is_a_standard_untied_clip_model_with_the_trainer_embeddings(runs, demo_data, tmp_path):
    from trainer.data import SampleDecoder, build_transforms, load_tokenizer
    from trainer.methods import load_trained_model
    from trainer.sources import checkpoint_config

    hf_dir = tmp_path / "hf"
    check(run_trainer(["export-hf", "--checkpoint", str(runs[3] / "checkpoints"), "--out", str(hf_dir)]))
    config = json.loads((hf_dir / "config.json").read_text())
    assert "shared_layers" not in json.dumps(config)   # a plain CLIPConfig
    hf = CLIPModel.from_pretrained(hf_dir).eval()
    assert hf.text_model.encoder.layers[3] is not hf.vision_model.encoder.layers[3]
    assert torch.equal(hf.text_model.encoder.layers[3].mlp.fc1.weight, hf.vision_model.encoder.layers[3].mlp.fc1.weight)

    cfg, root, tag = checkpoint_config(str(runs[3] / "checkpoints"))
    tokenizer = load_tokenizer(cfg.tokenizer.path)
    ours = load_trained_model(cfg, root, tag, tokenizer)
    assert ours.text_model.encoder.layers[3] is ours.vision_model.encoder.layers[3]
    shared_numel = sum(_layer_numel(ours, "vision_model", 2 + i) for i in range(K))
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in ours.parameters()) + shared_numel
    images, captions = _val_samples(demo_data)
    t = build_transforms(64, cfg.data.image_mean, cfg.data.image_std, 1.0, train=False)
    pixels = torch.stack([t(im) for im in images])
    tok = SampleDecoder(tokenizer, cfg.model.context_length, None).tokenize(captions)
    with torch.no_grad():
        img, txt, scale = ours(pixel_values=pixels, **tok)
        img_hf = F.normalize(hf.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        txt_hf = F.normalize(hf.get_text_features(**tok).pooler_output, dim=-1)
    torch.testing.assert_close(img_hf, img, rtol=0, atol=1e-5)
    torch.testing.assert_close(txt_hf, txt, rtol=0, atol=1e-5)
    assert hf.logit_scale.exp().item() == pytest.approx(scale.item(), rel=1e-6)


def test_resuming_mid_run_gives_the_uninterrupted_losses(runs, demo_data, tmp_path, stage=3):
    """A ZeRO-3 run continued from the step-3 checkpoint of the uninterrupted one (the shared
    layers' partitions and their optimizer state restored) logs that run's losses for steps 4..6."""
    out = tmp_path / "resumed"
    start = runs[stage] / "checkpoints" / "step_3"
    text = check(run_trainer(_train(demo_data, out, stage, f"checkpoint.resume={start}"), nproc=2))
    assert f"resumed from {start} (step 3)" in text
    want = {s: v for s, v in _losses(runs[stage]).items() if s > 3}
    assert sorted(_losses(out)) == [4, 5, 6]
    assert _losses(out) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_text_embeddings_check_the_length_without_reading_the_weight():
    """The text tower's embeddings (trainer.model._TextEmbeddings) compare against the embedding
    table's size, not its weight's shape: a ZeRO-3 partitioned weight has shape [0]."""
    model = build_model(load_config(CONFIG, SHARED).model, Tok(), seed=0)
    emb = model.text_model.embeddings
    ids = torch.randint(4, 500, (2, 24))
    want = emb.token_embedding(ids) + emb.position_embedding.weight[:24]
    torch.testing.assert_close(emb(input_ids=ids), want, rtol=0, atol=0)
    emb.position_embedding.weight.data = torch.empty(0)   # what ZeRO-3 leaves between gathers
    from transformers.models.clip.modeling_clip import CLIPTextEmbeddings
    with pytest.raises(ValueError, match="max_position_embeddings: 0"):   # the stock check
        CLIPTextEmbeddings.forward(emb, input_ids=ids)
    with pytest.raises(ValueError, match="got `sequence length`: 25 and max_position_embeddings: 24"):
        emb(input_ids=torch.randint(4, 500, (1, 25)))
