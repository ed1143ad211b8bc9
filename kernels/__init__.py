"""Loss kernels for gathered-similarity contrastive training.

    from kernels import gathered_clip_loss
    loss = gathered_clip_loss(image_emb, text_emb, logit_scale, group=None, impl="auto")

``image_emb`` / ``text_emb`` are this rank's L2-normalised embeddings ``[b, D]``;
``logit_scale`` is the already-exponentiated scale ``s``. The result is this rank's share of the
symmetric loss: averaging gradients over ranks gives the full-batch gradient.
"""
from __future__ import annotations

import torch

from .reference import clip_loss_torch

IMPLS = ("torch", "triton", "chunked", "auto")


def gathered_clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                       *, group=None, impl: str = "auto") -> torch.Tensor:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    if impl in ("torch", "auto"):
        return clip_loss_torch(image_emb, text_emb, logit_scale, group=group)
    raise NotImplementedError(f"impl={impl!r} is not built yet")


__all__ = ["gathered_clip_loss", "clip_loss_torch", "IMPLS"]
