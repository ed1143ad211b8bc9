"""Checkpoint -> standard ``transformers`` directory or open_clip directory.

    python -m trainer export-hf --checkpoint runs/demo/checkpoints/step_600 --out runs/demo/hf
    model = transformers.CLIPModel.from_pretrained("runs/demo/hf")
    processor = transformers.CLIPProcessor.from_pretrained("runs/demo/hf")

    python -m trainer export-open-clip --checkpoint runs/demo --out runs/demo/open_clip
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:runs/demo/open_clip")
    tokenizer = open_clip.get_tokenizer("local-dir:runs/demo/open_clip")

The fp32 weights are consolidated from the DeepSpeed checkpoint (any ZeRO stage) with
DeepSpeed's own ``zero_to_fp32`` reader; the state dict is already ``CLIPModel``'s layout. With
``model.shared_layers`` both towers' keys of a shared layer hold the one trained tensor (DeepSpeed
stores it under one name and records the other in ``shared_params``; ``trainer.sources.fp32_state_dict``
fills in whichever name is missing), so the export is a standard, untied ``CLIPModel`` whose
config does not mention sharing.
The exported tokenizer's ``model_max_length`` is the trainer's context length (the text tower's
positions), so ``processor(text=..., padding=True, truncation=True)`` truncates exactly as the
trainer does (keeping the end-of-text token) and long captions give the trainer's embeddings.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
import yaml

from .config import ConfigError, to_dict
from .data import load_tokenizer
from .methods import export_towers, load_trained_model, prefixes
from .model import ClipTrainModel, preset_shape
from .pretrained import hf_to_open_clip, open_clip_model_cfg
from .sources import checkpoint_config

log = logging.getLogger("trainer")


def clip_state_dict(model: ClipTrainModel, which: str = "student") -> dict[str, torch.Tensor]:
    """``CLIPModel``'s state dict of ``model`` with the student's image tower or, for
    ``which="teacher"``, the ECLIPSE teacher's (the text tower is shared)."""
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes())}
    if which != "student":
        towers = export_towers(model)
        if which not in towers:
            raise ConfigError(f"--which {which}: this checkpoint has no momentum teacher (eclipse.enabled was off); "
                              f"its image towers: {', '.join(['student', *towers])}")
        sd.update(towers[which])
    return sd


def export_hf(checkpoint: str, out: str, tokenizer_path: str | None = None, which: str = "student") -> Path:
    """Write ``out`` as a standard ``CLIPModel`` + ``CLIPProcessor``; ``which``: student | teacher
    (ECLIPSE's momentum image tower with the shared text tower)."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor  # heavy: only when exporting

    cfg, root, tag = checkpoint_config(checkpoint)
    tokenizer = load_tokenizer(tokenizer_path or cfg.tokenizer.path)
    trained = load_trained_model(cfg, root, tag, tokenizer)
    config = copy.deepcopy(trained.config)
    if hasattr(config, "shared_layers"):   # a plain config: the export's towers are untied copies
        del config.shared_layers
    hf = CLIPModel(config)
    hf.load_state_dict(clip_state_dict(trained, which))
    out_dir = Path(out)
    hf.save_pretrained(out_dir)
    shape = preset_shape(cfg.model)
    size = shape["image_size"]
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                         image_mean=list(cfg.data.image_mean), image_std=list(cfg.data.image_std),
                                         resample=3, do_center_crop=True, do_resize=True)
    # The trainer tokenizes with max_length=context_length (trainer.data.SampleDecoder.tokenize);
    # the tokenizer directory's own model_max_length (e.g. CLIP's 77) may exceed the text tower.
    tokenizer.model_max_length = shape["context_length"]
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    (out_dir / "trainer_config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    log.info("exported %s (%s) to %s", root / tag, which, out_dir)
    return out_dir


def export_open_clip(checkpoint: str, out: str, which: str = "student") -> Path:
    """Write ``out`` in open_clip's local/hub layout (``open_clip_config.json`` +
    ``open_clip_model.safetensors``), which ``open_clip.create_model_and_transforms("local-dir:OUT")``
    and LAION's clip_benchmark (``--model_type open_clip --model local-dir:OUT``) load with no
    network. CLIP's BPE tokenizer (``make-tokenizer``) is open_clip's own; any other is copied into
    ``out`` and named in the config, and the text is pooled at its end token, as the trainer does."""
    from safetensors.torch import save_file

    cfg, root, tag = checkpoint_config(checkpoint)
    tokenizer = load_tokenizer(cfg.tokenizer.path)
    trained = load_trained_model(cfg, root, tag, tokenizer)
    shape = preset_shape(cfg.model)
    clip_bpe = len(tokenizer) == 49408 and tokenizer.eos_token_id == 49407 and tokenizer.bos_token_id == 49406
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.float().contiguous() for k, v in hf_to_open_clip(clip_state_dict(trained, which), shape).items()}
    save_file(sd, str(out_dir / "open_clip_model.safetensors"))
    preprocess = {"size": shape["image_size"], "mode": "RGB", "mean": list(cfg.data.image_mean),
                  "std": list(cfg.data.image_std), "interpolation": "bicubic", "resize_mode": "shortest"}
    config = {"model_cfg": open_clip_model_cfg(shape, len(tokenizer), tokenizer.eos_token_id, clip_bpe),
              "preprocess_cfg": preprocess}
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    if not clip_bpe:
        tokenizer.model_max_length = shape["context_length"]
        tokenizer.save_pretrained(out_dir)
    log.info("exported %s (%s) in open_clip's layout to %s", root / tag, which, out_dir)
    return out_dir
