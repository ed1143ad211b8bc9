"""The methods beyond plain CLIP, one module each, registered here; the rest of the trainer asks
this registry and never imports a method module by name.

- ``eclipse``: ECLIPSE's momentum image teacher (EMA under every ZeRO stage) and its KL term
  (``evit``: EViT token dropping / FLIP patch dropout for its expedited student)
- ``psd``: progressive self-distillation's soft targets (self, momentum or previous teacher)
- ``text_lm``: EfficientCLIP's text-only stream and its language-modelling term (clm or mlm)
- ``selection``: EfficientCLIP's ensemble confident learning, as rounds inside training
- ``growth``: GrowCLIP's function-preserving growth operators; a run started from
  ``checkpoint.init`` inherits a grown optimizer state
- ``ema``: teacher weights that follow the student's fp32 masters under every ZeRO stage

A method is a module with a ``SPEC`` (:class:`trainer.methods.base.MethodSpec`) and, when it acts
during training, a :class:`~trainer.methods.base.Method`; adding one is one module and one line
in ``REGISTRY``.

    attach(model, cfg)                      # before DeepSpeed wraps the model
    init = load_init(model, cfg)            # checkpoint.init: weights into the model
    method = build_method(cfg, engine)      # what the train step calls
    terms = loss_terms(cfg)                 # {"teacher_kl": w, ...}
    flops = step_flops(cfg, step, world)    # training FLOPs of one step (trainer/flops.py + each method's)
    model = load_trained_model(cfg, root, tag, tokenizer)   # eval / export / select
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint import resume_source
from ..config import Config, ConfigError
from ..dist import broadcast_state_dict
from ..flops import clip_step_flops
from ..model import ClipTrainModel, build_clip_config
from ..sources import INFO, OPTIM, fp32_state_dict, init_source, is_grown, pretrained_init
from . import eclipse, growth, psd, selection, text_lm
from .base import Inherited, Method, MethodSpec, Methods, schedule_clock
from .evit import keep_rate

# In the order the model returns their forward outputs (ECLIPSE's teacher, then PSD's, then the
# LM loss); ``attach`` runs in ascending ``attach_rank`` instead.
REGISTRY: tuple[MethodSpec, ...] = (eclipse.SPEC, psd.SPEC, text_lm.SPEC, selection.SPEC, growth.SPEC)

__all__ = ["REGISTRY", "Inherited", "Method", "MethodSpec", "attach", "build_method", "carried_state", "check",
           "eval_views", "export_towers", "grown_config", "growth_weights", "keep_rate", "load_init",
           "load_trained_model", "loss_terms", "prefixes", "schedule_clock", "steady_overrides", "step_flops",
           "train_flops", "trained_weights"]


def enabled(cfg: Config) -> list[MethodSpec]:
    return [spec for spec in REGISTRY if spec.enabled(cfg)]


def check(cfg: Config) -> None:
    """Every method's config check (a ConfigError names the key), before any process starts."""
    for spec in REGISTRY:
        spec.check(cfg)
    if cfg.train.accum_negatives:
        refused = [s.name for s in enabled(cfg) if not s.cached_negatives_ok(cfg)]
        if refused:
            raise ConfigError(f"config key 'train.accum_negatives' computes the loss from the cached embeddings "
                              f"alone; the enabled method(s) {', '.join(refused)} need more of the training "
                              "forward: turn it off, or those methods")


def attach(model: torch.nn.Module, cfg: Config) -> None:
    """Add what the enabled methods need to the model, before DeepSpeed wraps it."""
    for spec in sorted(enabled(cfg), key=lambda s: s.attach_rank):
        spec.attach(model, cfg)


def build_method(cfg: Config, engine) -> Method:
    """The runtime method object for ``cfg`` around a built engine (after :func:`attach`)."""
    methods = [m for m in (spec.build(cfg, engine) for spec in enabled(cfg)) if m is not None]
    return methods[0] if len(methods) == 1 else Methods(methods) if methods else Method()


def loss_terms(cfg: Config) -> dict[str, float]:
    """The weighted loss terms the enabled methods add, e.g. ``{"teacher_kl": eclipse.kl_weight}``."""
    return {k: w for spec in enabled(cfg) for k, w in spec.loss_terms(cfg).items()}


def prefixes() -> tuple[str, ...]:
    """State-dict prefixes of the methods' own copies (not part of the CLIP model)."""
    return tuple(p for spec in REGISTRY for p in spec.prefixes)


