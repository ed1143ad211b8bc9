"""checkpoint.init from pretrained weights (trainer/pretrained.py): a local transformers CLIPModel
directory and an open_clip checkpoint, built here with tiny random weights (nothing downloaded).
The reference is the source library's own forward on the same inputs: open_clip's encode_image /
encode_text and transformers' get_*_features must equal the trainer's model loaded through
checkpoint.init, whose shape comes from the source."""
from __future__ import annotations

import json

import pytest
import torch

TEXTS = ["a photo of a cat.", "a red car parked near three trees", "x " * 100]


VOCAB = 516   # the tiny tokenizer's: 512 byte symbols (plain and word-final), 2 merges, start, end


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    """A CLIP tokenizer (make-tokenizer's writer) with 2 merges instead of 49,152: the same format
    and the same pooling (the end token is the largest id), built in well under a second."""
    import gzip

    import trainer.clip_tokenizer as C

    out = tmp_path_factory.mktemp("clip-tokenizer")
    bpe = out.parent / "tiny_bpe.txt.gz"
    bpe.write_bytes(gzip.compress(b"#version: 0.2\nt h\nth e</w>\n"))
    saved, C.N_MERGES = C.N_MERGES, 2
    try:
        assert C.write_clip_tokenizer(out, bpe)["vocab_size"] == VOCAB
    finally:
        C.N_MERGES = saved
    return out


def _randomize(model: torch.nn.Module) -> None:
    """Zero biases and unit norms would hide a swapped or dropped tensor: make every one distinct."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def open_clip_cfg(quick_gelu: bool, **vision) -> dict:
    return dict(embed_dim=32, quick_gelu=quick_gelu,
                vision_cfg=dict(image_size=32, layers=2, width=64, head_width=32, patch_size=8, **vision),
                text_cfg=dict(context_length=77, vocab_size=VOCAB, width=64, heads=2, layers=2))


def save_open_clip(out, cfg: dict):
    """An open_clip CLIP in open_clip's hub layout (open_clip_config.json + open_clip_model.safetensors)."""
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = CLIP(**cfg).eval()
    _randomize(model)
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    return model


