"""One place that reads any checkpoint a command is pointed at.

    cfg, root, tag = checkpoint_config("runs/demo")          # run dir, checkpoints/, step_N or grow DIR
    weights = fp32_state_dict(root, tag)                      # consolidated fp32 module state (any ZeRO stage)
    step = step_of(root, tag)

A *source* is a DeepSpeed step directory (``.../checkpoints/step_N`` with ``trainer_state/`` and
``config.yaml``), a ``checkpoints/`` directory or a run's ``output_dir`` (both resolved through
their ``latest`` file), or a ``grow`` output directory (``weights.pt``, ``grow.json``,
``config.yaml``). ``eval``, ``export-hf``, ``select``, ``grow``, ``checkpoint.init`` and resuming
from another run all resolve paths here. The module state holds the methods' own copies too
(e.g. a teacher under its prefix); which of them are model and which are training state is the
methods' business (``trainer.methods.trained_weights``), not this module's.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import Config, ConfigError, load_config
from .model import PRESETS, SHAPE_KEYS, preset_shape, shared_layer_prefixes
from .pretrained import Pretrained, find_pretrained

# A grow directory's files (written by ``python -m trainer grow``).
WEIGHTS, INFO, OPTIM = "weights.pt", "grow.json", "optimizer.pt"


def is_grown(path: str | Path) -> bool:
    p = Path(path)
    return (p / INFO).is_file() and (p / WEIGHTS).is_file() and (p / "config.yaml").is_file()


def grown_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``grow`` directory's state dict (with the methods' grown copies, e.g. ``teacher.*``)."""
    return torch.load(Path(path) / WEIGHTS, map_location="cpu", weights_only=True)


def resolve_checkpoint(path: str, grown: bool = False) -> tuple[Path, str]:
    """Accept ``.../checkpoints/step_N``, ``.../checkpoints`` (uses ``latest``) or a run's ``output_dir``;
    with ``grown``, also a ``grow`` output directory (weights, no training state)."""
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


def step_of(root: Path, tag: str) -> int:
    """The training step of a checkpoint; of a grow directory, its source's."""
    if is_grown(root / tag):
        return int(json.loads((root / tag / INFO).read_text())["source_step"])
    return int(tag.split("_")[-1])


def fp32_state_dict(root: Path, tag: str) -> dict[str, torch.Tensor]:
    """The module's full state dict in fp32, consolidated from any ZeRO stage with DeepSpeed's own
    ``zero_to_fp32`` reader (a grow directory: its weights as written)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # heavy: only when reading

    tag_dir = root / tag
    if is_grown(tag_dir):
        sd = grown_weights(tag_dir)
    elif any(tag_dir.glob("*optim_states.pt")):
        sd = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
        _add_frozen(sd, tag_dir)
    else:  # ZeRO stage 0: the module states hold every weight
        sd = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    sd = {k: v.float() for k, v in sd.items()}
    fill_shared_layers(sd, preset_shape(load_config(tag_dir / "config.yaml").model), tag_dir)
    return sd


def _add_frozen(sd: dict[str, torch.Tensor], tag_dir: Path) -> None:
    """Frozen weights (``model.lock_*``) are in no optimizer partition, and DeepSpeed records them
    for ``zero_to_fp32`` only under ZeRO-2/3; under ZeRO-1 the module states hold them whole."""
    states = tag_dir / "mp_rank_00_model_states.pt"
    if not states.is_file():
        return
    module = torch.load(states, map_location="cpu", weights_only=False).get("module") or {}
    # a tied partner of a trained weight (model.shared_layers) shares its storage: not frozen
    trained = {v.untyped_storage().data_ptr() for k, v in module.items() if k in sd}
    for k, v in module.items():
        if (k not in sd and v.numel() > 0 and not k.endswith("position_ids")
                and v.untyped_storage().data_ptr() not in trained):
            sd[k] = v


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


def init_source(path: str) -> tuple[Config, Path, str]:
    """``(config, root, tag)`` of a ``checkpoint.init`` path: a checkpoint or a grow directory."""
    try:
        return checkpoint_config(path)
    except ConfigError:
        raise ConfigError(f"config key 'checkpoint.init': {path} is neither a checkpoint (step_N directory or run "
                          "directory) nor a 'grow' output directory") from None


def pretrained_init(cfg: Config) -> Pretrained | None:
    """The run's ``checkpoint.init`` when it is a pretrained source (trainer/pretrained.py)."""
    return find_pretrained(cfg.checkpoint.init, cfg.checkpoint.init_config)


def apply_pretrained_shape(cfg: Config) -> None:
    """With a pretrained ``checkpoint.init``: spell its model shape out in ``cfg.model`` (and set
    ``tokenizer.path`` to the source when it holds a tokenizer and none is given), so the run's
    ``config.yaml`` needs no source to be evaluated or exported. A ``model.*`` key the user set that
    contradicts the source is a ConfigError naming both values. Every rank does the same."""
    src = pretrained_init(cfg)
    if src is None:
        return
    mc = cfg.model
    own = {k: getattr(mc, k) for k in (*SHAPE_KEYS, "patch_size", "act")}
    diff = {k: (v, src.model[k]) for k, v in own.items() if v is not None and v != src.model[k]}
    if diff:
        raise ConfigError(f"config key 'checkpoint.init': {src.path} ({src.kind}) sets the model shape; "
                          + ", ".join(f"model.{k} is {a} here, {b} there" for k, (a, b) in diff.items())
                          + " (leave the shape keys out)")
    preset = dict(PRESETS.get(mc.preset, {}))
    if mc.preset != "tiny" and any(preset[k] != src.model[k] for k in preset if k in src.model):
        raise ConfigError(f"config key 'model.preset' ({mc.preset}) contradicts checkpoint.init {src.path}, "
                          "which sets the model shape; leave model.preset out")
    if mc.shared_layers:
        raise ConfigError(f"config key 'model.shared_layers' ({mc.shared_layers}): a pretrained checkpoint.init "
                          f"({src.path}) has no shared layers")
    for k, v in src.model.items():
        setattr(mc, k, v)
    if cfg.tokenizer.path is None and src.tokenizer_dir is not None:
        cfg.tokenizer.path = str(src.tokenizer_dir)


def check_init_tokenizer(cfg: Config, tokenizer) -> None:
    """A pretrained init's token embedding must fit the run's tokenizer."""
    src = pretrained_init(cfg)
    if src is not None and len(tokenizer) != src.vocab_size:
        raise ConfigError(f"config key 'tokenizer.path': {cfg.tokenizer.path} has {len(tokenizer)} tokens but "
                          f"checkpoint.init {src.path} was trained with a vocabulary of {src.vocab_size}; use its "
                          "tokenizer (python -m trainer make-tokenizer for CLIP's)")


def check_init(cfg: Config) -> None:
    """The init's model shape must be this run's (exit 2 naming both), before any process starts."""
    if not cfg.checkpoint.init:
        return
    if pretrained_init(cfg) is not None:
        apply_pretrained_shape(cfg)   # idempotent: checks what was filled in, or fills it in
        return
    src, root, tag = init_source(cfg.checkpoint.init)
    have, want = preset_shape(src.model), preset_shape(cfg.model)
    diff = {k: (have[k], want[k]) for k in want if have.get(k) != want[k]}
    if diff:
        raise ConfigError(f"config key 'checkpoint.init': {root / tag} holds a model of another shape "
                          f"({', '.join(f'{k}: {a} there, {b} here' for k, (a, b) in diff.items())}); "
                          f"train it with --config {root / tag / 'config.yaml'} or set model.* to match")
