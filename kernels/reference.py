"""Plain-torch gathered CLIP loss: materialised logits, obviously correct.

Math (docs/methods.md section 0): ``S = s * X Y^T`` over the global batch of ``N`` pairs.
Rank ``r`` owns rows ``o .. o+b`` and computes only them, in both directions:

    image -> text: local images  vs all N texts,  labels o + arange(b)
    text -> image: local texts   vs all N images, labels o + arange(b)

and returns ``world / (2N) * (sum of its 2b cross-entropies)``. With equal local batches that is
the ``1/(2b)`` of the design notes; the mean over ranks is the full-batch loss, so DeepSpeed's
gradient averaging gives the full-batch gradient (the gathers carry gradients back to the owners).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .gather import all_gather_with_grad, gathered_layout, world_info
from .spec import DistillLoss, as_scale, check_alpha, check_embeddings, psd_source, subset_mask


def clip_loss_torch(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                    *, group=None, sizes=None) -> torch.Tensor:
    """This rank's share of the symmetric contrastive loss (see module docstring)."""
    if image_emb.shape != text_emb.shape or image_emb.dim() != 2:
        raise ValueError(f"image_emb and text_emb must both be [b, D]; got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}")
    _, world = world_info(group)
    b = image_emb.shape[0]
    offset, sizes = gathered_layout(b, group, device=image_emb.device, sizes=sizes)
    all_images = all_gather_with_grad(image_emb, group, sizes)   # [N, D]
    all_texts = all_gather_with_grad(text_emb, group, sizes)     # [N, D]
    labels = torch.arange(offset, offset + b, device=image_emb.device)
    logits_i2t = logit_scale * image_emb.float() @ all_texts.float().T   # [b, N]
    logits_t2i = logit_scale * text_emb.float() @ all_images.float().T   # [b, N]
    total = (F.cross_entropy(logits_i2t, labels, reduction="sum")
             + F.cross_entropy(logits_t2i, labels, reduction="sum"))
    return total * (world / (2.0 * sum(sizes)))


def _log_softmax_terms(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor):
    """Per-row one-hot CE and soft CE against ``softmax(teacher)`` (teacher logits, no grad)."""
    logp = F.log_softmax(logits, dim=1)
    hard = -logp.gather(1, labels[:, None]).squeeze(1)
    soft = -(F.softmax(teacher.detach(), dim=1) * logp).sum(1)
    return hard, soft


def _teacher_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-row ``KL(softmax(teacher) || softmax(student))``, teacher without gradient."""
    return F.kl_div(F.log_softmax(student, 1), F.log_softmax(teacher.detach(), 1),
                    log_target=True, reduction="none").sum(1)


def distill_loss_torch(image_emb, text_emb, logit_scale, *, self_distill_alpha=None,
                       self_distill_mask=None, self_distill_tau: float = 1.0,
                       teacher_image_emb=None, teacher_weight: float = 1.0,
                       teacher_text_grad: bool = False, self_distill_teacher_image=None,
                       self_distill_teacher_text=None, group=None, sizes=None) -> DistillLoss:
    """Materialised-logits reference of ``gathered_distill_loss`` (docs/methods.md).

    Both directions per rank: local images vs all texts and local texts vs all images.
    Self-distillation targets ``(1 - a_i) onehot + a_i softmax(W_i / tau)`` with
    ``a_i = alpha * mask_i`` and ``W = stopgrad(S)``, or with teacher embeddings
    ``W = sg(s) XP YP^T`` (``self_distill_teacher_image`` XP; ``self_distill_teacher_text`` YP,
    default the student's texts, detached); momentum teacher
    ``KL(softmax(s Xbar Y^T) || softmax(s X sg(Y)^T))`` (text gradients stopped unless
    ``teacher_text_grad``).
    """
    check_embeddings(image_emb, text_emb, teacher_image_emb,
                     self_distill_teacher_image=self_distill_teacher_image,
                     self_distill_teacher_text=self_distill_teacher_text)
    own_teacher = psd_source(self_distill_teacher_image, self_distill_teacher_text,
                             teacher_image_emb) != "self"
    _, world = world_info(group)
    b = image_emb.shape[0]
    offset, sizes = gathered_layout(b, group, device=image_emb.device, sizes=sizes)
    k = world / (2.0 * sum(sizes))
    s = as_scale(logit_scale, image_emb).float()
    x, y = image_emb.float(), text_emb.float()
    xa = all_gather_with_grad(image_emb, group, sizes).float()
    ya = all_gather_with_grad(text_emb, group, sizes).float()
    labels = torch.arange(offset, offset + b, device=image_emb.device)
    inv_tau = 1.0 / self_distill_tau
    z_i, z_t = s * x @ ya.T, s * y @ xa.T
    if own_teacher and self_distill_alpha is not None:
        with torch.no_grad():   # rows: teacher image i vs all teacher texts; columns: text j vs images
            xp = self_distill_teacher_image.detach().float()
            yp = (self_distill_teacher_text.detach().float() if self_distill_teacher_text is not None
                  else y.detach())
            xpa, ypa = all_gather_with_grad(xp, group, sizes), all_gather_with_grad(yp, group, sizes)
            w_i, w_t = s.detach() * xp @ ypa.T * inv_tau, s.detach() * yp @ xpa.T * inv_tau
    else:
        w_i, w_t = z_i.detach() * inv_tau, z_t.detach() * inv_tau
    hard_i, soft_i = _log_softmax_terms(z_i, labels, w_i)
    hard_t, soft_t = _log_softmax_terms(z_t, labels, w_t)
    hard, soft = hard_i + hard_t, soft_i + soft_t
    clip = k * hard.sum()
    zero = clip.new_zeros(())
    if self_distill_alpha is None:
        contrastive, sd_ce = clip, zero
    else:
        m = subset_mask(b, self_distill_mask, image_emb.device)
        a = check_alpha(self_distill_alpha) * m
        contrastive = k * ((1 - a) * hard + a * soft).sum()
        sd_ce = k * (m * soft).sum()
    kl = zero
    if teacher_image_emb is not None:
        xt = teacher_image_emb.detach().float()
        with torch.no_grad():
            xta = all_gather_with_grad(xt, group, sizes)
        y_s = y if teacher_text_grad else y.detach()
        ya_s = ya if teacher_text_grad else ya.detach()
        kl = k * (_teacher_kl(s * x @ ya_s.T, s * xt @ ya.T)
                  + _teacher_kl(s * y_s @ xa.T, s * y @ xta.T)).sum()
    loss = contrastive + teacher_weight * kl if teacher_image_emb is not None else contrastive
    return DistillLoss(loss, contrastive.detach(), clip.detach(), sd_ce.detach(), kl.detach())
