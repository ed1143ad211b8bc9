"""Model presets, parameter groups, the DeepSpeed config files and their resolution."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import CLIPModel

from trainer.config import load_config
from trainer.engine import DS_DIR, build_ds_config, lr_lambda
from trainer.model import ClipTrainModel, build_clip_config, build_model, param_groups


class Tok:  # the few tokenizer attributes the model needs
    eos_token_id, pad_token_id, bos_token_id = 3, 0, 2

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


@pytest.mark.parametrize("preset, millions", [("vit-b-32", 151.28), ("vit-b-16", 149.62), ("vit-l-14", 427.62)])
def test_presets_have_the_clip_paper_sizes(preset, millions):
    """Parameter counts of OpenAI's CLIP models (vocab 49408, context 77), built on the meta device."""
    cfg = load_config(None, [f"model.preset={preset}"])
    with torch.device("meta"):
        model = ClipTrainModel(build_clip_config(cfg.model, Tok(49408)))
    n = sum(p.numel() for p in model.parameters())
    assert n / 1e6 == pytest.approx(millions, abs=0.02)


def test_state_dict_is_the_transformers_layout_and_forward_is_normalised():
    cfg = load_config("trainer/configs/demo.yaml")
    model = build_model(cfg.model, Tok(500), seed=0)
    reference = CLIPModel(model.config)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)  # logit_scale included: 0-dim
    assert ours["logit_scale"].item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    reference.load_state_dict(ours)
    x, ids = torch.randn(3, 3, 64, 64), torch.randint(4, 500, (3, cfg.model.context_length))
    ids[:, 10] = 3
    img, txt, scale = model(pixel_values=x, input_ids=ids)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3)) and torch.allclose(txt.norm(dim=-1), torch.ones(3))
    want = torch.nn.functional.normalize(reference.get_image_features(pixel_values=x).pooler_output, dim=-1)
    torch.testing.assert_close(img, want)
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(500.0))
    assert model.scale().item() == pytest.approx(100.0)  # clamped in the forward


def test_param_groups_exclude_norms_biases_embeddings_and_scale():
    cfg = load_config("trainer/configs/demo.yaml")
    model = build_model(cfg.model, Tok(500), seed=0)
    decay, no_decay = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "logit_scale" in nd and "text_model.embeddings.token_embedding.weight" in nd
    assert "vision_model.embeddings.class_embedding" in nd and "text_model.final_layer_norm.weight" in nd
    assert "vision_model.encoder.layers.0.self_attn.q_proj.bias" in nd
    assert "vision_model.encoder.layers.0.mlp.fc1.weight" in d and "visual_projection.weight" in d
    assert len(d) + len(nd) == len(list(model.parameters())) and decay["weight_decay"] == 0.2


