"""Loss kernels for gathered-similarity contrastive training.

    from kernels import gathered_clip_loss, gathered_distill_loss
    loss = gathered_clip_loss(image_emb, text_emb, logit_scale, group=None, impl="auto")
    out = gathered_distill_loss(image_emb, text_emb, logit_scale,
                                self_distill_alpha=a_t, self_distill_mask=subset,   # METHODS 1
                                teacher_image_emb=ema_image_emb, teacher_weight=1.0)  # METHODS 2
    out.loss.backward(); log(out._asdict())
    # soft targets from a teacher's embeddings (EMA or stale model) instead of the same pass:
    out = gathered_distill_loss(image_emb, text_emb, logit_scale, self_distill_alpha=a_t,
                                self_distill_teacher_image=ema_image_emb,   # [b, D], no grad
                                self_distill_teacher_text=ema_text_emb)     # None: student texts

``image_emb`` / ``text_emb`` are this rank's L2-normalised embeddings ``[b, D]``;
``logit_scale`` is the already-exponentiated scale ``s``. The result is this rank's share of the
symmetric loss: averaging gradients over ranks gives the full-batch gradient.

``impl``: ``"torch"`` materialised-logits reference (reference.py); ``"chunked"`` the fused
algorithm in plain torch (chunked.py, O(b + N) memory plus a bounded workspace); ``"triton"``
the fused Triton kernels (triton_clip.py; CUDA tensors, or CPU under TRITON_INTERPRET=1);
``"auto"`` Triton for CUDA tensors when triton imports, chunked otherwise.
``workspace_bytes`` bounds the fused paths' workspace (None: 256 MiB for Triton, 64 MiB for
chunked); memory is then O(b + N) floats plus that, never b x N.
"""
from __future__ import annotations

import logging

import torch

from .chunked import ChunkedBackend
from .fused import WORKSPACE, fused_loss
from .reference import clip_loss_torch, distill_loss_torch
from .spec import DistillLoss, LossSpec, psd_source

IMPLS = ("torch", "triton", "chunked", "auto")
log = logging.getLogger("kernels")
_announced: set = set()


def _announce(asked: str, impl: str, device: torch.device) -> None:
    """Say once per process which implementation a request resolved to (``auto`` hides it)."""
    note = ""
    if impl == "triton":
        from .triton_launch import INTERPRET
        note = " (Triton interpreter)" if INTERPRET else ""
    key = (asked, impl, device.type, note)
    if key not in _announced:
        _announced.add(key)
        log.info("contrastive loss: impl=%s resolved to %s on %s%s", asked, impl, device.type, note)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:   # not installed, or broken for this platform
        return False
    return True


def resolve_impl(impl: str, device: torch.device) -> str:
    """The concrete implementation ``impl`` stands for on ``device``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}. Got: {impl!r}")
    resolved = impl
    if impl == "auto":
        resolved = "triton" if device.type == "cuda" and _triton_available() else "chunked"
    _announce(impl, resolved, device)
    return resolved


def _backend(impl: str):
    if impl == "chunked":
        return ChunkedBackend()
    from .triton_launch import TritonBackend   # imported lazily: reads TRITON_INTERPRET once
    return TritonBackend()


def gathered_clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                       *, group=None, impl: str = "auto",
                       workspace_bytes: int | None = None, sizes=None) -> torch.Tensor:
    """This rank's share of the symmetric CLIP loss over the gathered batch (see module doc).

    ``sizes``: every rank's row count, if the caller knows it (saves a collective per call)."""
    impl = resolve_impl(impl, image_emb.device)
    if impl == "torch":
        return clip_loss_torch(image_emb, text_emb, logit_scale, group=group, sizes=sizes)
    loss, _ = fused_loss(image_emb, text_emb, logit_scale, backend=_backend(impl),
                         spec=LossSpec(workspace_bytes=workspace_bytes), group=group, sizes=sizes)
    return loss


def gathered_distill_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale,
                          *, self_distill_alpha: float | None = None, self_distill_mask=None,
                          self_distill_tau: float = 1.0, teacher_image_emb=None,
                          teacher_weight: float = 1.0, teacher_text_grad: bool = False,
                          self_distill_teacher_image=None, self_distill_teacher_text=None,
                          group=None, impl: str = "auto",
                          workspace_bytes: int | None = None, sizes=None) -> DistillLoss:
    """Contrastive loss with soft targets, in one streaming pass (fields: see ``DistillLoss``).

    - ``self_distill_alpha`` (``a_t``; None = off): targets ``(1 - a_i) onehot_i + a_i p~_i``,
      ``p~_i = softmax(W_i / self_distill_tau)``, ``a_i = a_t * mask_i`` for the
      subset ``self_distill_mask`` (bool ``[b]``; None = every row), both directions.
      ``W = stopgrad(S)`` (the same pass) unless a teacher is given:
    - ``self_distill_teacher_image`` (``[b, D]``, L2-normalised, no grad): ``W = sg(s) XP YP^T``,
      teacher image i against all N teacher texts (rows) and teacher text j against all N
      teacher images (columns); ``self_distill_teacher_text`` (``[b, D]``, gathered inside)
      gives ``YP``, None means the student's own texts, detached (ECLIPSE's shared text tower).
      Passing the very ``teacher_image_emb`` tensor (``is``) with no teacher text reuses the
      momentum teacher's logits (no second dot product). Ignored when ``self_distill_alpha`` is
      None.
    - ``teacher_image_emb`` (None = off): momentum teacher's image embeddings ``[b, D]``; adds
      ``teacher_weight * KL(softmax(s Xbar Y^T) || softmax(s X Y^T))``, both directions, with the
      text gradient stopped (ECLIPSE) unless ``teacher_text_grad``.
    """
    impl = resolve_impl(impl, image_emb.device)
    source = psd_source(self_distill_teacher_image, self_distill_teacher_text, teacher_image_emb)
    kw = dict(self_distill_mask=self_distill_mask, teacher_image_emb=teacher_image_emb, group=group, sizes=sizes,
              self_distill_teacher_image=self_distill_teacher_image,
              self_distill_teacher_text=self_distill_teacher_text)
    if impl == "torch":
        return distill_loss_torch(image_emb, text_emb, logit_scale,
                                  self_distill_alpha=self_distill_alpha,
                                  self_distill_tau=self_distill_tau, teacher_weight=teacher_weight,
                                  teacher_text_grad=teacher_text_grad, **kw)
    if self_distill_tau <= 0:
        raise ValueError(f"self_distill_tau must be > 0. Got: {self_distill_tau}")
    spec = LossSpec(psd=self_distill_alpha is not None, inv_tau=1.0 / self_distill_tau,
                    ecl=teacher_image_emb is not None, teacher_weight=float(teacher_weight),
                    psd_source=source if self_distill_alpha is not None else "self",
                    teacher_text_grad=teacher_text_grad, workspace_bytes=workspace_bytes)
    loss, terms = fused_loss(image_emb, text_emb, logit_scale, backend=_backend(impl), spec=spec,
                             self_distill_alpha=self_distill_alpha or 0.0, **kw)
    return DistillLoss(loss, *terms.unbind(0))


__all__ = ["gathered_clip_loss", "gathered_distill_loss", "clip_loss_torch", "distill_loss_torch",
           "DistillLoss", "LossSpec", "IMPLS", "WORKSPACE", "resolve_impl"]
