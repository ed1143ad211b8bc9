"""Pretrained CLIP weights from outside the trainer, for ``checkpoint.init``.

    src = find_pretrained("ckpts/clip-vit-b-32-hf")     # None: not a pretrained source
    src.model     # {"image_size": 224, "patch_size": 32, ..., "act": "quick_gelu"}: model.* keys
    sd = src.state_dict()                               # transformers CLIPModel's layout, fp32

Two sources are read, never downloaded:

- a local ``transformers`` CLIPModel directory (``config.json`` with ``model_type: clip`` and
  ``model.safetensors``, a sharded ``model.safetensors.index.json`` or ``pytorch_model.bin``;
  what ``save_pretrained`` and ``export-hf`` write). Its tokenizer, when the directory holds
  one, is the run's.
- an open_clip checkpoint: a directory in open_clip's hub layout (``open_clip_config.json``
  with ``model_cfg``, and ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``),
  or a weights file given with ``checkpoint.init_config`` (open_clip's model config JSON).
  Only open_clip's ViT ``CLIP`` with its default blocks maps onto ``CLIPModel``: the ViT-B/32,
  B/16, L/14 shapes and any other widths and depths, QuickGELU or exact GELU
  (``quick_gelu``), argmax text pooling (CLIP's BPE, whose end token is the largest id). A
  config key outside that (timm or HF towers, attentional pooling, layer scale, per-tower MLP
  ratios, ...) is refused by name.

Every problem is a :class:`ConfigError` naming the source and the key.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .config import ConfigError

HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json")
ACTS = ("quick_gelu", "gelu")


@dataclass
class Pretrained:
    kind: str                 # "transformers" | "open_clip"
    path: Path
    model: dict               # model.* keys of the source's shape
    vocab_size: int
    tokenizer_dir: Path | None
    _load: Callable[[], dict] = field(repr=False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights in ``transformers.CLIPModel``'s layout (fp32)."""
        return {k: v.float() for k, v in self._load().items() if not k.endswith("position_ids")}


def find_pretrained(init: str | None, init_config: str | None = None) -> Pretrained | None:
    """The pretrained source at ``checkpoint.init``, or None when it is none (a trainer checkpoint
    or a ``grow`` directory, resolved by trainer/sources.py)."""
    if not init:
        return None
    p = Path(init)
    if p.is_dir() and (p / "config.json").is_file() and not (p / "config.yaml").is_file():
        return _transformers(p)
    if p.is_dir() and (p / OPEN_CLIP_CONFIG).is_file():
        return _open_clip(p, _read_model_cfg(p / OPEN_CLIP_CONFIG), lambda: _weights_in(p, OPEN_CLIP_WEIGHTS))
    if p.is_file():
        if not init_config:
            raise ConfigError(f"config key 'checkpoint.init': {p} is a weights file; give its open_clip model config "
                              "JSON as checkpoint.init_config")
        return _open_clip(p, _read_model_cfg(Path(init_config), "checkpoint.init_config"), lambda: p)
    if init_config:
        raise ConfigError(f"config key 'checkpoint.init_config' is only for an open_clip weights file as "
                          f"checkpoint.init; {p} is not a file")
    return None


# ----------------------------------------------------------------------------- file reading

def _read_json(path: Path, key: str = "checkpoint.init") -> dict:
    if not path.is_file():
        raise ConfigError(f"config key '{key}': file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config key '{key}': {path} is not valid JSON: {err}") from None


def _read_model_cfg(path: Path, key: str = "checkpoint.init") -> dict:
    raw = _read_json(path, key)
    cfg = raw.get("model_cfg", raw)
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg or "text_cfg" not in cfg:
        raise ConfigError(f"config key '{key}': {path} is not an open_clip model config (no vision_cfg and text_cfg)")
    return cfg