# DeepSpeed silently ignores misspelled top-level keys: pin what our files may contain.
ALLOWED_TOP = {"zero_optimization", "bf16", "fp16", "steps_per_print", "wall_clock_breakdown"}
ALLOWED_ZERO = {"stage", "overlap_comm", "contiguous_gradients", "reduce_scatter", "reduce_bucket_size",
                "allgather_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                "stage3_gather_16bit_weights_on_model_save", "offload_optimizer", "offload_param"}


@pytest.mark.parametrize("path", sorted(DS_DIR.glob("*.json")), ids=lambda p: p.name)
def test_ds_config_files_use_known_keys_only(path: Path):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    ds = json.loads(path.read_text())
    assert set(ds) <= ALLOWED_TOP, set(ds) - ALLOWED_TOP
    assert set(ds["zero_optimization"]) <= ALLOWED_ZERO
    assert "cpu_offload" not in json.dumps(ds)  # deprecated spelling
    DeepSpeedZeroConfig(**ds["zero_optimization"])  # DeepSpeed's own schema accepts it
    stage = ds["zero_optimization"]["stage"]
    assert path.name in (f"zero{stage}.json", "zero3_offload.json")


def test_resolved_ds_config_takes_batch_clip_precision_from_trainer_config():
    cfg = load_config("trainer/configs/demo.yaml", ["data.batch_size=24", "train.grad_accum_steps=3",
                                                      "optim.grad_clip=0.5", "deepspeed.zero_stage=2",
                                                      "deepspeed.precision=fp16"])
    ds = build_ds_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 24 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24 * 3 * 4 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["overlap_comm"] is True
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and not ds["bf16"]["enabled"]
    off = build_ds_config(load_config(None, ["deepspeed.zero_stage=3", "deepspeed.offload=true"]), 1)
    assert off["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and off["bf16"]["enabled"]


def test_schedule_is_linear_warmup_then_cosine_to_the_floor():
    cfg = load_config(None, ["max_steps=110", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1"])
    f = lr_lambda(cfg)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_activation_checkpointing_gives_the_same_gradients():
    cfg = load_config("trainer/configs/demo.yaml")
    x, ids = torch.randn(4, 3, 64, 64), torch.randint(4, 500, (4, cfg.model.context_length))
    ids[:, 12] = 3
    grads = []
    for ckpt in (False, True):
        cfg.model.grad_checkpointing = ckpt
        model = build_model(cfg.model, Tok(500), seed=0).train()
        img, txt, scale = model(pixel_values=x, input_ids=ids)
        (scale * img @ txt.T).logsumexp(1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_logit_scale_pushed_past_the_bound_comes_back():
    """Above ln(100) the clamp used to zero the gradient both ways, so the scale could never
    come back down; now the gradient that lowers it passes, the one that raises it does not."""
    cfg = load_config("trainer/configs/demo.yaml")
    model = build_model(cfg.model, Tok(500), seed=0)
    bound = math.log(100.0)
    with torch.no_grad():
        model.logit_scale.fill_(bound + 0.5)
    model.scale().backward()  # d exp(min(x, b)) / dx at the bound, passed straight through
    assert model.scale().item() == pytest.approx(100.0)
    assert model.logit_scale.grad.item() == pytest.approx(100.0)
    model.logit_scale.grad = None
    (-model.scale()).backward()  # would push it further up: blocked
    assert model.logit_scale.grad.item() == 0.0
    # A loss that wants a low scale (mismatched pairs) brings the parameter back below the bound.
    model.logit_scale.grad = None
    opt = torch.optim.AdamW([model.logit_scale], lr=0.05, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(16, 8, generator=gen), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(16, 8, generator=gen), dim=-1)
    for _ in range(40):
        logits = model.scale() * img @ txt.T
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(16))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.logit_scale.item() < bound - 0.3
    # Below the bound it is an ordinary exp: autograd's gradient equals the closed form.
    with torch.no_grad():
        model.logit_scale.fill_(1.0)
    model.logit_scale.grad = None
    model.scale().backward()
    assert model.logit_scale.grad.item() == pytest.approx(math.e, rel=1e-6)


def test_explicit_shape_keys_override_the_preset_in_the_built_model():
    """model.vision_width ... model.embed_dim (GrowCLIP's grown shapes are plain configs)."""
    over = {"vision_width": 96, "vision_layers": 3, "vision_heads": 3, "text_width": 64, "text_layers": 5,
            "text_heads": 2, "mlp_ratio": 2.5, "embed_dim": 48}
    cfg = load_config(None, [f"model.{k}={v}" for k, v in over.items()])
    c = build_clip_config(cfg.model, Tok(100))
    v, t = c.vision_config, c.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (96, 3, 3, 240)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size) == (64, 5, 2, 160)
    assert c.projection_dim == v.projection_dim == t.projection_dim == 48
    model = ClipTrainModel(c)
    assert model.visual_projection.weight.shape == (48, 96) and model.text_projection.weight.shape == (48, 64)
    assert model.vision_model.encoder.layers[0].mlp.fc1.weight.shape == (240, 96)
    img, txt, _ = model(pixel_values=torch.randn(2, 3, 64, 64), input_ids=torch.tensor([[2, 5, 3], [2, 3, 0]]),
                        attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert img.shape == txt.shape == (2, 48)
    # Unset keys keep the preset's values: the tiny preset is unchanged.
    tiny = build_clip_config(load_config(None, []).model, Tok(100))
    assert (tiny.vision_config.hidden_size, tiny.vision_config.intermediate_size, tiny.projection_dim) == (128, 512, 64)


@pytest.mark.parametrize("override, message", [
    (["model.vision_heads=5"], "'model.vision_width' (128) and 'model.vision_heads' (5)"),
    (["model.text_width=100", "model.text_heads=3"], "'model.text_width' (100) and 'model.text_heads' (3)"),
    (["model.mlp_ratio=0.3"], "must be a whole number of MLP units"),
    (["model.vision_layers=0"], "'model.vision_layers' must be >= 1"),
])
def test_bad_shape_keys_name_the_keys(override, message):
    from trainer.config import ConfigError
    from trainer.model import preset_shape

    with pytest.raises(ConfigError, match=None) as err:
        preset_shape(load_config(None, override).model)
    assert message in str(err.value)
