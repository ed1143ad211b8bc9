"""The model's shape from its config: the CLIP paper's presets with ``model.<shape key>`` overrides.

    shape = preset_shape(cfg.model)   # {"embed_dim": 512, "image_size": 224, ..., "act": "quick_gelu"}

Kept apart from :mod:`trainer.model` (which imports ``transformers``' model classes) so that the
data pipeline and its loader workers know the image size and context length without them.
"""
from __future__ import annotations

from .config import ConfigError, ModelConfig

# Shapes of the CLIP paper's models (Radford et al. 2021, table 19/20); `tiny` is for CPUs.
PRESETS: dict[str, dict] = {
    "tiny": dict(embed_dim=64, image_size=64, patch_size=8, vision_width=128, vision_layers=4, vision_heads=4,
                 text_width=128, text_layers=4, text_heads=4, context_length=32),
    "vit-b-32": dict(embed_dim=512, image_size=224, patch_size=32, vision_width=768, vision_layers=12,
                     vision_heads=12, text_width=512, text_layers=12, text_heads=8, context_length=77),
    "vit-b-16": dict(embed_dim=512, image_size=224, patch_size=16, vision_width=768, vision_layers=12,
                     vision_heads=12, text_width=512, text_layers=12, text_heads=8, context_length=77),
    "vit-l-14": dict(embed_dim=768, image_size=224, patch_size=14, vision_width=1024, vision_layers=24,
                     vision_heads=16, text_width=768, text_layers=12, text_heads=12, context_length=77),
}


SHAPE_KEYS = ("image_size", "context_length", "vision_width", "vision_layers", "vision_heads", "text_width",
              "text_layers", "text_heads", "mlp_ratio", "embed_dim")


def preset_shape(mc: ModelConfig) -> dict:
    """The model's shape: the preset's, with every ``model.<shape key>`` that is set overriding it
    (so a grown model is just a config)."""
    if mc.preset not in PRESETS:
        raise ConfigError(f"config key 'model.preset' must be one of {', '.join(PRESETS)}; got {mc.preset!r}")
    shape = {"mlp_ratio": 4.0, **PRESETS[mc.preset]}
    for key in SHAPE_KEYS:
        if getattr(mc, key) is not None:
            shape[key] = getattr(mc, key)
    for tower in ("vision", "text"):
        width, heads = shape[f"{tower}_width"], shape[f"{tower}_heads"]
        if width % heads:
            raise ConfigError(f"config keys 'model.{tower}_width' ({width}) and 'model.{tower}_heads' ({heads}): "
                              "the width must be a multiple of the number of heads")
        if (width * shape["mlp_ratio"]) % 1:
            raise ConfigError(f"config key 'model.mlp_ratio' ({shape['mlp_ratio']}) times 'model.{tower}_width' "
                              f"({width}) must be a whole number of MLP units")
    shape["mlp_ratio"] = float(shape["mlp_ratio"])
    if mc.patch_size is not None:
        shape["patch_size"] = mc.patch_size
    shape["act"] = mc.act or "quick_gelu"
    if shape["image_size"] % shape["patch_size"]:
        raise ConfigError(f"config key 'model.image_size' ({shape['image_size']}) must be a multiple of the "
                          f"patch size ({shape['patch_size']}, model.patch_size or the preset's)")
    shape["shared_layers"] = k = mc.shared_layers
    if k > min(shape["vision_layers"], shape["text_layers"]):
        raise ConfigError(f"config key 'model.shared_layers' ({k}) must be at most the shallower tower's depth; "
                          f"model.vision_layers is {shape['vision_layers']}, model.text_layers is "
                          f"{shape['text_layers']}")
    if k > 0:
        for what, key in (("widths", "width"), ("numbers of heads", "heads")):
            if shape[f"vision_{key}"] != shape[f"text_{key}"]:
                raise ConfigError(f"config key 'model.shared_layers' ({k}): the shared layers need equal tower "
                                  f"{what}; model.vision_{key} is {shape[f'vision_{key}']}, model.text_{key} is "
                                  f"{shape[f'text_{key}']}")
    return shape
