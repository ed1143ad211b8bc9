"""The training loss as a weighted sum of named terms (``loss.terms: {clip: 1.0, ...}``).

A term is a function ``term(ctx) -> scalar tensor``; the step logs each term under its name and
back-propagates ``sum(weight * term)``. New methods (self-distillation, momentum-teacher KL,
text-only language modelling) register a term here and read what they need from ``LossContext``
(``ctx.extras`` carries what a teacher object computed for this step).

    terms = build_terms(cfg.loss, trainer.methods.loss_terms(cfg))   # validates names
    total, parts = compute_loss(terms, ctx)   # parts: {"clip": tensor(...), ...}

Terms that methods add are switched on by the method's key and weighted by its own weight key,
never listed in ``loss.terms``. ``text_lm`` (EfficientCLIP's text-only stream) is a plain term:
this rank's mean LM cross-entropy, which the model's forward computed
(``ctx.extras["text_lm"]``), times ``text_lm.weight``. The distillation terms (``teacher_kl`` of
ECLIPSE, ``self_distill`` of PSD) are not separate passes: with any of them on, ``clip`` and they
come out of one ``kernels.gathered_distill_loss`` call (one streaming pass over the gathered
similarities),
``total = w_clip * (contrastive + (w_kl / w_clip) * teacher_kl)``, where ``contrastive`` is the
CE against PSD's mixed targets ``(1 - a_t) onehot + a_t q`` on its subset (plain CLIP elsewhere).
Logged: ``clip`` the plain one-hot CLIP loss (comparable across methods), ``self_distill`` the CE
against the teacher's soft targets over the subset (weighted inside ``contrastive`` by ``a_t``,
the schedule, not by a weight key), ``teacher_kl`` the KL.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from kernels import gathered_clip_loss, gathered_distill_loss

from .config import ConfigError, LossConfig


@dataclass
class LossContext:
    image_emb: torch.Tensor        # [b, D] local, L2-normalised
    text_emb: torch.Tensor         # [b, D] local, L2-normalised
    logit_scale: torch.Tensor      # exponentiated, clamped
    step: int
    impl: str = "auto"
    group: object = None
    sizes: tuple | None = None     # every rank's rows, when known (saves a collective per loss)
    extras: dict = field(default_factory=dict)


def clip_term(ctx: LossContext) -> torch.Tensor:
    """Symmetric contrastive loss over the gathered global batch (docs/methods.md)."""
    return gathered_clip_loss(ctx.image_emb, ctx.text_emb, ctx.logit_scale, group=ctx.group, impl=ctx.impl,
                              sizes=ctx.sizes)


def text_lm_term(ctx: LossContext) -> torch.Tensor:
    """EfficientCLIP's language-modelling loss on this rank's text-only batch (trainer/methods/text_lm.py)."""
    return ctx.extras["text_lm"]


def _in_the_streaming_pass(ctx: LossContext) -> torch.Tensor:
    raise RuntimeError("computed by compute_loss's single gathered_distill_loss pass")


TERMS: dict[str, Callable[[LossContext], torch.Tensor]] = {"clip": clip_term}
# Terms a method switches on (not listed in loss.terms), and the key that switches each.
METHOD_TERMS = {"teacher_kl": "eclipse.enabled", "self_distill": "psd.enabled", "text_lm": "text_lm.enabled"}
# Of those, the ones computed inside compute_loss's one gathered_distill_loss pass; the others are
# functions of ctx like the terms in TERMS.
STREAMED = {"teacher_kl", "self_distill"}
METHOD_TERM_FNS: dict[str, Callable[[LossContext], torch.Tensor]] = {"text_lm": text_lm_term}
RESERVED = {"step", "loss", "lr", "samples_per_s", "logit_scale", "data_wait_frac"}


def build_terms(lc: LossConfig, methods: dict[str, float] | None = None) -> dict[str, tuple[float, Callable]]:
    if not lc.terms:
        raise ConfigError("config key 'loss.terms' is empty; e.g. {clip: 1.0}")
    for name in sorted(set(lc.terms) & set(METHOD_TERMS)):
        raise ConfigError(f"loss term 'loss.terms.{name}' is switched on by {METHOD_TERMS[name]} "
                          f"(and weighted by its own key), not listed in loss.terms")
    unknown = sorted(set(lc.terms) - set(TERMS))
    if unknown:
        raise ConfigError(f"unknown loss term 'loss.terms.{unknown[0]}'; available: {', '.join(sorted(TERMS))}")
    terms = {name: (float(w), TERMS[name]) for name, w in lc.terms.items()}
    methods = methods or {}
    streamed = [name for name in methods if name in STREAMED]
    if streamed and terms.get("clip", (0.0,))[0] <= 0:
        raise ConfigError(f"loss term(s) {', '.join(streamed)} are distilled next to the contrastive loss: "
                          "config key 'loss.terms.clip' must be > 0")
    return {**terms, **{name: (float(w), _in_the_streaming_pass if name in STREAMED else METHOD_TERM_FNS[name])
                        for name, w in methods.items()}}


def compute_loss(terms: dict[str, tuple[float, Callable]], ctx: LossContext):
    streamed = [name for name in terms if name in STREAMED]
    if not streamed:
        parts = {name: fn(ctx) for name, (_, fn) in terms.items()}
        total = sum(w * parts[name] for name, (w, _) in terms.items())
        return total, parts
    w_clip = terms["clip"][0]
    kw = {}
    if "teacher_kl" in terms:
        kw.update(teacher_image_emb=ctx.extras["teacher_image"], teacher_weight=terms["teacher_kl"][0] / w_clip,
                  teacher_text_grad=ctx.extras.get("teacher_text_grad", False))
    soft = ctx.extras.get("psd") if "self_distill" in terms else None
    if soft is not None:
        kw.update(self_distill_alpha=soft.alpha, self_distill_mask=soft.mask, self_distill_tau=soft.tau)
        if soft.from_eclipse:   # the same tensor as teacher_image_emb: the kernel reuses its logits
            kw["self_distill_teacher_image"] = ctx.extras["teacher_image"]
        elif soft.image is not None:
            kw.update(self_distill_teacher_image=soft.image, self_distill_teacher_text=soft.text)
    out = gathered_distill_loss(ctx.image_emb, ctx.text_emb, ctx.logit_scale, group=ctx.group, impl=ctx.impl,
                                sizes=ctx.sizes, **kw)
    total = w_clip * out.loss
    parts = {"clip": out.clip}
    if "teacher_kl" in terms:
        parts["teacher_kl"] = out.teacher_kl
    if soft is not None:
        parts["self_distill"] = out.self_distill_ce
    for name, (w, fn) in terms.items():
        if name not in parts:
            parts[name] = fn(ctx)
            total = total + w * parts[name]
    return total, parts