def _weights_in(d: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (d / name).is_file():
            return d / name
    raise ConfigError(f"config key 'checkpoint.init': {d} holds no weights file (expected one of {', '.join(names)})")


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.name.endswith(".index.json"):
        shards = sorted(set(_read_json(path).get("weight_map", {}).values()))
        return {k: v for s in shards for k, v in _load_file(path.parent / s).items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):   # open_clip_train's checkpoints
        sd = sd["state_dict"]
    if sd and next(iter(sd)).startswith("module."):                        # saved from DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _tokenizer_dir(d: Path) -> Path | None:
    return d if any((d / f).is_file() for f in TOKENIZER_FILES) else None


# ----------------------------------------------------------------------------- transformers

def _transformers(d: Path) -> Pretrained:
    raw = _read_json(d / "config.json")
    if raw.get("model_type") != "clip":
        arch = raw.get("architectures") or raw.get("model_type")
        raise ConfigError(f"config key 'checkpoint.init': {d} holds a transformers model of another architecture "
                          f"(model_type {raw.get('model_type')!r}, {arch}); only CLIPModel (model_type 'clip') is read")
    from transformers import CLIPConfig
    c = CLIPConfig.from_dict(raw)
    v, t = c.vision_config, c.text_config
    for name, tc in (("vision_config", v), ("text_config", t)):
        if tc.hidden_act not in ACTS:
            raise ConfigError(f"config key 'checkpoint.init': {d}: {name}.hidden_act {tc.hidden_act!r} is not one of "
                              f"{', '.join(ACTS)}")
        if tc.layer_norm_eps != 1e-5:
            raise ConfigError(f"config key 'checkpoint.init': {d}: {name}.layer_norm_eps {tc.layer_norm_eps} "
                              "(the trainer's CLIP uses 1e-5)")
    if v.hidden_act != t.hidden_act:
        raise ConfigError(f"config key 'checkpoint.init': {d}: the towers' hidden_act differ (vision {v.hidden_act!r}, "
                          f"text {t.hidden_act!r}); model.act is one for both")
    ratios = (v.intermediate_size / v.hidden_size, t.intermediate_size / t.hidden_size)
    if ratios[0] != ratios[1]:
        raise ConfigError(f"config key 'checkpoint.init': {d}: the towers' intermediate_size / hidden_size differ "
                          f"(vision {ratios[0]}, text {ratios[1]}); model.mlp_ratio is one for both")
    model = dict(image_size=v.image_size, patch_size=v.patch_size, context_length=t.max_position_embeddings,
                 vision_width=v.hidden_size, vision_layers=v.num_hidden_layers, vision_heads=v.num_attention_heads,
                 text_width=t.hidden_size, text_layers=t.num_hidden_layers, text_heads=t.num_attention_heads,
                 mlp_ratio=float(ratios[0]), embed_dim=c.projection_dim, act=v.hidden_act)
    weights = _weights_in(d, HF_WEIGHTS)
    return Pretrained("transformers", d, model, t.vocab_size, _tokenizer_dir(d), lambda: _load_file(weights))


# ----------------------------------------------------------------------------- open_clip

# open_clip config keys the mapping reads, and those it ignores (training-time or tokenizer settings).
_READ = {"": {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"},
         "vision_cfg": {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size"},
         "text_cfg": {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}}
_IGNORED = {"": {"cast_dtype", "init_logit_scale", "nonscalar_logit_scale"},
            "vision_cfg": {"patch_dropout", "output_tokens", "timm_model_pretrained", "timm_drop", "timm_drop_path"},
            "text_cfg": {"hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs", "pad_id", "eos_id",
                         "output_tokens", "hf_model_pretrained"}}
# Keys the mapping covers at these values only (open_clip's defaults for its ViT CLIP).
_AT = {"": {"custom_text": False, "init_logit_bias": None, "multimodal_cfg": None},
       "vision_cfg": {"ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
                      "pos_embed_type": "learnable", "final_ln_after_pool": False, "pool_type": "tok",
                      "act_kwargs": None, "norm_kwargs": None, "block_type": None, "qk_norm": False,
                      "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
                      "scale_attn": False, "scale_fc": False, "timm_model_name": None, "input_patchnorm": False},
       "text_cfg": {"ls_init_value": None, "embed_cls": False, "no_causal_mask": False, "final_ln_after_pool": False,
                    "pool_type": "argmax", "proj_bias": False, "proj_type": "linear", "act_kwargs": None,
                    "norm_kwargs": None, "block_type": None, "qk_norm": False, "scaled_cosine_attn": False,
                    "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
                    "hf_model_name": None}}


def _check_covered(cfg: dict, where: Path) -> None:
    for section in ("", "vision_cfg", "text_cfg"):
        body = cfg if not section else cfg[section]
        for key, value in body.items():
            name = f"{section}.{key}" if section else key
            if key in _READ[section] or key in _IGNORED[section]:
                continue
            if key in _AT[section] and (value == _AT[section][key] or (key == "block_type" and value == "default")):
                continue
            raise ConfigError(f"config key 'checkpoint.init': {where}: open_clip config key '{name}' = {value!r} is "
                              "not covered by the mapping onto the trainer's CLIP (a ViT CLIP with open_clip's "
                              "default blocks)")


def _open_clip(where: Path, cfg: dict, find_weights: Callable[[], Path]) -> Pretrained:
    """The config is checked first (its keys are what a user can act on), then the weights are found."""
    _check_covered(cfg, where)
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    image_size = v.get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise ConfigError(f"config key 'checkpoint.init': {where}: open_clip config key 'vision_cfg.image_size' "
                              f"{image_size} is not square")
        image_size = image_size[0]
    if not isinstance(v.get("layers", 12), int):
        raise ConfigError(f"config key 'checkpoint.init': {where}: open_clip config key 'vision_cfg.layers' "
                          f"{v['layers']!r} is a ResNet tower; only ViT towers are covered")
    ratios = (float(v.get("mlp_ratio", 4.0)), float(t.get("mlp_ratio", 4.0)))
    if ratios[0] != ratios[1]:
        raise ConfigError(f"config key 'checkpoint.init': {where}: open_clip config keys 'vision_cfg.mlp_ratio' "
                          f"({ratios[0]}) and 'text_cfg.mlp_ratio' ({ratios[1]}) differ; model.mlp_ratio is one for both")
    width = v.get("width", 768)
    model = dict(image_size=image_size, patch_size=v.get("patch_size", 16), context_length=t.get("context_length", 77),
                 vision_width=width, vision_layers=v.get("layers", 12), vision_heads=width // v.get("head_width", 64),
                 text_width=t.get("width", 512), text_layers=t.get("layers", 12), text_heads=t.get("heads", 8),
                 mlp_ratio=ratios[0], embed_dim=cfg["embed_dim"], act="quick_gelu" if cfg.get("quick_gelu") else "gelu")
    tok = _tokenizer_dir(where) if where.is_dir() else None
    weights = find_weights()
    return Pretrained("open_clip", where, model, t.get("vocab_size", 49408), tok,
                      lambda: open_clip_to_hf(_load_file(weights), model, where))


# (open_clip key, CLIPModel key) of the tensors both layouts hold as they are, read in both
# directions (open_clip_to_hf, hf_to_open_clip); the projections (transposed), the logit scale and
# the fused attention input projection (split / stacked) are mapped in code.
DIRECT_KEYS = (
    ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    ("visual.ln_pre.weight", "vision_model.pre_layrnorm.weight"),
    ("visual.ln_pre.bias", "vision_model.pre_layrnorm.bias"),
    ("visual.ln_post.weight", "vision_model.post_layernorm.weight"),
    ("visual.ln_post.bias", "vision_model.post_layernorm.bias"),
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    ("ln_final.weight", "text_model.final_layer_norm.weight"),
    ("ln_final.bias", "text_model.final_layer_norm.bias"),
)
# Within one transformer block (open_clip's ``resblocks.i.`` / CLIPModel's ``layers.i.``): each
# name holds a ``.weight`` and a ``.bias``.
LAYER_KEYS = (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
              ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))


def _layers(sd: dict, src: str, dst: str, n: int, width: int, out: dict) -> None:
    for i in range(n):
        s, d = f"{src}.{i}.", f"{dst}.{i}."
        w, b = sd.pop(s + "attn.in_proj_weight"), sd.pop(s + "attn.in_proj_bias")   # [3W, W], [3W]: q, k, v stacked
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[d + f"self_attn.{name}.weight"] = w[j * width:(j + 1) * width]
            out[d + f"self_attn.{name}.bias"] = b[j * width:(j + 1) * width]
        for oc, hf in LAYER_KEYS:
            for p in (".weight", ".bias"):
                out[d + hf + p] = sd.pop(s + oc + p)


def open_clip_to_hf(sd: dict[str, torch.Tensor], model: dict, where: Path) -> dict[str, torch.Tensor]:
    """open_clip's ViT ``CLIP`` state dict as ``transformers.CLIPModel``'s (same tensors; the fused
    attention input projection split into q, k, v; the projections transposed)."""
    sd = dict(sd)
    out = {}
    try:
        for oc, hf in DIRECT_KEYS:
            out[hf] = sd.pop(oc)
        out["visual_projection.weight"] = sd.pop("visual.proj").T.contiguous()   # open_clip: x @ proj
        out["text_projection.weight"] = sd.pop("text_projection").T.contiguous()
        out["logit_scale"] = sd.pop("logit_scale").reshape(())
        _layers(sd, "visual.transformer.resblocks", "vision_model.encoder.layers", model["vision_layers"],
                model["vision_width"], out)
        _layers(sd, "transformer.resblocks", "text_model.encoder.layers", model["text_layers"], model["text_width"], out)
    except KeyError as err:
        raise ConfigError(f"config key 'checkpoint.init': {where}: the weights lack {err.args[0]!r}, which its "
                          "open_clip config implies (weights and config of different models?)") from None
    sd.pop("attn_mask", None)
    if sd:
        raise ConfigError(f"config key 'checkpoint.init': {where}: weights the mapping does not cover: "
                          f"{', '.join(sorted(sd)[:5])} (weights and config of different models?)")
    return out


def hf_to_open_clip(sd: dict[str, torch.Tensor], shape: dict) -> dict[str, torch.Tensor]:
    """The inverse of :func:`open_clip_to_hf`: a ``CLIPModel`` state dict (the trainer's) as
    open_clip's ViT ``CLIP`` state dict (q, k, v stacked into ``in_proj``, projections transposed)."""
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    out = {}
    for oc, hf in DIRECT_KEYS:
        out[oc] = sd[hf]
    out["visual.proj"] = sd["visual_projection.weight"].T.contiguous()
    out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    out["logit_scale"] = sd["logit_scale"].reshape(())
    for src, dst, n in (("vision_model.encoder.layers", "visual.transformer.resblocks", shape["vision_layers"]),
                        ("text_model.encoder.layers", "transformer.resblocks", shape["text_layers"])):
        for i in range(n):
            s, d = f"{src}.{i}.", f"{dst}.{i}."
            out[d + "attn.in_proj_weight"] = torch.cat([sd[s + f"self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")])
            out[d + "attn.in_proj_bias"] = torch.cat([sd[s + f"self_attn.{p}.bias"] for p in ("q_proj", "k_proj", "v_proj")])
            for oc, hf in LAYER_KEYS:
                for p in (".weight", ".bias"):
                    out[d + oc + p] = sd[s + hf + p]
    return out


def open_clip_model_cfg(shape: dict, vocab_size: int, eos_id: int, clip_bpe: bool) -> dict:
    """open_clip's ``model_cfg`` for the trainer's shape. A tokenizer that is not CLIP's BPE
    (``clip_bpe`` False) is shipped in the export directory (``hf_tokenizer_name``; open_clip's
    ``local-dir:`` loads it from there) and the text is pooled at its end token (``pool_type: eos``)."""
    text = {"context_length": shape["context_length"], "vocab_size": vocab_size, "width": shape["text_width"],
            "heads": shape["text_heads"], "layers": shape["text_layers"], "mlp_ratio": shape["mlp_ratio"]}
    if not clip_bpe:
        text.update(hf_tokenizer_name="local-dir", pool_type="eos", eos_id=eos_id)
    return {"embed_dim": shape["embed_dim"], "quick_gelu": shape["act"] != "gelu",
            "vision_cfg": {"image_size": shape["image_size"], "layers": shape["vision_layers"],
                           "width": shape["vision_width"], "patch_size": shape["patch_size"],
                           "head_width": shape["vision_width"] // shape["vision_heads"],
                           "mlp_ratio": shape["mlp_ratio"]},
            "text_cfg": text}
