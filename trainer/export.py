"""Checkpoint -> standard ``transformers`` directory, and checkpoint -> model for ``eval``.

    python -m trainer export-hf --checkpoint runs/demo/checkpoints/step_600 --out runs/demo/hf
    model = transformers.CLIPModel.from_pretrained("runs/demo/hf")
    processor = transformers.CLIPProcessor.from_pretrained("runs/demo/hf")

The fp32 weights are consolidated from the DeepSpeed checkpoint (any ZeRO stage) with
DeepSpeed's own ``zero_to_fp32`` reader; the state dict is already ``CLIPModel``'s layout. With
``model.shared_layers`` both towers' keys of a shared layer hold the one trained tensor (DeepSpeed
stores it under one name and records the other in ``shared_params``; :func:`fp32_state_dict`
fills in whichever name is missing), so the export is a standard, untied ``CLIPModel`` whose
config does not mention sharing.
The exported tokenizer's ``model_max_length`` is the trainer's context length (the text tower's
positions), so ``processor(text=..., padding=True, truncation=True)`` truncates exactly as the
trainer does (keeping the end-of-text token) and long captions give the trainer's embeddings.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import yaml

from .config import Config, ConfigError, load_config, to_dict
from .model import ClipTrainModel, build_clip_config, preset_shape, shared_layer_prefixes

log = logging.getLogger("trainer")


def resolve_checkpoint(path: str, grown: bool = False) -> tuple[Path, str]:
    """Accept ``.../checkpoints/step_N``, ``.../checkpoints`` (uses ``latest``) or a run's ``output_dir``;
    with ``grown``, also a ``grow`` output directory (weights, no training state)."""
    from .methods.growth import is_grown
    p = Path(path)
    if grown and is_grown(p):
        return p.parent, p.name
    if (p / "checkpoints" / "latest").is_file():
        p = p / "checkpoints"
    if (p / "latest").is_file():
        p = p / (p / "latest").read_text().strip()
    if not (p / "trainer_state").is_dir() or not (p / "config.yaml").is_file():
        raise ConfigError(f"--checkpoint {path}: not a complete checkpoint (expected a step_N directory with "
                          "trainer_state/ and config.yaml, or a directory with a 'latest' file)")
    return p.parent, p.name


def checkpoint_config(path: str, overrides: list[str] = ()) -> tuple[Config, Path, str]:
    """The config, root and tag of a checkpoint or ``grow`` directory (for eval, export, select, grow)."""
    root, tag = resolve_checkpoint(path, grown=True)
    return load_config(root / tag / "config.yaml", overrides), root, tag


def fp32_state_dict(root: Path, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from .methods.growth import TEACHER, grown_weights, is_grown

    tag_dir = root / tag
    if is_grown(tag_dir):   # a grow directory: the weights as written (its teacher: teacher_state_dict)
        sd = {k: v for k, v in grown_weights(tag_dir).items() if not k.startswith(TEACHER)}
    elif any(tag_dir.glob("*optim_states.pt")):
        sd = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    else:  # ZeRO stage 0: the module states hold every weight
        sd = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    sd = {k: v.float() for k, v in sd.items()}
    fill_shared_layers(sd, preset_shape(load_config(tag_dir / "config.yaml").model), tag_dir)
    return sd


def fill_shared_layers(sd: dict[str, torch.Tensor], shape: dict, where: Path) -> None:
    """Both towers' keys for each shared layer (``model.shared_layers``): a key DeepSpeed did not
    store is its tied partner's tensor; two stored copies must be equal (they are one parameter)."""
    for vision, text in shared_layer_prefixes(shape):
        names = {k[len(vision):] for k in sd if k.startswith(vision)} | {k[len(text):] for k in sd if k.startswith(text)}
        for name in sorted(names):
            v, t = sd.get(vision + name), sd.get(text + name)
            if v is None:
                sd[vision + name] = t
            elif t is None:
                sd[text + name] = v
            elif not torch.equal(v, t):
                raise RuntimeError(f"checkpoint {where}: the shared layer tensors {vision + name} and {text + name} "
                                   "differ (model.shared_layers ties them)")


def load_trained_model(cfg: Config, root: Path, tag: str, tokenizer) -> ClipTrainModel:
    """The checkpoint's model in fp32, eval mode; with ECLIPSE on, ``model.teacher`` holds the
    momentum teacher (from the ranks' fp32 EMA shadows, see trainer/methods/eclipse.py)."""
    from .methods import attach
    from .methods.eclipse import PREFIX, teacher_state_dict

    from .methods.psd import PREFIX as PSD_PREFIX

    model = ClipTrainModel(build_clip_config(cfg.model, tokenizer))
    attach(model, cfg)
    if hasattr(model, "psd_teacher"):   # PSD's teacher copy is training state, not part of the model
        del model.psd_teacher
    sd = {k: v for k, v in fp32_state_dict(root, tag).items() if not k.startswith((PREFIX, PSD_PREFIX))}
    if cfg.eclipse.enabled:
        sd.update({PREFIX + k: v for k, v in teacher_state_dict(root, tag).items()})
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {root / tag} does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return model.float().eval()


def clip_state_dict(model: ClipTrainModel, which: str = "student") -> dict[str, torch.Tensor]:
    """``CLIPModel``'s state dict of ``model`` with the student's image tower or, for
    ``which="teacher"``, the ECLIPSE teacher's (the text tower is shared)."""
    from .methods.eclipse import PREFIX
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(PREFIX)}
    if which == "teacher":
        if not hasattr(model, "teacher"):
            raise ConfigError("--which teacher: this checkpoint has no momentum teacher (eclipse.enabled was off)")
        sd.update(model.teacher.state_dict())
    return sd


def export_hf(checkpoint: str, out: str, tokenizer_path: str | None = None, which: str = "student") -> Path:
    """Write ``out`` as a standard ``CLIPModel`` + ``CLIPProcessor``; ``which``: student | teacher
    (ECLIPSE's momentum image tower with the shared text tower)."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    from .data import load_tokenizer

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
