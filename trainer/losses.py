"""The training loss as a weighted sum of named terms (``loss.terms: {clip: 1.0, ...}``).

A term is a function ``term(ctx) -> scalar tensor``; the step logs each term under its name and
back-propagates ``sum(weight * term)``. New methods (self-distillation, momentum-teacher KL,
text-only language modelling) register a term here and read what they need from ``LossContext``
(``ctx.extras`` carries what a teacher object computed for this step).

    terms = build_terms(cfg.loss)                  # validates names
    total, parts = compute_loss(terms, ctx)        # parts: {"clip": tensor(...)}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from kernels import gathered_clip_loss

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
    """Symmetric contrastive loss over the gathered global batch (METHODS.md section 0)."""
    return gathered_clip_loss(ctx.image_emb, ctx.text_emb, ctx.logit_scale, group=ctx.group, impl=ctx.impl,
                              sizes=ctx.sizes)


TERMS: dict[str, Callable[[LossContext], torch.Tensor]] = {"clip": clip_term}
RESERVED = {"step", "loss", "lr", "samples_per_s", "logit_scale", "data_wait_frac"}


def build_terms(lc: LossConfig) -> dict[str, tuple[float, Callable]]:
    if not lc.terms:
        raise ConfigError("config key 'loss.terms' is empty; e.g. {clip: 1.0}")
    unknown = sorted(set(lc.terms) - set(TERMS))
    if unknown:
        raise ConfigError(f"unknown loss term 'loss.terms.{unknown[0]}'; available: {', '.join(sorted(TERMS))}")
    return {name: (float(w), TERMS[name]) for name, w in lc.terms.items()}


def compute_loss(terms: dict[str, tuple[float, Callable]], ctx: LossContext):
    parts = {name: fn(ctx) for name, (_, fn) in terms.items()}
    total = sum(w * parts[name] for name, (w, _) in terms.items())
    return total, parts