def trained_weights(cfg: Config, root: Path, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 weights of a checkpoint or ``grow`` directory: the student (``CLIPModel`` layout)
    and what the enabled methods keep as weights (ECLIPSE's teacher under ``teacher.*``); the
    methods' training copies (PSD's teacher) are left behind."""
    sd = {k: v for k, v in fp32_state_dict(root, tag).items() if not k.startswith(prefixes())}
    for spec in enabled(cfg):
        sd.update(spec.saved_weights(cfg, root, tag))
    return sd


def growth_weights(cfg: Config, root: Path, tag: str) -> dict[str, torch.Tensor]:
    """:func:`trained_weights` plus the enabled methods' training copies (PSD's teacher), under
    their prefixes: what ``grow`` grows and what a run started from the checkpoint inherits."""
    sd = trained_weights(cfg, root, tag)
    for spec in enabled(cfg):
        sd.update(spec.training_copies(cfg, root, tag))
    return sd


def carried_state(cfg: Config, root: Path, tag: str) -> dict[str, dict]:
    """``{method: state}`` the next stage continues with (ECL's rounds and kept set): a grow
    directory's ``grow.json`` ``carried``, or what the enabled methods read from a checkpoint."""
    if is_grown(root / tag):
        return json.loads((root / tag / INFO).read_text()).get("carried", {})
    return {spec.name: st for spec in enabled(cfg) if (st := spec.carried_state(cfg, root, tag)) is not None}


def grown_config(raw: dict, cfg: Config, carried: dict[str, dict], layer_index) -> None:
    """Let the source's enabled methods edit the grown run's config dict for the grown model and
    their carried state (ECL's kept set as ``data.manifest``, ECLIPSE's drop layers moved with the
    layers: ``layer_index(tower, i)`` is where old layer ``i`` is in the grown tower)."""
    for spec in enabled(cfg):
        spec.grown_config(raw, cfg, carried.get(spec.name), layer_index)


def load_trained_model(cfg: Config, root: Path, tag: str, tokenizer) -> ClipTrainModel:
    """The checkpoint's model in fp32, eval mode, with the methods' evaluation copies attached
    (ECLIPSE: ``model.teacher`` holds the momentum teacher, from the ranks' fp32 EMA shadows).
    In a process group (``eval`` on several ranks) rank 0 reads the weights for all: every rank calls it."""
    model = ClipTrainModel(build_clip_config(cfg.model, tokenizer))
    attach(model, cfg)
    kept = broadcast_state_dict(lambda: trained_weights(cfg, root, tag))
    for name, _ in list(model.named_children()):   # training-only copies (PSD's teacher) are not loaded
        if any(p.startswith(name + ".") for p in prefixes()) and not any(k.startswith(name + ".") for k in kept):
            delattr(model, name)
    missing, unexpected = model.load_state_dict(kept, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {root / tag} does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return model.float().eval()


def load_init(model: torch.nn.Module, cfg: Config, resuming: bool | None = None) -> Inherited | None:
    """On a fresh start with ``checkpoint.init``: load its weights into ``model`` (strictly, but for
    the method copies the run adds) and return what the methods inherit after the engine is built
    (``method.inherit(init)``). None when there is no init, or the run resumes its own checkpoint
    (``resuming``: the run's decision, made on rank 0; None reads the file system here).

    Rank 0 alone reads the weights (consolidating a ZeRO checkpoint reads every rank's optimizer
    partition) and broadcasts them; every rank of a process group calls this."""
    if resuming is None:
        resuming = resume_source(cfg) is not None
    if not cfg.checkpoint.init or resuming:
        return None
    pretrained = pretrained_init(cfg)
    if pretrained is not None:   # transformers / open_clip weights: the student only
        try:
            missing, unexpected = model.load_state_dict(broadcast_state_dict(pretrained.state_dict), strict=False)
        except RuntimeError as err:   # a tensor of another size: weights and config of different models
            raise ConfigError(f"config key 'checkpoint.init': {pretrained.path}: its weights do not fit its config "
                              f"({' '.join(str(err).split())[:300]})") from None
        missing = [k for k in missing if not k.endswith("position_ids") and not k.startswith(prefixes())]
        if missing or unexpected:
            raise ConfigError(f"config key 'checkpoint.init': {pretrained.path} does not match the model: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}")
        return Inherited(pretrained.path, {}, None, {})
    src, root, tag = init_source(cfg.checkpoint.init)
    sd = broadcast_state_dict(lambda: growth_weights(src, root, tag))
    own = prefixes()
    student = {k: v for k, v in sd.items() if not k.startswith(own)}
    missing, unexpected = model.load_state_dict(student, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids") and not k.startswith(own)]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint.init {root / tag} does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    here = tuple(p for spec in enabled(cfg) for p in spec.prefixes)   # copies this run's methods keep
    copies = {k: v for k, v in sd.items() if here and k.startswith(here)}
    optim = root / tag / OPTIM
    grown = is_grown(root / tag)
    return Inherited(root / tag, copies, optim if grown and optim.is_file() else None,
                     carried_state(src, root, tag) if grown else {})


def eval_views(model, cfg: Config) -> list[tuple[str, object, float]]:
    """``(prefix, model-like, keep rate)`` for each evaluation: the model as trained (the plain
    keys, at full capacity) and the enabled methods' views (ECLIPSE: ``fast/``, ``teacher/``)."""
    return [("", model, 1.0)] + [v for spec in enabled(cfg) for v in spec.eval_views(model, cfg)]


def export_towers(model) -> dict[str, dict]:
    """Image towers ``export-hf --which NAME`` can write instead of the student's."""
    return {name: sd for spec in REGISTRY for name, sd in spec.export_towers(model).items()}


def step_flops(cfg: Config, step: int, world: int) -> float:
    """Training FLOPs of optimizer step ``step`` (1-based) on ``world`` ranks: plain CLIP's
    (:func:`trainer.flops.clip_step_flops`) plus what each enabled method adds at that step
    (``MethodSpec.step_flops``: a teacher's forward, dropped tokens, a text stream, a scoring pass)."""
    return clip_step_flops(cfg, world) + sum(spec.step_flops(cfg, step, world) for spec in enabled(cfg))


def train_flops(cfg: Config, steps: int, world: int) -> float:
    """Training FLOPs of steps 1..``steps`` of ``cfg`` on ``world`` ranks (:func:`step_flops` summed)."""
    specs = enabled(cfg)
    base = clip_step_flops(cfg, world)
    return sum(base + sum(spec.step_flops(cfg, s, world) for spec in specs) for s in range(1, steps + 1))


def steady_overrides(cfg: Config, bench_steps: int) -> dict:
    """Overrides that make a ``bench_steps``-step benchmark of ``cfg`` cost, per step, what the
    run ``cfg`` describes costs on average (each enabled method's ``MethodSpec.steady_overrides``)."""
    out: dict = {}
    for spec in enabled(cfg):
        out.update(spec.steady_overrides(cfg, bench_steps))
    return out