def save_hf(out, tokenizer_dir, act: str = "quick_gelu"):
    """A transformers CLIPModel saved with save_pretrained, with its tokenizer in the same directory.
    Its text config has the legacy eos_token_id=2 of OpenAI's configs on the hub, with which
    transformers pools at the largest token id; the trainer pools at the tokenizer's end token,
    the same position."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, projection_dim=32, hidden_act=act, bos_token_id=0, eos_token_id=2,
                pad_token_id=1)
    vision = dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, projection_dim=32, hidden_act=act)
    torch.manual_seed(2)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()
    _randomize(model)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return model


def trainer_model(tmp_path, overrides: list[str]):
    """What ``train`` builds before the engine: config + source shape, tokenizer, model, init weights."""
    from trainer.config import load_config
    from trainer.data import load_tokenizer
    from trainer.methods import load_init
    from trainer.model import build_model
    from trainer.sources import apply_pretrained_shape, check_init_tokenizer

    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", *overrides])
    apply_pretrained_shape(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer.path)
    check_init_tokenizer(cfg, tokenizer)
    model = build_model(cfg.model, tokenizer, cfg.seed)
    assert load_init(model, cfg) is not None
    return cfg, tokenizer, model.eval()


def inputs(tokenizer, context_length: int):
    torch.manual_seed(3)
    images = torch.randn(3, 3, 32, 32)
    tok = tokenizer(TEXTS, padding="max_length", truncation=True, max_length=context_length, return_tensors="pt")
    return images, tok["input_ids"], tok["attention_mask"]


def test_open_clip_and_hf_init_give_the_sources_embeddings(tmp_path, clip_tokenizer):
    """Fast: both sources, loaded through checkpoint.init, embed exactly as their own libraries do."""
    import torch.nn.functional as F

    oc = save_open_clip(tmp_path / "oc", open_clip_cfg(quick_gelu=False))
    cfg, tokenizer, model = trainer_model(tmp_path, [f"checkpoint.init={tmp_path / 'oc'}",
                                                     f"tokenizer.path={clip_tokenizer}"])
    assert (cfg.model.act, cfg.model.patch_size, cfg.model.vision_heads, cfg.model.embed_dim) == ("gelu", 8, 2, 32)
    images, ids, mask = inputs(tokenizer, cfg.model.context_length)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), oc.encode_image(images, normalize=True),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(ids, mask), oc.encode_text(ids, normalize=True),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.scale(), oc.logit_scale.exp())

    hf = save_hf(tmp_path / "hf", clip_tokenizer)
    cfg, tokenizer, model = trainer_model(tmp_path, [f"checkpoint.init={tmp_path / 'hf'}"])
    assert cfg.tokenizer.path == str(tmp_path / "hf") and cfg.model.act == "quick_gelu"
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images),
                                   F.normalize(hf.get_image_features(pixel_values=images).pooler_output, dim=-1),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(ids, mask), F.normalize(
            hf.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, dim=-1), rtol=1e-5, atol=1e-5)


def _train_error(tmp_path, capsys, overrides: list[str]) -> str:
    from trainer.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'run'}\n")
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_pretrained_sources_are_one_error_line(tmp_path, capsys, clip_tokenizer):
    from transformers import BertConfig

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(BertConfig(hidden_size=32).to_json_string())
    err = _train_error(tmp_path, capsys, [f"checkpoint.init={bert}"])
    assert "another architecture" in err and "'bert'" in err

    for name, cfg in (("attn", open_clip_cfg(False, attentional_pool=True)),
                      ("ls", open_clip_cfg(False, ls_init_value=1e-5))):
        d = tmp_path / name
        d.mkdir()
        (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
        (d / "open_clip_model.safetensors").write_bytes(b"")
        key = "vision_cfg.attentional_pool" if name == "attn" else "vision_cfg.ls_init_value"
        assert f"'{key}'" in _train_error(tmp_path, capsys, [f"checkpoint.init={d}"])
    mixed = open_clip_cfg(False)
    mixed["text_cfg"]["mlp_ratio"] = 2.0
    (tmp_path / "mlp").mkdir()
    (tmp_path / "mlp" / "open_clip_config.json").write_text(json.dumps({"model_cfg": mixed}))
    assert "'text_cfg.mlp_ratio'" in _train_error(tmp_path, capsys, [f"checkpoint.init={tmp_path / 'mlp'}"])
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    assert "checkpoint.init_config" in _train_error(tmp_path, capsys, [f"checkpoint.init={weights}"])

    save_hf(tmp_path / "hf", clip_tokenizer)
    err = _train_error(tmp_path, capsys, [f"checkpoint.init={tmp_path / 'hf'}", "model.vision_layers=4"])
    assert "model.vision_layers is 4 here, 2 there" in err
    err = _train_error(tmp_path, capsys, [f"checkpoint.init={tmp_path / 'hf'}", "model.lock_text_unlocked_layers=1"])
    assert "model.lock_text=true" in err


# ------------------------------------------------------------------ through `train`, 2 ranks (full)

def save_hf_for_demo(out, demo_data):
    """A tiny CLIPModel with the demo tokenizer saved beside it (tokenizer.path comes from the
    source) and demo.yaml's context length, so the demo config runs from it unchanged."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    tok = AutoTokenizer.from_pretrained(demo_data / "tokenizer")
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=24, projection_dim=32, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, projection_dim=32)
    torch.manual_seed(4)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()
    _randomize(model)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return model


def _run(demo_data, out, init, extra: list[str]):
    from conftest import check, data_overrides, run_trainer
    from test_train_e2e import CONFIG, FAST

    args = [a for a in data_overrides(demo_data, out) if not a.startswith("tokenizer.path")] + ["tokenizer.path="]
    return check(run_trainer(["train", "--config", CONFIG, *args, *FAST, "data.workers=1", f"checkpoint.init={init}",
                              *extra], nproc=2))


def _weights(out):
    from trainer.sources import fp32_state_dict, resolve_checkpoint

    return fp32_state_dict(*resolve_checkpoint(str(out)))


@pytest.fixture(scope="module")
def hf_init(demo_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("hf-init") / "clip"
    return d, save_hf_for_demo(d, demo_data)


@pytest.mark.full
def test_two_rank_run_from_hf_init_first_eval_equals_the_sources(hf_init, demo_data, tmp_path):
    """lr 0 for one step: the run's eval is the init's; the reference evaluates the transformers
    model itself (its weights read by transformers, not by checkpoint.init) with the trainer's eval."""
    import yaml

    from trainer.config import load_config
    from trainer.data import load_tokenizer
    from trainer.evaluate import evaluate
    from trainer.model import ClipTrainModel, build_clip_config

    init, hf = hf_init
    out = tmp_path / "run"
    _run(demo_data, out, init, ["max_steps=1", "optim.lr=0", "optim.warmup_steps=0"])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["tokenizer"]["path"] == str(init)
    assert {k: saved["model"][k] for k in ("vision_width", "vision_layers", "patch_size", "image_size", "act",
                                           "embed_dim")} == dict(vision_width=64, vision_layers=2, patch_size=8,
                                                                 image_size=32, act="quick_gelu", embed_dim=32)
    got = json.loads((out / "eval.json").read_text())

    cfg = load_config(out / "config.yaml")
    tokenizer = load_tokenizer(str(init))
    ref = ClipTrainModel(build_clip_config(cfg.model, tokenizer))
    ref.load_state_dict({k: v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}, strict=False)
    want = evaluate(ref.eval(), cfg, tokenizer, 0, 1, torch.device("cpu"))
    for key in ("zeroshot_top1", "i2t_r1", "t2i_r1", "num_samples"):
        assert got[key] == want[key], key
    assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)


def _tower(sd, prefixes):
    return {k: v for k, v in sd.items() if k.startswith(prefixes)}


IMAGE = ("vision_model.", "visual_projection.")
TEXT = ("text_model.", "text_projection.")


@pytest.mark.full
@pytest.mark.parametrize("stage,unlocked", [(1, 0), (3, 1)])
def test_locked_image_tower_stays_at_the_init(hf_init, demo_data, tmp_path, stage, unlocked):
    init, hf = hf_init
    before = {k: v.float() for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    out = tmp_path / "run"
    text = _run(demo_data, out, init, ["max_steps=3", f"deepspeed.zero_stage={stage}", "model.lock_image=true",
                                       f"model.lock_image_unlocked_layers={unlocked}"])
    after = _weights(out)
    top = ("vision_model.encoder.layers.1.", "vision_model.post_layernorm.", "visual_projection.")
    for k, v in _tower(before, IMAGE).items():
        if unlocked and k.startswith(top):
            continue
        assert torch.equal(after[k], v), k
    for k in _tower(before, TEXT):
        assert not torch.equal(after[k], before[k]), k
    if unlocked:
        for k in _tower(before, top):
            assert not torch.equal(after[k], before[k]), k
    assert "params=" in text


@pytest.mark.parametrize("name, preset, act", [("ViT-B-32", "vit-b-32", "gelu"), ("ViT-B-16", "vit-b-16", "gelu"),
                                               ("ViT-L-14", "vit-l-14", "gelu"),
                                               ("ViT-B-32-quickgelu", "vit-b-32", "quick_gelu")])
def test_open_clips_own_configs_map_onto_the_presets_key_for_key(name, preset, act):
    """open_clip's shipped model configs give the CLIP paper's shapes, and open_clip's full-size
    state dict (built on the meta device: shapes only, no memory) maps onto the trainer's model of
    that shape with every key and shape accounted for."""
    from pathlib import Path

    import open_clip
    from open_clip.model import CLIP

    from trainer.config import ModelConfig
    from trainer.model import PRESETS, ClipTrainModel, build_clip_config
    from trainer.pretrained import _read_model_cfg, find_pretrained, open_clip_to_hf

    cfg_file = Path(open_clip.__file__).parent / "model_configs" / f"{name}.json"
    src = find_pretrained(str(cfg_file), str(cfg_file))    # the JSON stands in for the weights file
    want = {k: v for k, v in PRESETS[preset].items()}
    assert {k: src.model[k] for k in want} == want and src.model["act"] == act and src.model["mlp_ratio"] == 4.0

    class Tok:   # what build_clip_config reads of a tokenizer: CLIP's ids
        eos_token_id, bos_token_id, pad_token_id = 49407, 49406, 49407

        def __len__(self):
            return 49408

    with torch.device("meta"):
        theirs = CLIP(**_read_model_cfg(cfg_file)).state_dict()
        ours = ClipTrainModel(build_clip_config(ModelConfig(**src.model), Tok())).state_dict()
    mapped = open_clip_to_hf(theirs, src.model, cfg_file)
    ours = {k: v for k, v in ours.items() if not k.endswith("position_ids")}
    assert sorted(mapped) == sorted(ours)
    assert all(mapped[k].shape == ours[k].shape for k in ours), [k for k in ours if mapped[k].shape != ours[k].shape]


def test_locks_freeze_exactly_the_tower_below_its_unlocked_top(clip_tokenizer):
    """In process: which weights ``model.lock_*`` freezes, and that the optimizer's groups skip them."""
    from trainer.config import load_config
    from trainer.data import load_tokenizer
    from trainer.model import build_model, param_groups

    cfg = load_config(None, ["model.vision_layers=2", "model.text_layers=3", "model.vision_width=32",
                             "model.text_width=32", "model.lock_image=true", "model.lock_text=true",
                             "model.lock_text_unlocked_layers=1"])
    model = build_model(cfg.model, load_tokenizer(str(clip_tokenizer)), 0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    top_text = ("text_model.encoder.layers.2.", "text_model.final_layer_norm.", "text_projection.")
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(top_text) or n == "logit_scale"}
    in_groups = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
    assert in_groups == {id(p) for n, p in model.named_parameters() if n in trainable}
